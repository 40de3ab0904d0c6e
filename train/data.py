"""Training data: documents → packed fixed-length rows with segment ids → seeded grain batches.

Sources (``data.source``):
  * ``stdlib`` — byte-level LM (token = UTF-8 byte) on the ``*.py`` files of the running
    Python's standard library (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded),
    sorted, so the corpus is the same on every run of the same Python.
  * ``text`` — UTF-8 text files or folders (every file under a folder, sorted), byte tokens.
  * ``tokens`` — pre-tokenized NumPy files: a ``.npy`` holding a 1-D integer array is one
    document; a ``.npz`` with ``tokens`` (1-D) and ``lengths`` (1-D, summing to len(tokens))
    holds several.

Validation is held out by file: every ``k``-th file of the sorted list (k ≈ 1 / fraction), or the
files of ``data.validation_paths`` when given.

A row holds ``seq_len + 1`` consecutive tokens of the concatenated (document-shuffled) stream;
row ``i`` starts at token ``i * seq_len``, so its last token is the first of row ``i + 1`` and
every token is a target exactly once. ``segment_ids`` number the documents within a row from 1
(0 marks padding); the model resets its state where they change and the loss skips targets
that start a new document.
"""

import dataclasses
import pathlib
import sysconfig
import zipfile
import zlib

import numpy as np

from m2rnn_jax.typed_config import ConfigError
from train.errors import UserError

BYTE_VOCAB_SIZE = 256
TOKEN_FILE_SUFFIXES = (".npy", ".npz")
# How each kind of token file starts: NumPy's array header, a zip archive's first entry.
_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK\x03\x04"}


class DataError(UserError, ValueError):
    """A data file cannot be used (wrong format, empty split)."""


@dataclasses.dataclass
class Corpus:
    """Documents (1-D integer arrays) of the train and validation splits."""

    train: list
    validation: list
    description: str
    byte_level: bool  # tokens are UTF-8 bytes, so bits per token = bits per byte

    @property
    def max_token(self) -> int:
        return max(int(doc.max()) for doc in self.train + self.validation if doc.size)


def stdlib_python_files() -> list:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.relative_to(root).parts and p.is_file())


def expand_paths(paths, key: str) -> list:
    """Files named in ``paths`` plus every file under the folders there, sorted per entry."""
    files = []
    for entry in paths:
        path = pathlib.Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            if not found:
                raise ConfigError(f"{key}: folder {entry!r} holds no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{key}: {entry!r} is neither a file nor a folder")
    return files


def read_bytes(path) -> np.ndarray:
    return np.frombuffer(pathlib.Path(path).read_bytes(), dtype=np.uint8)


def read_token_documents(path) -> list:
    path = pathlib.Path(path)
    if path.suffix not in TOKEN_FILE_SUFFIXES:
        raise DataError(f"token file {path} must end in {' or '.join(TOKEN_FILE_SUFFIXES)}")
    with open(path, "rb") as fh:
        start = fh.read(len(_MAGIC[path.suffix]))
    if start != _MAGIC[path.suffix]:
        # (np.load would call it "pickled data", whatever it holds.)
        raise DataError(f"token file {path} is not a NumPy {path.suffix} file: it does not "
                        f"start with the {path.suffix} format's header")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise DataError(f"token file {path} cannot be read as {path.suffix} (cut short or "
                        f"damaged?): {err}") from err
    if path.suffix == ".npy":
        return [_check_tokens(loaded, path)]
    try:
        with loaded as archive:
            if "tokens" not in archive or "lengths" not in archive:
                raise DataError(f"token file {path} must hold arrays 'tokens' and 'lengths', "
                                f"has {sorted(archive.keys())}")
            tokens = _check_tokens(archive["tokens"], path)
            lengths = np.asarray(archive["lengths"])
    except DataError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise DataError(f"token file {path}: an array of the .npz archive cannot be read "
                        f"({err})") from err
    if lengths.ndim != 1 or np.any(lengths < 0) or int(lengths.sum()) != tokens.size:
        raise DataError(f"token file {path}: 'lengths' must be non-negative and sum to "
                        f"len(tokens) = {tokens.size}")
    return np.split(tokens, np.cumsum(lengths)[:-1])


