"""The language-model comparison (``m2rnn-compare``): layer patterns, equal-size matching
against brute force, state bytes against the caches the layers really keep, the report from
synthetic runs, the corpus builder on synthetic packages, the per-position loss against a
float64 computation, and the tiny config end to end (stop by the time budget, resume, skip)."""

import csv
import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_experiments.lm_comparison import cli, corpus, long_context, report, sizing
from m2rnn_experiments.lm_comparison.config import ExperimentConfig, matched_families
from m2rnn_experiments.lm_comparison.manifest import MANIFEST, PackageSource
from m2rnn_jax import HybridLM
from m2rnn_jax.config import ModelConfig
from m2rnn_jax.typed_config import ConfigError, from_dict, read_yaml

CONFIGS = pathlib.Path(cli.__file__).resolve().parent / "configs"


def load(name) -> ExperimentConfig:
    return from_dict(ExperimentConfig, read_yaml(CONFIGS / f"{name}.yaml"))


def tiny_model(pattern="MAM", **changes) -> ModelConfig:
    data = {"vocab_size": 256, "d_model": 32, "layer_pattern": pattern,
            "m2rnn": {"num_heads": 2, "key_dim": 16, "value_dim": 8},
            "gated_deltanet": {"num_heads": 2, "key_dim": 8, "value_dim": 16, "chunk_size": 8},
            "mamba2": {"num_heads": 2, "head_dim": 16, "state_dim": 8, "chunk_size": 8},
            "attention": {"num_heads": 2}, "mlp": {"hidden_dim": 64},
            "compute_dtype": "float32"}
    data.update(changes)
    return from_dict(ModelConfig, data)


# --- layer patterns and sizes -------------------------------------------------------------

def test_hybrid_pattern_places_attention_as_the_paper_does():
    seven_b = sizing.hybrid_pattern(40, "M")
    assert [i for i, c in enumerate(seven_b) if c == "A"] == [4, 12, 20, 28, 36]
    assert set(seven_b) == {"M", "A"}
    assert sizing.hybrid_pattern(24, "M") == "MMMMAMMMMMMMAMMMMMMMAMMM"  # the 400M hybrid
    assert sizing.hybrid_pattern(4, "D") == "DDDD"
    small = load("small")
    for name, letter in (("m2rnn", "M"), ("gdn", "D"), ("mamba2", "S"), ("attention", "A")):
        assert small.families[name]["model"]["layer_pattern"] == sizing.hybrid_pattern(16, letter)
    assert small.families["gdn_1m"]["model"]["layer_pattern"] == sizing.swap_layer(
        sizing.hybrid_pattern(16, "D"), 0, "M")
    with pytest.raises(ValueError, match="not a recurrent layer"):
        sizing.swap_layer("DDDDA", 4, "M")


def test_parameter_count_equals_the_built_models():
    config = tiny_model("MDSA")
    model = nnx.jit(lambda: HybridLM(config, rngs=nnx.Rngs(0)))()  # one compile, not per op
    built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert sizing.count_params(config) == built


@pytest.mark.parametrize("key,step,largest", [("mlp.hidden_dim", 2, 40),
                                              ("mamba2.num_heads", 1, 12)])
def test_match_width_finds_the_closest_width(key, step, largest):
    target = sizing.count_params(tiny_model("MAM"))
    base = tiny_model("SAS")
    brute = {m: sizing.count_params(sizing.with_value(base, key, m * step))
             for m in range(1, largest + 1)}
    best = min(brute, key=lambda m: (abs(brute[m] - target), m))
    assert brute[largest] > target  # the range holds the answer
    matched, params = sizing.match_width(base, key, target, step=step)
    assert sizing.get_value(matched, key) == best * step
    assert params == brute[best]
    with pytest.raises(ConfigError, match="cannot match"):
        sizing.match_width(base, key, 1000, step=step)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_every_family_is_within_three_percent_of_the_m2rnn_hybrid(name):
    config = load(name)
    matched = matched_families(config)
    assert set(matched) == {"m2rnn", "gdn", "mamba2", "gdn_1m", "attention"}
    reference = matched["m2rnn"]
    assert reference.model == config.unmatched_model("m2rnn")  # the reference is not changed
    for family in matched.values():
        assert family.params == sizing.count_params(family.model)
        assert abs(family.params / reference.params - 1) <= 0.03, family
    assert set(matched["gdn_1m"].model.layer_pattern) == {"M", "D", "A"}
    assert matched["gdn_1m"].model.layer_pattern.count("M") == 1


