"""The command-line tools end a user error with one line ``prog: error: ...`` on stderr and a
non-zero status (2: the command line, the config or the data; 1: a run or checkpoint that
cannot be used), with no traceback unless ``--debug``, and create nothing under ``--out``
before the config and the data are known to be good."""

import pathlib
import shutil
import subprocess
import sysconfig

import numpy as np
import pytest
import yaml

from m2rnn_experiments.state_tracking import cli as state_tracking_cli
from m2rnn_jax.typed_config import ConfigError
from test_train_checkpoint import random_state
from train import cli, generate_cli
from train.checkpointing import Checkpointer

TINY_MODEL = {"vocab_size": 256, "d_model": 32, "layer_pattern": "A",
              "attention": {"num_heads": 2}, "mlp": {"hidden_dim": 64}}


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text("hello world, " * 50 + str(i))
    return folder


def train_config(tmp_path, corpus, **sections):
    config = {"steps": 2, "model": TINY_MODEL,
              "data": {"source": "text", "paths": [str(corpus)], "validation_fraction": 0.25,
                       "seq_len": 16, "batch_size": 8, "eval_rows": 8},
              "mesh": {"data": -1}, "logging": {"progress_bar": False, "plot": False}}
    config.update(sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_line_error(capsys, prog):
    """The error line of ``prog`` (the last line on stderr; no traceback before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"{prog}: error: "), err
    assert sum(line.startswith(f"{prog}:") for line in lines) == 1, err
    return lines[-1]


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_config, message", [
    (lambda tmp: tmp, "is a folder"),
    (lambda tmp: write(tmp / "bad.yaml", "steps: [1, 2\nmodel: {"), "is not valid YAML (line 2"),
    (lambda tmp: write(tmp / "empty.yaml", "# nothing yet\n"), "is empty: it must at least "
                                                              "describe the model"),
    (lambda tmp: write(tmp / "steps.yaml", "steps: 5\n"), "add a 'model' section"),
    (lambda tmp: tmp / "missing.yaml", "does not exist"),
])
def test_train_config_file_errors(tmp_path, capsys, make_config, message):
    out = tmp_path / "out"
    status = cli.main(["--config", str(make_config(tmp_path)), "--out", str(out)])
    assert status == 2 and message in one_line_error(capsys, "m2rnn-train")
    assert not out.exists()


def test_train_errors_found_before_any_work_leave_no_folder(tmp_path, corpus, capsys):
    config = train_config(tmp_path, corpus)
    out = tmp_path / "out"
    cases = [
        (["model.layer_pattern=MXA"], "model.layer_pattern 'MXA': layer_pattern letter 'X' has "
                                      "no registered mixer"),
        ([f"data.paths=[{tmp_path / 'nope'}]"], "is neither a file nor a folder"),
        (["data.batch_size=4096"], "data.batch_size = 4096 rows"),
        (["mesh.tensor=3"], "mesh"),
    ]
    for overrides, message in cases:
        status = cli.main(["--config", str(config), "--out", str(out), *overrides])
        assert status == 2 and message in one_line_error(capsys, "m2rnn-train"), overrides
        assert not out.exists(), overrides


def test_a_model_the_mesh_cannot_split_is_one_line(tmp_path, capsys):
    """8 simulated devices: layouts whose axes do not divide the model's heads, experts or
    sequence, and a dry run of an unknown letter, fail in one line before any work."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    config = str(repo / "configs" / "tiny_moe.yaml")
    out = tmp_path / "out"
    cases = [
        (["mesh.data=1", "mesh.tensor=8"], "does not fit the mesh"),
        (["mesh.data=1", "mesh.expert=8", "model.moe.num_experts=12"], "does not fit the mesh"),
        (["mesh.data=1", "mesh.context=8", "data.seq_len=16"], "shorter than the conv window"),
    ]
    for overrides, message in cases:
        status = cli.main(["--config", config, "--out", str(out), *overrides])
        assert status == 2 and message in one_line_error(capsys, "m2rnn-train"), overrides
        assert not out.exists(), overrides
    status = cli.main(["--config", config, "--dry-run", "model.layer_pattern=MQM"])
    assert status == 2 and "no registered mixer" in one_line_error(capsys, "m2rnn-train")


def test_garbage_token_files_are_named(tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "a.npy").write_bytes(b"garbage, not an array")
    np.save(tokens / "b.npy", np.arange(100, dtype=np.int32))
    config = train_config(tmp_path, tokens)
    out = tmp_path / "out"
    status = cli.main(["--config", str(config), "--out", str(out), "data.source=tokens"])
    line = one_line_error(capsys, "m2rnn-train")
    assert status == 2 and f"{tokens / 'a.npy'} is not a NumPy .npy file" in line
    assert "pickle" not in line and not out.exists()
    np.save(tokens / "a.npy", np.arange(100, dtype=np.int32)[:, None])
    (tokens / "c.npy").write_bytes((tokens / "b.npy").read_bytes()[:140])  # cut short
    for name, message in (("a.npy", "must hold a 1-D integer array"), ("c.npy", "cut short")):
        status = cli.main(["--config", str(config), "--out", str(out), "data.source=tokens",
                           f"data.paths=[{tokens / name}, {tokens / 'b.npy'}]"])
        assert status == 2 and message in one_line_error(capsys, "m2rnn-train")


def test_unusable_out_folders(tmp_path, corpus, capsys):
    config = train_config(tmp_path, corpus)
    a_file = write(tmp_path / "a_file", "x")
    for out, message in ((a_file, "is a file, not a folder"),
                         (a_file / "run", "a_file is a file"),
                         ("/proc/m2rnn-train-run", "cannot be written")):
        status = cli.main(["--config", str(config), "--out", str(out)])
        assert status == 2 and message in one_line_error(capsys, "m2rnn-train"), out


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is a folder"):
        cli.main(["--config", str(tmp_path), "--out", str(tmp_path / "out"), "--debug"])


def test_installed_train_command_prints_one_line(tmp_path):
    script = shutil.which("m2rnn-train", path=sysconfig.get_path("scripts"))
    assert script, f"m2rnn-train is not installed in {sysconfig.get_path('scripts')}"
    bad = write(tmp_path / "bad.yaml", "model: [\n")
    done = subprocess.run([script, "--config", str(bad), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("m2rnn-train: error: config file")
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


@pytest.fixture
def unusable_run(tmp_path):
    """A run folder whose only checkpoint holds no model config."""
    checkpointer = Checkpointer(tmp_path / "run", log=lambda *_: None)
    checkpointer.save(1, random_state(1), {}, {"steps": 1})
    checkpointer.wait()
    checkpointer.close()
    return tmp_path / "run"


def test_generate_errors(tmp_path, unusable_run, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], 1, "checkpoints does not exist"),
        (["--checkpoint", str(tmp_path / "empty")], 1, "can be restored (none saved yet)"),
        (["--checkpoint", str(unusable_run), "--step", "7"], 1, "no checkpoint of step 7"),
        (["--checkpoint", str(unusable_run)], 1, "step 1: KeyError"),
        (["--checkpoint", str(unusable_run), "--prompt", "a\udcff"], 2,
         "--prompt is not valid UTF-8"),
        (["--checkpoint", str(unusable_run), "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ]
    for argv, expected, message in cases:
        argv = argv if "--prompt" in argv else [*argv, "--prompt", "x"]
        status = generate_cli.main(argv)
        assert status == expected and message in one_line_error(capsys, "m2rnn-generate"), argv


@pytest.mark.parametrize("argv, message", [
    (["--config", "nope.yaml"], "config file nope.yaml does not exist"),
    (["--set", "train.stepz=3"], "unknown config key: train.stepz"),
    (["--models", "nope"], "run lists model 'nope'"),
    (["--eval-lens", "a,b"], "--eval-lens must be comma-separated integers"),
    (["--group", "Q7"], "task.group: group must be"),
    (["--set", "models.m2rnn.layer_pattern=MX"], "models.m2rnn.layer_pattern 'MX'"),
])
def test_state_tracking_config_errors(tmp_path, capsys, argv, message):
    status = state_tracking_cli.main([*argv, "--out", str(tmp_path / "out")])
    assert status == 2 and message in one_line_error(capsys, "m2rnn-state-tracking")
    assert not (tmp_path / "out").exists()


def test_state_tracking_malformed_yaml(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "task: {group: S3\n")
    status = state_tracking_cli.main(["--config", str(bad), "--out", str(tmp_path / "out")])
    assert status == 2 and "is not valid YAML" in one_line_error(capsys, "m2rnn-state-tracking")