def _check_tokens(tokens, path):
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"token file {path} must hold a 1-D integer array, got "
                         f"{tokens.dtype} of shape {tokens.shape}")
    if tokens.size and tokens.min() < 0:
        raise DataError(f"token file {path} holds negative token ids")
    return tokens


def split_by_file(files, fraction: float):
    """(train, validation): every k-th file (k = round(1/fraction)) is held out."""
    if len(files) < 2:
        raise ConfigError("data.validation_fraction needs at least 2 files to hold out a file, "
                          f"found {len(files)}; give data.validation_paths instead")
    if not 0 < fraction < 1:
        raise ConfigError(f"data.validation_fraction must lie in (0, 1), got {fraction}")
    step = max(2, round(1 / fraction))
    held_out = set(range(step // 2, len(files), step)) or {len(files) - 1}
    train = [f for i, f in enumerate(files) if i not in held_out]
    validation = [f for i, f in enumerate(files) if i in held_out]
    return train, validation


def load_corpus(data_config) -> Corpus:
    """Reads the documents named by a ``DataConfig``."""
    source = data_config.source
    if source == "stdlib":
        if data_config.paths:
            raise ConfigError("data.paths must be empty for data.source = 'stdlib'")
        files = stdlib_python_files()
        root = sysconfig.get_paths()["stdlib"]
        label = f"Python standard library sources ({root})"
    else:
        if not data_config.paths:
            raise ConfigError(f"data.paths must name files or folders for data.source = {source!r}")
        files = expand_paths(data_config.paths, "data.paths")
        label = f"{source} files from {', '.join(data_config.paths)}"
    if data_config.validation_paths:
        train_files = files
        validation_files = expand_paths(data_config.validation_paths, "data.validation_paths")
    else:
        train_files, validation_files = split_by_file(files, data_config.validation_fraction)

    if source == "tokens":
        def read(paths):
            return [doc for p in paths for doc in read_token_documents(p)]
    else:
        def read(paths):
            return [read_bytes(p) for p in paths]
    train, validation = read(train_files), read(validation_files)
    train = [d for d in train if d.size]
    validation = [d for d in validation if d.size]
    if not train or not validation:
        raise DataError(f"{label}: the train or validation split is empty")
    description = (f"{label}: {len(train_files)} train files ({_size(train)}), "
                   f"{len(validation_files)} validation files ({_size(validation)})")
    return Corpus(train, validation, description, byte_level=source != "tokens")


def _size(docs) -> str:
    return f"{sum(d.size for d in docs) / 1e6:.2f}M tokens"


class PackedRows:
    """Random-access rows of ``seq_len + 1`` tokens over the concatenated documents.

    Documents are concatenated in an order shuffled by ``seed`` (``None``: as given). Element
    ``i`` is ``{"tokens": int32 (seq_len+1,), "segment_ids": int32 (seq_len+1,)}``.
    """

    def __init__(self, documents, seq_len: int, seed=None):
        if seq_len < 1:
            raise ConfigError(f"data.seq_len must be positive, got {seq_len}")
        order = np.arange(len(documents))
        if seed is not None:
            order = np.random.default_rng(seed).permutation(len(documents))
        docs = [documents[i] for i in order]
        dtype = np.uint8 if all(d.dtype == np.uint8 for d in docs) else np.int32
        self._tokens = np.concatenate([d.astype(dtype, copy=False) for d in docs])
        # Offsets where each document starts; the document of position p is
        # searchsorted(starts, p, 'right') - 1.
        self._starts = np.cumsum([0] + [d.size for d in docs[:-1]])
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (self._tokens.size - 1) // self.seq_len)

    @property
    def num_tokens(self) -> int:
        return self._tokens.size

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        start = index * self.seq_len
        positions = np.arange(start, start + self.seq_len + 1)
        documents = np.searchsorted(self._starts, positions, side="right")
        return {"tokens": self._tokens[positions].astype(np.int32),
                "segment_ids": (documents - documents[0] + 1).astype(np.int32)}


def model_inputs(tokens, segment_ids):
    """Splits rows of ``seq_len + 1`` into (inputs, segment_ids, targets, loss mask).

    A target counts when it belongs to the same (non-padding) document as its input: the first
    token of a document cannot be predicted from the previous document.
    """
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    in_segments, out_segments = segment_ids[..., :-1], segment_ids[..., 1:]
    mask = (in_segments == out_segments) & (out_segments > 0)
    return inputs, in_segments, targets, mask


def train_iterator(rows: PackedRows, batch_size: int, seed: int, *, process_index=0,
                   process_count=1):
    """A grain iterator of batches ``{"tokens", "segment_ids"}: (batch_size/process_count, S+1)``.

    Rows are reshuffled every epoch (seeded). Each process reads its own rows of every global
    batch. ``iterator.get_state()`` / ``set_state()`` give and take the position.
    """
    import grain  # here, not at the top: model_inputs is used where grain is absent (GPU bench)

    if len(rows) < batch_size:
        raise ConfigError(f"data.batch_size = {batch_size} rows but the training split packs "
                          f"into only {len(rows)} rows of data.seq_len = {rows.seq_len}")
    if batch_size % process_count:
        raise ConfigError(f"data.batch_size = {batch_size} must be divisible by the number of "
                          f"processes ({process_count})")
    dataset = grain.MapDataset.source(rows).shuffle(seed=seed % 2**32).repeat()
    if process_count > 1:
        dataset = dataset[process_index::process_count]
    dataset = dataset.batch(batch_size // process_count, drop_remainder=True)
    # Rows are sliced from memory: no reader threads needed (jit dispatch is async anyway).
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def validation_batches(rows: PackedRows, num_rows: int, batch_size: int) -> list:
    """Fixed validation batches: ``num_rows`` rows spread evenly over the split, padded with
    empty rows (segment id 0, no loss) to whole batches. ``num_rows = 0`` takes every row."""
    count = len(rows) if num_rows <= 0 else min(num_rows, len(rows))
    if count == 0:
        raise ConfigError("the validation split is shorter than one row of data.seq_len = "
                          f"{rows.seq_len}")
    indices = np.unique(np.linspace(0, len(rows) - 1, count).round().astype(int))
    picked = [rows[int(i)] for i in indices]
    padded = -len(picked) % batch_size
    empty = {"tokens": np.zeros(rows.seq_len + 1, np.int32),
             "segment_ids": np.zeros(rows.seq_len + 1, np.int32)}
    picked += [empty] * padded
    return [{key: np.stack([r[key] for r in picked[i:i + batch_size]]) for key in empty}
            for i in range(0, len(picked), batch_size)]


def unigram_bits_per_token(batches) -> float:
    """Entropy (bits) of the targets' empirical token distribution: the loss of the best
    unigram model of exactly the evaluated targets (a lower bound for any unigram model)."""
    counts = {}
    for batch in batches:
        _, _, targets, mask = model_inputs(batch["tokens"], batch["segment_ids"])
        values, value_counts = np.unique(targets[mask], return_counts=True)
        for v, c in zip(values.tolist(), value_counts.tolist()):
            counts[v] = counts.get(v, 0) + c
    total = sum(counts.values())
    probs = np.array(list(counts.values()), np.float64) / total
    return float(-(probs * np.log2(probs)).sum())


def corpus_fingerprint(corpus: Corpus) -> int:
    """A checksum of the documents, stored with checkpoints to notice a changed corpus."""
    crc = 0
    for doc in corpus.train + corpus.validation:
        crc = zlib.crc32(np.ascontiguousarray(doc).tobytes(), crc)
    return crc