def test_a_family_that_cannot_be_matched_is_named():
    data = read_yaml(CONFIGS / "tiny.yaml")
    data["matching"]["tolerance"] = 0.001  # gdn's closest is 0.35 % away
    with pytest.raises(ConfigError, match=r"families\.gdn .*matching\.tolerance"):
        matched_families(from_dict(ExperimentConfig, data))


def cache_bytes(letter, cache):
    def nbytes(x):
        return x.size * x.dtype.itemsize
    if letter == "A":  # keys and values; the rest is bookkeeping (mask, lengths)
        return nbytes(cache["key"]) + nbytes(cache["value"])
    return nbytes(cache["state"]) + nbytes(cache["conv"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_bytes_equal_the_caches_the_layers_keep(dtype):
    seq_len = 12
    config = tiny_model("MDSA", compute_dtype=dtype)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    # The caches' shapes and dtypes, as prefill makes them (traced, not run).
    _, caches = jax.eval_shape(
        lambda t: HybridLM(config, rngs=nnx.Rngs(1)).prefill(t, max_len=seq_len), tokens)
    measured = {letter: cache_bytes(letter, cache)
                for letter, cache in zip(config.layer_pattern, caches)}
    for letter, expected in measured.items():
        assert sizing.layer_state_bytes(config, letter, seq_len) == expected, letter
    totals = sizing.state_bytes(config, seq_len)
    assert totals["per_layer"] == measured
    assert totals["recurrent_total"] == measured["M"] + measured["D"] + measured["S"]
    assert totals["kv_cache_total"] == measured["A"]
    # The paper's 400M shapes: the Gated DeltaNet state is three times M²RNN's.
    paper = ModelConfig(compute_dtype="float32")
    ratio = (paper.gated_deltanet.num_heads * paper.gated_deltanet.key_dim
             * paper.gated_deltanet.value_dim) / (84 * 64 * 16)
    assert 3.0 < ratio < 3.1


# --- report -------------------------------------------------------------------------------

def synthetic_summaries(rng):
    summaries = []
    for family, pattern in (("m2rnn", "MAM"), ("gdn", "DAD"), ("gdn_1m", "MAD")):
        config = tiny_model(pattern)
        for seed in (0, 1):
            curve = [[t, float(rng.uniform(1, 3))] for t in (100, 200, 300)]
            summaries.append({
                "model": family, "label": family.upper(), "seed": seed,
                "layer_pattern": pattern, "parameters": int(rng.integers(40_000, 50_000)),
                "state_bytes": sizing.state_bytes(config, 32), "steps": 3,
                "tokens_trained": 300, "val_bits_per_byte": curve[-1][1],
                "tokens_per_s": float(rng.uniform(1e3, 1e4)), "curve": curve,
                "long_context": {"bucket_size": 8, "bucket_starts": [0, 8, 16, 24],
                                 "bits": rng.uniform(1, 3, 4).tolist(),
                                 "bits_within_train_length": float(rng.uniform(1, 3)),
                                 "bits_beyond_train_length": float(rng.uniform(1, 3))}})
    return summaries


def test_report_files_and_table_from_synthetic_runs(tmp_path):
    summaries = synthetic_summaries(np.random.default_rng(7))
    compare = [["m2rnn", "gdn"], ["gdn_1m", "gdn"]]
    paths = report.write_all(tmp_path, summaries, {"seeds": 2}, train_length=16,
                             compare=compare, complete=False)
    with open(paths["results.csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(summaries)
    for row, summary in zip(rows, summaries):
        assert row["model"] == summary["model"] and int(row["seed"]) == summary["seed"]
        assert float(row["val_bits_per_byte"]) == summary["val_bits_per_byte"]
        assert int(row["parameters"]) == summary["parameters"]
        per_layer = summary["state_bytes"]["per_layer"]
        for letter in "MDSA":
            assert row[f"state_bytes_{letter}"] == str(per_layer.get(letter, ""))
    saved = json.loads(pathlib.Path(paths["results.json"]).read_text())
    assert saved["complete"] is False and saved["runs"] == summaries
    for name in ("loss_vs_tokens.png", "loss_vs_position.png"):
        assert pathlib.Path(paths[name]).stat().st_size > 10_000

    values = {(s["model"], s["seed"]): s["val_bits_per_byte"] for s in summaries}
    a, b = [values["m2rnn", s] for s in (0, 1)], [values["gdn", s] for s in (0, 1)]
    first = saved["differences"][0]
    assert first["difference"] == pytest.approx(np.mean(a) - np.mean(b))
    assert first["spread_first"] == pytest.approx(abs(a[0] - a[1]) / 2)
    assert first["paired"] == pytest.approx([a[0] - b[0], a[1] - b[1]])
    table = report.summary_table(summaries, compare)
    assert f"{np.mean(a):.4f} ± {abs(a[0] - a[1]) / 2:.4f}" in table
    assert f"m2rnn − gdn: {np.mean(a) - np.mean(b):+.4f} bits/byte" in table
    assert "M:" in table and "D:" in table


# --- corpus -------------------------------------------------------------------------------

def write_package(root, name, files):
    for relative, content in files.items():
        path = root / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


@pytest.fixture
def packages(tmp_path):
    """Two synthetic packages with a duplicate inside one, one across both and an empty file;
    the manifest entries describe them as they are."""
    source = tmp_path / "site"
    alpha = {f"mod{i:02d}.py": f"x = {i}\n".encode() * (i + 1) for i in range(12)}
    alpha["copy.py"] = alpha["mod03.py"]
    alpha["sub/__init__.py"] = b""
    beta = {f"b{i}.py": f"def f{i}(): pass\n".encode() for i in range(6)}
    beta["same_as_alpha.py"] = alpha["mod05.py"]
    write_package(source, "alpha", alpha)
    write_package(source, "beta", beta)
    read = corpus.folder_sources(source)
    manifest = []
    for name in ("alpha", "beta"):
        entry = PackageSource(name=name, version="1.0", roots=(name,))
        files = read(entry)
        manifest.append(dataclasses.replace(entry, files=len(files),
                                            size=sum(len(c) for _, c in files),
                                            sha256=corpus.source_digest(files)))
    return source, tuple(manifest), read


def test_corpus_is_deduplicated_and_split_by_file(tmp_path, packages):
    source, manifest, read = packages
    built = corpus.prepare_corpus(tmp_path / "cache", ["beta", "alpha"], 0.25,
                                  manifest=manifest, read_sources=read, log=lambda *_: None)
    documents = corpus.read_cache(built.root)
    names = {split: [n for n, _ in docs] for split, docs in documents.items()}
    contents = [c for docs in documents.values() for _, c in docs]
    assert len(contents) == len(set(contents))  # no content twice, in or across the splits
    assert b"" not in contents
    originals = {f"{p.relative_to(source).parts[0]}/{p.relative_to(source).as_posix()}":
                 p.read_bytes() for p in source.rglob("*.py")}
    for split in documents:  # every document is one whole source file
        for name, content in documents[split]:
            assert originals[name] == content
    assert not set(names["train"]) & set(names["validation"])
    # 12 distinct non-empty files of alpha and 6 of beta; of each, every 4th from the 3rd
    # (indices 2, 6, 10 and 2) is held out.
    assert built.stats["duplicates"] == 2 and built.stats["empty"] == 1
    assert len(names["validation"]) == 4 and len(names["train"]) == 14
    assert {n.split("/")[0] for n in names["validation"]} == {"alpha", "beta"}
    assert built.sha256 == corpus.corpus_digest(documents)


def test_corpus_cache_is_reused_and_checked(tmp_path, packages):
    source, manifest, read = packages
    cache = tmp_path / "cache"
    built = corpus.prepare_corpus(cache, ["alpha", "beta"], 0.25, manifest=manifest,
                                  read_sources=read, log=lambda *_: None)

    def no_reading(entry):
        raise AssertionError("a verified cache must not read the packages")

    again = corpus.prepare_corpus(cache, ["alpha", "beta"], 0.25, built.sha256,
                                  manifest=manifest, read_sources=no_reading)
    assert again.sha256 == built.sha256
    # A changed byte in the cache: it does not verify and is rebuilt from the sources.
    victim = next((cache / "train").rglob("*.py"))
    original = victim.read_bytes()
    victim.write_bytes(b"#" + original[1:])
    messages = []
    rebuilt = corpus.prepare_corpus(cache, ["alpha", "beta"], 0.25, built.sha256,
                                    manifest=manifest, read_sources=read, log=messages.append)
    assert rebuilt.sha256 == built.sha256 and victim.read_bytes() == original
    assert any("does not verify" in m for m in messages)
    # Another expected corpus hash is an error naming the key.
    with pytest.raises(corpus.CorpusError, match="corpus.sha256"):
        corpus.prepare_corpus(tmp_path / "other", ["alpha", "beta"], 0.25, "0" * 64,
                              manifest=manifest, read_sources=read)


def test_a_changed_byte_in_a_package_is_named(tmp_path, packages):
    source, manifest, read = packages
    path = source / "beta" / "b2.py"
    content = path.read_bytes()
    path.write_bytes(content[:-2] + b"X" + content[-1:])
    with pytest.raises(corpus.CorpusError, match=r"corpus package beta 1\.0: its \.py sources"):
        corpus.prepare_corpus(tmp_path / "cache", ["alpha", "beta"], 0.25, manifest=manifest,
                              read_sources=read)
    assert not (tmp_path / "cache").exists()


def test_installed_packages_are_checked_against_the_manifest(tmp_path):
    chex = corpus.manifest_entry("chex")
    files = corpus.checked_sources(chex, corpus.installed_sources)
    assert len(files) == chex.files and sum(len(c) for _, c in files) == chex.size
    with pytest.raises(corpus.CorpusError, match="corpus package chex: installed version "
                                                 "0.1.92, the corpus manifest pins 9.9"):
        corpus.installed_sources(dataclasses.replace(chex, version="9.9"))
    with pytest.raises(ConfigError, match="not in the corpus manifest"):
        corpus.prepare_corpus(tmp_path, ["numpy"], 0.1)


def test_the_small_study_corpus_builds_to_its_configured_hash(tmp_path):
    config = load("small").corpus
    assert config.packages == [entry.name for entry in MANIFEST]
    built = corpus.prepare_corpus(tmp_path / "corpus", config.packages,
                                  config.validation_fraction, config.sha256,
                                  log=lambda *_: None)
    assert built.sha256 == config.sha256
    assert 20e6 < built.stats["train_bytes"] < 30e6


# --- long context -------------------------------------------------------------------------

def test_position_losses_match_a_float64_computation():
    config = tiny_model("MAM")
    model = HybridLM(config, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(4)
    documents = [rng.integers(0, 256, size).astype(np.uint8) for size in (40, 10, 33, 80, 20)]
    windows = long_context.long_windows(documents, 32, count=3)
    assert windows.shape == (3, 33)
    eligible = [d for d in documents if d.size >= 33]
    assert [list(w) for w in windows] == [list(d[:33]) for d in eligible]

    losses = long_context.position_losses(model, windows, batch_size=2)  # pads the last batch
    reference = np.zeros(32)
    forward = nnx.jit(lambda m, tokens: m(tokens))  # one window at a time, unpadded
    for window in windows:
        logits = np.asarray(forward(model, jnp.asarray(window[None, :-1])), np.float64)[0]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        reference -= log_probs[np.arange(32), window[1:]]
    np.testing.assert_allclose(losses, reference / len(windows), rtol=1e-5)

    starts, means = long_context.bucket_means(losses, 10)
    assert starts.tolist() == [0, 10, 20, 30]
    np.testing.assert_allclose(means, [losses[s:s + 10].mean() for s in (0, 10, 20, 30)])
    with pytest.raises(ConfigError, match="no validation document has 81 bytes"):
        long_context.long_windows(documents, 80, count=3)


# --- the command --------------------------------------------------------------------------

class StepClock:
    """A clock that advances one second per reading: the time budget's stop lands at a known
    step without measuring time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def test_tiny_config_stop_resume_and_skip(tmp_path, capsys, monkeypatch):
    """Two of the five families: a run stopped by the time budget resumes, the finished ones
    are reported (the rest named as unfinished) and skipped when the command runs again, and a
    run that exists under other settings is refused in one line."""
    out = tmp_path / "compare"
    args = ["--config", str(CONFIGS / "tiny.yaml"), "--out", str(out), "--no-progress",
            "--models", "m2rnn,gdn"]
    # Readings: start 1, before the first run 2, after its steps 3, 4 >= 1 + 2.5: the first run
    # stops after step 2 (with a checkpoint) and the other does not start.
    monkeypatch.setattr(cli, "_clock", StepClock())
    assert cli.main(args + ["--time-budget-s", "2.5"]) == 0
    text = capsys.readouterr().out
    assert "Stopped by the time budget (--time-budget-s 2.5) at step 2/4" in text
    assert text.count("not started (stopped by the time budget") == 1
    assert not (out / "results.csv").exists()

    monkeypatch.setattr(cli, "_clock", StepClock())
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "Resuming from step 2" in text and text.count(": training 4 steps") == 2
    assert "3 of 5 runs are not finished (mamba2_seed0, gdn_1m_seed0, attention_seed0)" in text
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == ["m2rnn", "gdn"]
    for row in rows:
        assert math.isfinite(float(row["val_bits_per_byte"]))
        assert math.isfinite(float(row["bits_beyond_train_length"]))
        assert int(row["tokens_trained"]) == 4 * 4 * 32
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is False
    assert len(saved["runs"][0]["long_context"]["bits"]) == 8  # 256 positions / 32
    for name in report.FILES:
        assert (out / name).stat().st_size > 0
    first_csv = (out / "results.csv").read_text()

    assert cli.main(args) == 0  # both finished: skipped, the same results
    text = capsys.readouterr().out
    assert text.count("; skipped") == 2 and "training" not in text
    assert (out / "results.csv").read_text() == first_csv

    # Other settings for a run that exists: one line naming the difference, nothing changed.
    status = cli.main(args + ["--models", "m2rnn", "--set", "train.optimizer.learning_rate=0.01"])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("m2rnn-compare: error: ") and "\n" not in error
    assert "optimizer.learning_rate was 0.003" in error and "--restart" in error


@pytest.mark.slow
def test_tiny_config_trains_every_family_into_the_report(tmp_path, capsys):
    """Every family of the smoke config trains and lands in a complete report."""
    out = tmp_path / "compare"
    assert cli.main(["--config", str(CONFIGS / "tiny.yaml"), "--out", str(out),
                     "--no-progress"]) == 0
    assert capsys.readouterr().out.count(": training 4 steps") == 5
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == ["m2rnn", "gdn", "mamba2", "gdn_1m", "attention"]
    for row in rows:
        assert math.isfinite(float(row["val_bits_per_byte"]))
        assert math.isfinite(float(row["bits_beyond_train_length"]))
        assert int(row["tokens_trained"]) == 4 * 4 * 32
    for name in report.FILES:
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True
    assert len(saved["runs"][0]["long_context"]["bits"]) == 8  # 256 positions / 32


def test_restart_moves_the_selected_runs_and_results_aside(tmp_path):
    out = tmp_path / "compare"
    for name in ("m2rnn_seed0", "gdn_seed0"):
        (out / "runs" / name).mkdir(parents=True)
        (out / "runs" / name / "metrics.jsonl").write_text("{}\n")
    (out / "results.csv").write_text("model\n")
    moved = cli.move_aside(out, ["m2rnn_seed0", "mamba2_seed0"])
    assert (moved / "runs" / "m2rnn_seed0" / "metrics.jsonl").exists()
    assert (moved / "results.csv").exists() and not (out / "results.csv").exists()
    assert (out / "runs" / "gdn_seed0" / "metrics.jsonl").exists()  # not selected: kept
    assert cli.move_aside(out, ["m2rnn_seed0"]) is None  # nothing left to move


def test_config_errors_are_one_line(tmp_path, capsys):
    data = read_yaml(CONFIGS / "tiny.yaml")
    data["train"]["data"]["paths"] = ["somewhere"]
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(data))
    assert cli.main(["--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "train.data.paths is set by the corpus section" in capsys.readouterr().err
    assert cli.main(["--config", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "o"),
                     "--models", "m2rnn,lstm"]) == 2
    assert "--models lists 'lstm'" in capsys.readouterr().err
