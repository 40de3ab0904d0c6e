"""TrainConfig loading (errors name the dotted key), the CLI's handling of them, the mesh
shape and the logical-axis → mesh table."""

import pathlib

import jax
import pytest
import yaml
from jax.sharding import PartitionSpec as P

from m2rnn_jax import ModelConfig
from m2rnn_jax.typed_config import ConfigError, assign, load_yaml
from train import cli, sharding
from train.config import MeshConfig, TrainConfig, load_train_config, train_config_from_dict, \
    train_config_to_dict
from train.trainer import resolve_resumed_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def write_config(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_configs_load_and_round_trip():
    paths = [TINY] + sorted((ROOT / "configs").glob("train_*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        config = load_train_config(path)
        assert isinstance(config, TrainConfig)
        assert train_config_from_dict(train_config_to_dict(config)) == config


def test_overrides_apply_with_yaml_values():
    config = load_train_config(TINY, ["optimizer.learning_rate=1e-3", "mesh.fsdp=2",
                                      "data.paths=[a, b]", "steps=7"])
    assert config.optimizer.learning_rate == 1e-3 and config.mesh.fsdp == 2
    assert config.data.paths == ("a", "b") and config.steps == 7


@pytest.mark.parametrize("data, key", [
    ({"optimizer": {"learnign_rate": 1e-3}}, "optimizer.learnign_rate"),
    ({"data": {"seq_len": "long"}}, "data.seq_len"),
    ({"model": {"m2rnn": {"key_dim": 0}}}, "m2rnn.key_dim"),
    ({"optimizer": {"learning_rate": -1.0}}, "optimizer.learning_rate"),
    ({"optimizer": {"b2": 1.5}}, "optimizer.b2"),
    ({"data": {"source": "web"}}, "data.source"),
    ({"checkpoint": {"keep": 0}}, "checkpoint.keep"),
    ({"data": {"batch_size": 6}, "optimizer": {"grad_accum_steps": 4}}, "data.batch_size"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"),
])
def test_config_errors_name_the_key(tmp_path, data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config(write_config(tmp_path, data))


def test_override_of_an_unknown_key_names_it():
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        load_train_config(TINY, ["optimizer.lr=1"])


def test_assign_creates_levels_only_below_the_open_depth():
    data = {"models": {"m2rnn": {"d_model": 8}}, "train": {"steps": 1}}
    assign(data, "models.m2rnn.m2rnn.key_dim=4", open_depth=2)
    assign(data, "train.steps=3")
    assert data == {"models": {"m2rnn": {"d_model": 8, "m2rnn": {"key_dim": 4}}},
                    "train": {"steps": 3}}
    for assignment, depth in (("models.other.d_model=8", 2), ("train.stepz=3", None),
                              ("task.x=1", None)):
        with pytest.raises(ConfigError, match="unknown config key"):
            assign(data, assignment, open_depth=depth)
    with pytest.raises(ConfigError, match="is not a mapping"):
        assign(data, "train.steps.x=1")
    with pytest.raises(ConfigError, match="key=value"):
        assign(data, "train.steps")


def test_the_library_loader_reads_files_as_the_trainer_does(tmp_path):
    """One YAML reader: a missing, folder or malformed file is a ConfigError naming it."""
    (tmp_path / "bad.yaml").write_text("d_model: [1,\n")
    for path, message in ((tmp_path / "none.yaml", "does not exist"),
                          (tmp_path, "is a folder"), (tmp_path / "bad.yaml", "not valid YAML")):
        with pytest.raises(ConfigError, match=message):
            load_yaml(ModelConfig, path)


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    path = write_config(tmp_path, {"data": {"eval_rows": -3}})
    assert cli.main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.eval_rows" in err and "Traceback" not in err
    assert cli.main(["--config", str(TINY), "--out", str(tmp_path / "run"),
                     "mesh.tensor=3"]) == 2
    assert "mesh" in capsys.readouterr().err


def test_mesh_shape_fills_one_axis_and_rejects_bad_sizes():
    def mesh(**sizes):
        return MeshConfig(**sizes)

    # Order: data, fsdp, expert, context, tensor.
    assert sharding.mesh_shape(mesh(data=-1, fsdp=2), 8) == (4, 2, 1, 1, 1)
    assert sharding.mesh_shape(mesh(data=2, fsdp=2, tensor=2), 8) == (2, 2, 1, 1, 2)
    assert sharding.mesh_shape(mesh(data=2, expert=-1), 8) == (2, 1, 4, 1, 1)
    assert sharding.mesh_shape(mesh(data=1, fsdp=2, context=2, tensor=2), 8) == (1, 2, 1, 2, 2)
    with pytest.raises(ConfigError, match="mesh.data"):
        sharding.mesh_shape(mesh(data=-1, fsdp=3), 8)
    with pytest.raises(ConfigError, match="needs 4 devices"):
        sharding.mesh_shape(mesh(data=2, fsdp=2), 8)
    with pytest.raises(ConfigError, match="mesh.fsdp"):
        sharding.mesh_shape(mesh(data=-1, fsdp=0), 8)
    with pytest.raises(ConfigError, match="mesh.context"):
        sharding.mesh_shape(mesh(data=-1, context=-1), 8)


def test_logical_axes_map_through_the_table_with_divisibility_fallback():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert sharding.logical_to_mesh(("embed", "mlp"), (8, 6), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh(("vocab", "embed"), (10, 4), mesh) == P("tensor", "fsdp")
    # 5 is not divisible by 2: that dim stays replicated.
    assert sharding.logical_to_mesh(("embed", "mixer"), (4, 5), mesh) == P("fsdp", None)
    # A mesh axis is used once per spec.
    assert sharding.logical_to_mesh(("heads", "mixer"), (4, 4), mesh) == P("tensor", None)
    assert sharding.logical_to_mesh(("norm",), (4,), mesh) == P(None)
    assert sharding.logical_to_mesh(("batch", None), (4, 3), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="LOGICAL_AXIS_RULES"):
        sharding.logical_to_mesh(("pixels",), (4,), mesh, where="w")
    one = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    assert sharding.logical_to_mesh(("embed", "mlp"), (8, 6), one) == P(None, None)


def test_model_axes_come_from_the_table_and_leave_out_unsplit_axes():
    axes = sharding.model_axes(sharding.make_mesh(MeshConfig(data=2, expert=4)))
    assert (axes.batch, axes.expert, axes.tensor, axes.context) == (("data", "expert"),
                                                                     "expert", None, None)
    axes = sharding.model_axes(sharding.make_mesh(MeshConfig(data=1, fsdp=2, context=2,
                                                             tensor=2)))
    assert (axes.batch, axes.expert, axes.tensor, axes.context) == (("fsdp",), None, "tensor",
                                                                     "context")
    assert not sharding.model_axes(sharding.make_mesh(MeshConfig(data=1),
                                                      jax.devices()[:1])).splits_anything


def test_every_logical_axis_of_the_model_is_in_the_table():
    from m2rnn_jax import LOGICAL_AXES

    assert set(LOGICAL_AXES) <= set(sharding.LOGICAL_AXIS_RULES)


def test_resume_keeps_the_saved_config_except_steps_mesh_and_logging():
    saved = load_train_config(TINY, ["steps=10", "optimizer.learning_rate=1e-3"])
    given = load_train_config(TINY, ["steps=25", "optimizer.learning_rate=5e-2", "mesh.fsdp=2",
                                     "logging.eval_every=7", "on_nonfinite=skip"])
    notes = []
    merged = resolve_resumed_config(given, train_config_to_dict(saved), log=notes.append)
    assert merged.steps == 25 and merged.mesh.fsdp == 2 and merged.logging.eval_every == 7
    assert merged.on_nonfinite == "skip"
    assert merged.optimizer.learning_rate == 1e-3
    # Extending a run keeps the learning-rate schedule's length: no jump in the rate.
    assert merged.optimizer.schedule_steps == 10
    assert any("saved optimizer" in n for n in notes) and any("schedule" in n for n in notes)
    same = resolve_resumed_config(saved, train_config_to_dict(saved), log=notes.append)
    assert same == saved


def test_a_model_file_serves_as_the_model_section_and_dry_run_counts_parameters(tmp_path,
                                                                                capsys):
    repo = pathlib.Path(__file__).resolve().parents[1]
    config = load_train_config(repo / "configs/train_hybrid_7b_moe.yaml")
    model = config.model
    assert (model.d_model, model.num_layers, model.m2rnn.num_heads) == (1536, 40, 132)
    assert [i for i, letter in enumerate(model.layer_pattern) if letter == "A"] == \
        [4, 12, 20, 28, 36]
    assert (model.moe.num_experts, model.moe.top_k, model.moe.expert_hidden_dim,
            model.moe.shared_expert_hidden_dim) == (128, 8, 256, 1024)
    assert cli.main(["--config", str(repo / "configs/train_hybrid_7b_moe.yaml"),
                     "--dry-run"]) == 0
    printed = capsys.readouterr().out
    total = int(printed.split("parameters: ")[1].split(" total")[0].replace(",", ""))
    active = int(printed.split("total (")[1].split("), ")[1].split(" active")[0]
                 .replace(",", ""))
    # Routed experts: 40 layers x 128 SwiGLU experts of (gate, up, down) 1536 x 256 each; a
    # token uses 8 of the 128, everything else it uses whole.
    routed = 40 * 128 * 3 * 1536 * 256
    assert 6.5e9 < total < 7.2e9
    assert active == total - routed + routed * 8 // 128
    broken = tmp_path / "train.yaml"
    broken.write_text("model: model/none.yaml\n")
    with pytest.raises(ConfigError, match="model/none.yaml"):
        load_train_config(broken)
