"""The byte-level corpus of the comparison: the Python sources of the pinned JAX stack.

The corpus is defined by ``manifest.MANIFEST``: for each package its version and the folders
whose ``.py`` files are taken (as its installed ``RECORD`` lists them), with the number, size
and SHA-256 of those files. Every machine with the pinned versions installs the same wheels, so
the same bytes; the standard library and NumPy are left out because their sources differ
between Python and NumPy releases.

Building (``prepare_corpus``):

1. each selected package is checked against the manifest — installed version, then the
   SHA-256 of its sources — and a difference is a one-line ``CorpusError`` naming the package;
2. files whose bytes equal an earlier file's (exact content hash, packages in manifest order,
   paths sorted) and empty files are dropped;
3. within each package every ``k``-th remaining file (``k = round(1 / validation_fraction)``,
   sorted paths, from the ``k // 2``-th) is held out for validation;
4. the documents are written under ``<cache>/train/<package>/<path>`` and
   ``<cache>/validation/...`` (``data.source: text`` reads them) with ``corpus.json``, which
   records the SHA-256 of the whole corpus (``corpus_digest``).

A cache folder whose files still hash to the recorded value, and whose value is the one the
config expects, is reused without reading the packages; otherwise the corpus is rebuilt. When
the config gives ``corpus.sha256`` the built corpus must match it before any training.

``python -m m2rnn_experiments.lm_comparison.corpus --out DIR`` builds (or checks) a corpus by
itself; ``--measure`` prints the manifest entries of the installed packages (to update the
manifest after a version change).
"""

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import sys

from m2rnn_experiments.lm_comparison.manifest import MANIFEST, PackageSource
from m2rnn_jax.typed_config import ConfigError
from train.errors import UserError

RECORD_FILE = "corpus.json"
FORMAT = 1
SPLITS = ("train", "validation")


class CorpusError(UserError):
    """The corpus cannot be built as the manifest defines it (a package differs)."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A built corpus on disk: the folders ``data.paths`` / ``data.validation_paths`` name."""

    root: pathlib.Path
    sha256: str
    stats: dict  # packages, files, duplicates, documents and bytes per split

    @property
    def train_dir(self) -> pathlib.Path:
        return self.root / "train"

    @property
    def validation_dir(self) -> pathlib.Path:
        return self.root / "validation"

    def describe(self) -> str:
        s = self.stats
        return (f"corpus {self.root}: {', '.join(s['packages'])}; "
                f"{s['train_documents']} train files ({s['train_bytes'] / 1e6:.2f} MB), "
                f"{s['validation_documents']} validation files "
                f"({s['validation_bytes'] / 1e6:.2f} MB), {s['duplicates']} duplicate and "
                f"{s['empty']} empty files dropped; SHA-256 {self.sha256[:16]}…")


def manifest_entry(name, manifest=MANIFEST) -> PackageSource:
    for entry in manifest:
        if entry.name == name:
            return entry
    raise ConfigError(f"corpus.packages: {name!r} is not in the corpus manifest (known: "
                      f"{', '.join(e.name for e in manifest)})")


def _framed(digest, name: str, content: bytes):
    """Adds one named file to ``digest``; the framing keeps file boundaries unambiguous."""
    digest.update(name.encode() + b"\0" + str(len(content)).encode() + b"\0")
    digest.update(content)


def source_digest(files) -> str:
    """SHA-256 of a package's ``[(relative path, bytes)]`` in the given (sorted) order."""
    digest = hashlib.sha256()
    for name, content in files:
        _framed(digest, name, content)
    return digest.hexdigest()


