"""Typed model configs (docs/math.md §3, §4): frozen dataclasses, loadable from YAML.

Build from a dict with ``m2rnn_jax.typed_config.from_dict(ModelConfig, data)`` or from a file
with ``load_yaml(ModelConfig, path)``; every value is checked in ``__post_init__`` and a bad one
raises ``ConfigError`` (a ``ValueError``) naming the field.

The layer pattern has one letter per block; ``m2rnn_jax.layers.registry`` maps letters to mixer
classes (``M`` = M²RNN, ``A`` = softmax attention; other modules register more, e.g. ``D`` =
Gated DeltaNet and ``S`` = Mamba-2, whose sub-configs live here too so that a model is one
piece of data).
"""

import dataclasses
import math
from typing import Literal

from m2rnn_jax.ops import BACKENDS
from m2rnn_jax.typed_config import require, require_positive_int

DTYPES = ("float32", "bfloat16", "float16")


def _require_head_count(value, key, num_heads):
    """A head count of ``None`` means ``num_heads``; otherwise it must divide it."""
    if value is not None:
        require_positive_int(value, key)
        require(num_heads % value == 0, key, f"= {value} must divide num_heads = {num_heads}")


@dataclasses.dataclass(frozen=True)
class M2RNNConfig:
    """The M²RNN mixer (docs/math.md §3). Head counts of ``None`` mean ``num_heads`` (N)."""

    num_heads: int = 84
    num_q_heads: int | None = 1
    num_k_heads: int | None = 1
    num_v_heads: int | None = None
    num_f_heads: int | None = None
    num_w_heads: int | None = None
    num_g_heads: int | None = None
    key_dim: int = 64
    value_dim: int = 16
    conv_kernel: int = 4  # taps of the causal depthwise conv over q|k|v; 1 = no temporal mixing
    add_bias: bool = False  # bias in in_proj and the conv
    use_residual: bool = True  # y += D ⊙ v
    gradient_clipping: float | None = 1.0
    backend: str = "auto"
    chunk_size: int | None = None
    A_init_min: float = 0.0  # A ~ U[A_init_min, A_init_max], A_log = log max(A, tiny)
    A_init_max: float = 16.0
    dt_init_min: float = 1e-3  # dt = exp(U[log dt_min, log dt_max]) floored at dt_init_floor
    dt_init_max: float = 0.1
    dt_init_floor: float = 1e-4
    # Departures from docs/math.md §3 for experiments (the defaults follow it). "normal" draws
    # each head's W ~ N(0, (transition_scale / sqrt(V))²), as in an Elman RNN, instead of W = I.
    transition_init: Literal["identity", "normal"] = "identity"
    transition_scale: float = 0.5  # used only by transition_init = "normal"
    # "identity" leaves v linear after the conv (q and k keep their SiLU), so that the write
    # k vᵀ can also push state entries down (SiLU bounds v below at about -0.28).
    value_activation: Literal["silu", "identity"] = "silu"
    # How decode steps run between the in-projection and the output path: "auto" = the fused
    # Pallas kernel (pallas_kernels/m2rnn/decode_step.py) where the GPU kernels compile for real
    # and it supports K and V, else XLA; "fused" = the kernel anywhere (in Pallas' interpreter
    # off a GPU; an error where it does not support K and V); "xla" = never the kernel.
    decode_kernel: Literal["auto", "fused", "xla"] = "auto"

    def __post_init__(self):
        require_positive_int(self.num_heads, "m2rnn.num_heads")
        for name in ("q", "k", "v", "f", "w", "g"):
            _require_head_count(getattr(self, f"num_{name}_heads"), f"m2rnn.num_{name}_heads",
                                self.num_heads)
        counts = [self.heads(n) for n in "qkvfw"]
        require(max(counts) == self.num_heads, "m2rnn.num_heads",
                f"= {self.num_heads} must equal the largest of the q/k/v/f/w head counts {counts}")
        require_positive_int(self.key_dim, "m2rnn.key_dim")
        require_positive_int(self.value_dim, "m2rnn.value_dim")
        require_positive_int(self.conv_kernel, "m2rnn.conv_kernel")
        require(self.gradient_clipping is None
                or (math.isfinite(self.gradient_clipping) and self.gradient_clipping > 0),
                "m2rnn.gradient_clipping",
                f"must be None or a finite number > 0, got {self.gradient_clipping!r}")
        require(self.backend in BACKENDS, "m2rnn.backend",
                f"must be one of {BACKENDS}, got {self.backend!r}")
        if self.chunk_size is not None:
            require_positive_int(self.chunk_size, "m2rnn.chunk_size")
        require(0 <= self.A_init_min < self.A_init_max, "m2rnn.A_init_min/A_init_max",
                f"must satisfy 0 <= min < max, got {self.A_init_min}, {self.A_init_max}")
        require(0 < self.dt_init_min <= self.dt_init_max, "m2rnn.dt_init_min/dt_init_max",
                f"must satisfy 0 < min <= max, got {self.dt_init_min}, {self.dt_init_max}")
        require(self.dt_init_floor > 0, "m2rnn.dt_init_floor",
                f"must be > 0, got {self.dt_init_floor}")
        require(self.transition_init in ("identity", "normal"), "m2rnn.transition_init",
                f"must be 'identity' or 'normal', got {self.transition_init!r}")
        require(isinstance(self.transition_scale, (int, float))
                and not isinstance(self.transition_scale, bool)
                and math.isfinite(self.transition_scale) and self.transition_scale > 0,
                "m2rnn.transition_scale", f"must be a positive number, got "
                f"{self.transition_scale!r}")
        require(self.value_activation in ("silu", "identity"), "m2rnn.value_activation",
                f"must be 'silu' or 'identity', got {self.value_activation!r}")
        require(self.decode_kernel in ("auto", "fused", "xla"), "m2rnn.decode_kernel",
                f"must be 'auto', 'fused' or 'xla', got {self.decode_kernel!r}")

    def heads(self, name: str) -> int:
        """Resolved head count of ``name`` in ``"qkvfwg"``."""
        value = getattr(self, f"num_{name}_heads")
        return self.num_heads if value is None else value

    @property
    def conv_width(self) -> int:
        """Channels of q|k|v, the conv's input."""
        return (self.heads("q") + self.heads("k")) * self.key_dim + self.heads("v") * self.value_dim

    @property
    def in_proj_width(self) -> int:
        """q|k|v, forget logits, output gate g."""
        return self.conv_width + self.heads("f") + self.heads("g") * self.value_dim

    @property
    def output_width(self) -> int:
        """N·V, the width of the gated, normalised read-out."""
        return self.num_heads * self.value_dim


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Causal softmax attention with grouped KV heads; no positional encoding unless ``rope``."""

    num_heads: int = 16
    num_kv_heads: int | None = None  # None = num_heads (multi-head); must divide num_heads
    head_dim: int | None = None  # None = d_model // num_heads
    rope: bool = False
    rope_theta: float = 10000.0
    add_bias: bool = False
    # jax.nn.dot_product_attention's implementation: "auto" = cuDNN's flash attention on a GPU
    # for the shapes and dtypes it takes (layers/attention.py says which), XLA elsewhere;
    # "xla" (or null) and "cudnn" force one.
    implementation: Literal["auto", "xla", "cudnn"] | None = "auto"

    def __post_init__(self):
        require_positive_int(self.num_heads, "attention.num_heads")
        _require_head_count(self.num_kv_heads, "attention.num_kv_heads", self.num_heads)
        if self.head_dim is not None:
            require_positive_int(self.head_dim, "attention.head_dim")
            require(not self.rope or self.head_dim % 2 == 0, "attention.head_dim",
                    f"must be even with rope, got {self.head_dim}")
        require(self.rope_theta > 0, "attention.rope_theta",
                f"must be > 0, got {self.rope_theta}")
        require(self.implementation in (None, "auto", "xla", "cudnn"),
                "attention.implementation",
                f"must be 'auto', 'xla', 'cudnn' or null, got {self.implementation!r}")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
    """Baseline mixer ``D`` (Gated DeltaNet; its layer lives in layers/gated_deltanet.py)."""

    num_heads: int = 2
    key_dim: int = 256
    value_dim: int = 512
    conv_kernel: int = 4
    chunk_size: int = 64

    def __post_init__(self):
        for name in ("num_heads", "key_dim", "value_dim", "conv_kernel", "chunk_size"):
            require_positive_int(getattr(self, name), f"gated_deltanet.{name}")


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Baseline mixer ``S`` (Mamba-2 style SSM; its layer lives in layers/mamba2.py)."""

    num_heads: int = 32
    head_dim: int = 64
    state_dim: int = 128
    num_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    dt_init_min: float = 1e-3
    dt_init_max: float = 0.1
    dt_init_floor: float = 1e-4

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "state_dim", "num_groups", "conv_kernel",
                     "chunk_size"):
            require_positive_int(getattr(self, name), f"mamba2.{name}")
        require(self.num_heads % self.num_groups == 0, "mamba2.num_groups",
                f"= {self.num_groups} must divide num_heads = {self.num_heads}")
        require(0 < self.A_init_min < self.A_init_max, "mamba2.A_init_min/A_init_max",
                f"must satisfy 0 < min < max, got {self.A_init_min}, {self.A_init_max}")
        require(0 < self.dt_init_min <= self.dt_init_max, "mamba2.dt_init_min/dt_init_max",
                f"must satisfy 0 < min <= max, got {self.dt_init_min}, {self.dt_init_max}")


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    hidden_dim: int = 2752

    def __post_init__(self):
        require_positive_int(self.hidden_dim, "mlp.hidden_dim")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLP (``m2rnn_jax/layers/moe.py``) in place of every block's SwiGLU.

    ``num_experts = 0`` (the default) keeps the dense SwiGLU of width ``mlp.hidden_dim``; the
    other fields then have no effect. The router always computes in float32.
    """

    num_experts: int = 0
    top_k: int = 8  # experts per token
    expert_hidden_dim: int = 256  # each routed expert is a SwiGLU of this width
    shared_expert_hidden_dim: int = 0  # a SwiGLU every token passes through too; 0 = none
    # Coefficient of the load-balancing loss E · Σ_e f_e · P_e in the training loss.
    aux_loss_weight: float = 0.01
    # True: a token's top-k router probabilities are rescaled to sum to 1. False: they are used
    # as they are (with top_k = 1 this keeps a gradient from the LM loss into the router).
    normalize_top_k: bool = True

    def __post_init__(self):
        require(isinstance(self.num_experts, int) and not isinstance(self.num_experts, bool)
                and self.num_experts >= 0, "moe.num_experts",
                f"must be 0 (dense MLP) or a positive integer, got {self.num_experts!r}")
        require_positive_int(self.top_k, "moe.top_k")
        if self.num_experts:
            require(self.top_k <= self.num_experts, "moe.top_k",
                    f"= {self.top_k} must not exceed moe.num_experts = {self.num_experts}")
        require_positive_int(self.expert_hidden_dim, "moe.expert_hidden_dim")
        require(isinstance(self.shared_expert_hidden_dim, int)
                and not isinstance(self.shared_expert_hidden_dim, bool)
                and self.shared_expert_hidden_dim >= 0, "moe.shared_expert_hidden_dim",
                f"must be 0 (none) or a positive integer, got {self.shared_expert_hidden_dim!r}")
        require(isinstance(self.aux_loss_weight, (int, float))
                and not isinstance(self.aux_loss_weight, bool)
                and math.isfinite(self.aux_loss_weight) and self.aux_loss_weight >= 0,
                "moe.aux_loss_weight", f"must be a finite number >= 0, got "
                f"{self.aux_loss_weight!r}")
        require(isinstance(self.normalize_top_k, bool), "moe.normalize_top_k",
                f"must be true or false, got {self.normalize_top_k!r}")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A hybrid language model: embedding, one block per pattern letter, final norm, LM head."""

    vocab_size: int = 50304
    d_model: int = 1024
    layer_pattern: str = "MMMMAMMMMMMMAMMMMMMMAMMM"
    m2rnn: M2RNNConfig = dataclasses.field(default_factory=M2RNNConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    mlp: MLPConfig = dataclasses.field(default_factory=MLPConfig)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    gated_deltanet: GatedDeltaNetConfig = dataclasses.field(default_factory=GatedDeltaNetConfig)
    mamba2: Mamba2Config = dataclasses.field(default_factory=Mamba2Config)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    init_std: float = 0.02  # normal init of embeddings and projections
    depth_scaled_init: bool = True  # out projections use init_std / sqrt(2 · num_layers)
    # How a Generator's decode steps at batch 1 run their products: "auto" = as one Pallas
    # kernel each, with the norm before them and the bias, SwiGLU and residual add after them
    # fused in (pallas_kernels/row_product.py), where the GPU kernels compile for real and the
    # model's axes split nothing, else XLA; "kernel" = the kernels anywhere (in Pallas'
    # interpreter off a GPU); "xla" = never. A model's own decode_step always runs XLA's.
    decode_products: Literal["auto", "kernel", "xla"] = "auto"

    def __post_init__(self):
        require_positive_int(self.vocab_size, "vocab_size")
        require(self.decode_products in ("auto", "kernel", "xla"), "decode_products",
                f"must be 'auto', 'kernel' or 'xla', got {self.decode_products!r}")
        require_positive_int(self.d_model, "d_model")
        require(isinstance(self.layer_pattern, str) and len(self.layer_pattern) >= 1,
                "layer_pattern", f"must be a non-empty string, got {self.layer_pattern!r}")
        require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        for name in ("compute_dtype", "param_dtype"):
            require(getattr(self, name) in DTYPES, name,
                    f"must be one of {DTYPES}, got {getattr(self, name)!r}")
        require(self.init_std > 0 and math.isfinite(self.init_std), "init_std",
                f"must be a positive number, got {self.init_std}")
        if "A" in self.layer_pattern and self.attention.head_dim is None:
            require(self.d_model % self.attention.num_heads == 0, "attention.num_heads",
                    f"= {self.attention.num_heads} must divide d_model = {self.d_model} "
                    f"(or set attention.head_dim)")
            head_dim = self.d_model // self.attention.num_heads
            require(not self.attention.rope or head_dim % 2 == 0, "attention.head_dim",
                    "must be even with rope")
        # Letters are checked against the mixer registry when the model is built, because
        # other modules may register letters after this config is created.

    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def attention_head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.num_heads
