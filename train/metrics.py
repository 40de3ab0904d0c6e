"""Watching a run: metrics JSONL, a tqdm progress bar and a PNG of the loss curves."""

import json
import math
import pathlib

from train.run_folder import write_atomically

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends one JSON object per line to ``<out>/metrics.jsonl``.

    Records are ``{"kind": "train" | "eval", "step": int, ...}``. On resume, records past the
    resumed step (written after the checkpoint by the interrupted run) are dropped, so the file
    reads like one uninterrupted run; so is a line cut short by a crash while it was written
    (with a warning). The file is rewritten whole or not at all.
    """

    def __init__(self, out_dir, *, resume_step=None, enabled=True, log=print):
        self.path = pathlib.Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_records(self.path, log=log) if r["step"] <= resume_step]
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, kind: str, step: int, **values):
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step)}
        record.update({k: _plain(v) for k, v in values.items()})
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(out_dir, *, log=print) -> list:
    return read_records(pathlib.Path(out_dir) / METRICS_FILE, log=log)


def read_records(path, *, log=print) -> list:
    """The records of a metrics file; a line that is not a whole record (the last one, cut
    short by a crash, as a rule) is dropped with a warning."""
    records = []
    for number, line in enumerate(pathlib.Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["step"] = int(record["step"])
        except (ValueError, TypeError, KeyError):
            log(f"WARNING: {path} line {number} is not a whole record (cut short when a run "
                f"stopped?); dropping it: {line[:80]!r}")
            continue
        records.append(record)
    return records


def plot_losses(out_dir, *, unigram_bits=None, bits_label="bits per byte") -> pathlib.Path:
    """Training and validation loss (in bits) against step, saved as ``<out>/loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir)
    train = [(r["step"], r["loss"] / math.log(2)) for r in records
             if r["kind"] == "train" and isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["val_bits"]) for r in records
             if r["kind"] == "eval" and isinstance(r.get("val_bits"), float)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation", markersize=3)
    if unigram_bits is not None:
        ax.axhline(unigram_bits, color="gray", linestyle="--",
                   label=f"unigram model ({unigram_bits:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel(bits_label)
    ax.set_title("m2rnn-train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = pathlib.Path(out_dir) / PLOT_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class Progress:
    """A tqdm bar over steps showing loss, tokens/s and learning rate (tqdm adds the ETA)."""

    def __init__(self, start: int, total: int, *, enabled=True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def advance(self, steps=1):
        if self._bar is not None:
            self._bar.update(steps)

    def show(self, **values):
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def write(self, message: str):
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