def corpus_digest(documents) -> str:
    """SHA-256 of ``{"train": [(name, bytes)], "validation": [...]}`` — the built corpus."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for name, content in documents[split]:
            _framed(digest, f"{split}/{name}", content)
    return digest.hexdigest()


def _wheel_tags(distribution) -> str:
    text = distribution.read_text("WHEEL") or ""
    return ",".join(line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.startswith("Tag:"))


def installed_sources(entry: PackageSource):
    """``[(path, bytes)]`` of the installed package's ``.py`` files under ``entry.roots``
    (paths relative to site-packages, sorted), after checking its version."""
    try:
        distribution = importlib.metadata.distribution(entry.name)
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError(f"corpus package {entry.name} {entry.version} is not installed "
                          f"(pip install {entry.name}=={entry.version})") from None
    if distribution.version != entry.version:
        raise CorpusError(f"corpus package {entry.name}: installed version "
                          f"{distribution.version}, the corpus manifest pins {entry.version} "
                          f"(pip install {entry.name}=={entry.version})")
    files = []
    for path in distribution.files or ():
        posix = path.as_posix()
        if (posix.endswith(".py") and "__pycache__" not in path.parts
                and any(posix.startswith(root + "/") for root in entry.roots)):
            located = pathlib.Path(distribution.locate_file(path))
            try:
                files.append((posix, located.read_bytes()))
            except OSError as err:
                raise CorpusError(f"corpus package {entry.name} {entry.version}: {posix} cannot "
                                  f"be read ({err.strerror}); reinstall it") from err
    return sorted(files)


def folder_sources(folder):
    """A ``read_sources`` for packages laid out as ``<folder>/<root>/...`` (tests, or sources
    copied from another machine): ``.py`` files under each root, sorted."""
    folder = pathlib.Path(folder)

    def read(entry: PackageSource):
        files = []
        for root in entry.roots:
            for path in (folder / root).rglob("*.py"):
                if path.is_file() and "__pycache__" not in path.parts:
                    files.append((path.relative_to(folder).as_posix(), path.read_bytes()))
        return sorted(files)
    return read


def checked_sources(entry: PackageSource, read_sources):
    """The package's files, ``CorpusError`` naming it unless they are the manifest's."""
    files = read_sources(entry)
    size = sum(len(content) for _, content in files)
    digest = source_digest(files)
    if digest != entry.sha256:
        build = ""
        if entry.wheel_tag is not None:
            build = (f"; this build is {installed_wheel_tag(entry.name) or 'unknown'}, the "
                     f"manifest's {entry.wheel_tag}")
        raise CorpusError(
            f"corpus package {entry.name} {entry.version}: its .py sources ({len(files)} files, "
            f"{size:,} bytes, SHA-256 {digest[:12]}) differ from the corpus manifest's "
            f"({entry.files} files, {entry.size:,} bytes, SHA-256 {entry.sha256[:12]}){build}; "
            f"the corpus would differ from other machines' — reinstall "
            f"{entry.name}=={entry.version}")
    return files


def installed_wheel_tag(name):
    try:
        return _wheel_tags(importlib.metadata.distribution(name))
    except importlib.metadata.PackageNotFoundError:
        return None


def split_documents(package_files, validation_fraction: float):
    """Dedup and split: ``package_files`` is ``[(package name, [(path, bytes)])]`` in manifest
    order. Returns ``({"train": [(name, bytes)], "validation": [...]}, stats)``."""
    if not 0 < validation_fraction < 1:
        raise ConfigError(f"corpus.validation_fraction must lie in (0, 1), got "
                          f"{validation_fraction!r}")
    every = max(2, round(1 / validation_fraction))
    seen = set()
    documents = {split: [] for split in SPLITS}
    duplicates = empty = 0
    for package, files in package_files:
        kept = []
        for path, content in files:
            if not content:
                empty += 1
                continue
            key = hashlib.sha256(content).digest()
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            kept.append((f"{package}/{path}", content))
        for index, document in enumerate(kept):
            split = "validation" if index % every == every // 2 else "train"
            documents[split].append(document)
    for split in SPLITS:
        if not documents[split]:
            raise ConfigError(f"corpus: the {split} split is empty (too few files for "
                              f"corpus.validation_fraction = {validation_fraction}); add "
                              f"packages to corpus.packages")
    stats = {"packages": [package for package, _ in package_files],
             "files": sum(len(files) for _, files in package_files),
             "duplicates": duplicates, "empty": empty, "validation_fraction": validation_fraction}
    for split in SPLITS:
        stats[f"{split}_documents"] = len(documents[split])
        stats[f"{split}_bytes"] = sum(len(content) for _, content in documents[split])
    return documents, stats


def read_cache(root):
    """``{"train": [(name, bytes)], ...}`` of a cache folder, in the order it was built."""
    root = pathlib.Path(root)
    documents = {}
    for split in SPLITS:
        base = root / split
        names = sorted((p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()),
                       key=_order_key)
        documents[split] = [(name, (base / name).read_bytes()) for name in names]
    return documents


def cached_corpus(root, expected_sha256=None, *, selection=None):
    """The ``Corpus`` in ``root`` when its files still hash to the recorded SHA-256 (and to
    ``expected_sha256`` and ``selection`` when given); ``None`` otherwise."""
    root = pathlib.Path(root)
    try:
        record = json.loads((root / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("format") != FORMAT or (selection is not None
                                          and record.get("selection") != selection):
        return None
    if expected_sha256 is not None and record.get("sha256") != expected_sha256:
        return None
    if corpus_digest(read_cache(root)) != record.get("sha256"):
        return None
    return Corpus(root=root, sha256=record["sha256"], stats=record["stats"])


def _order_key(name: str):
    """Paths in the order of their parts (as ``pathlib`` sorts them, so as the trainer lists
    the cache's files): the order in which a corpus is digested."""
    return tuple(name.split("/"))


def _sorted_for_disk(documents):
    return {split: sorted(documents[split], key=lambda doc: _order_key(doc[0]))
            for split in SPLITS}


def write_cache(root, documents, stats, selection) -> Corpus:
    """Writes the documents and ``corpus.json`` into ``root`` (via a temporary folder, so a
    crash never leaves a half-written cache under that name)."""
    root = pathlib.Path(root)
    documents = _sorted_for_disk(documents)
    digest = corpus_digest(documents)
    partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    for split in SPLITS:
        for name, content in documents[split]:
            path = partial / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    record = {"format": FORMAT, "sha256": digest, "selection": selection, "stats": stats}
    (partial / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if root.exists():
        if not (root / RECORD_FILE).exists() and any(root.iterdir()):
            shutil.rmtree(partial)
            raise ConfigError(f"corpus cache folder {root} holds other files (no "
                              f"{RECORD_FILE}); choose another corpus.cache_dir")
        shutil.rmtree(root)  # a stale or damaged cache of ours: rebuilt from the sources
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, root)
    return Corpus(root=root, sha256=digest, stats=stats)


def prepare_corpus(root, packages, validation_fraction, expected_sha256=None, *,
                   manifest=MANIFEST, read_sources=installed_sources, log=print) -> Corpus:
    """The corpus of ``packages`` (manifest names, in manifest order) in the cache ``root``:
    reused when it verifies, else built from the packages (each checked against the
    manifest). ``CorpusError`` / ``ConfigError`` name what differs."""
    entries = [manifest_entry(name, manifest) for name in packages]
    entries.sort(key=lambda e: [m.name for m in manifest].index(e.name))
    selection = {"packages": {e.name: {"version": e.version, "sha256": e.sha256}
                              for e in entries},
                 "validation_fraction": validation_fraction}
    cached = cached_corpus(root, expected_sha256, selection=selection)
    if cached is not None:
        return cached
    if pathlib.Path(root, RECORD_FILE).exists():
        log(f"corpus cache {root} does not verify (other packages, settings or changed "
            f"files); rebuilding it")
    package_files = [(e.name, checked_sources(e, read_sources)) for e in entries]
    documents, stats = split_documents(package_files, validation_fraction)
    digest = corpus_digest(_sorted_for_disk(documents))
    if expected_sha256 is not None and digest != expected_sha256:
        raise CorpusError(
            f"corpus.sha256: the corpus built from {', '.join(stats['packages'])} (each "
            f"matching the manifest) has SHA-256 {digest}, the config expects "
            f"{expected_sha256}; the selection, corpus.validation_fraction or the builder "
            f"changed — set corpus.sha256 to the new value if that is intended")
    corpus = write_cache(root, documents, stats, selection)
    log(f"built {corpus.describe()}")
    return corpus


def measure(names, manifest=MANIFEST):
    """Manifest entries of the installed packages ``names`` (roots as in ``manifest``)."""
    entries = []
    for name in names:
        entry = manifest_entry(name, manifest)
        distribution = importlib.metadata.distribution(name)
        probe = dataclasses.replace(entry, version=distribution.version, wheel_tag=None)
        files = installed_sources(probe)
        pure = _wheel_tags(distribution).endswith("-none-any")
        entries.append(dataclasses.replace(
            probe, files=len(files), size=sum(len(c) for _, c in files),
            sha256=source_digest(files), wheel_tag=None if pure else _wheel_tags(distribution)))
    return entries


def main(argv=None) -> int:
    from train.errors import add_debug_flag, run_command

    parser = argparse.ArgumentParser(
        prog="python -m m2rnn_experiments.lm_comparison.corpus",
        description="Build (or check) the comparison's corpus, or measure the manifest.")
    parser.add_argument("--out", help="cache folder to build or check")
    parser.add_argument("--packages", default=",".join(e.name for e in MANIFEST),
                        help="comma-separated manifest packages (default: all)")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--sha256", help="expected SHA-256 of the built corpus")
    parser.add_argument("--measure", action="store_true",
                        help="print the manifest entries of the installed packages")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.packages.split(",") if n.strip()]

    def body():
        if args.measure:
            for entry in measure(names):
                print(f"    {entry!r},")
            return 0
        if not args.out:
            parser.error("give --out DIR (or --measure)")
        corpus = prepare_corpus(args.out, names, args.validation_fraction, args.sha256)
        print(corpus.describe())
        print(f"sha256: {corpus.sha256}")
        return 0
    return run_command(parser.prog, args.debug, body)


if __name__ == "__main__":
    sys.exit(main())
