"""SHA-256 checksums of a checkpoint's files: written with each checkpoint, checked before it is
restored, so that a damaged file (a flipped bit on disk, a bad copy) is noticed, not restored.

Why a file of our own: Orbax 0.12.4 builds the TensorStore spec of every array itself and has
no option to add a checksum codec (its zarr3 codecs checksum the shard index only, not the chunk
data), and OCDBT's data files carry no checksum of the values, so one flipped byte in a data
file restores silently. Each step folder therefore gets a ``SHA256SUMS`` file in the format of
``sha256sum`` (``cd <out>/checkpoints/<step> && sha256sum -c SHA256SUMS`` checks it by hand).
``Checkpointer`` writes it while Orbax finalizes the save, before the step folder takes its
final name, so every finished step folder holds one; folders of older checkpoints have none
and restore unverified.
"""

import hashlib
import os
import pathlib

from train.run_folder import write_atomically

MANIFEST = "SHA256SUMS"
# Written by Orbax at the top of a step folder after the manifest (a commit timestamp and a
# success mark); they hold nothing a restore reads.
UNCHECKED = frozenset({MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"})
_BLOCK = 1 << 22


class ChecksumError(Exception):
    """A checkpoint's files do not match its manifest (or the manifest is damaged)."""


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _checked_files(step_dir: pathlib.Path) -> list:
    files = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            relative = (pathlib.Path(root) / name).relative_to(step_dir)
            if len(relative.parts) > 1 or name not in UNCHECKED:
                files.append(relative)
    return sorted(files)


def write_manifest(step_dir):
    """Writes ``<step_dir>/SHA256SUMS`` for every file of the step (atomically)."""
    step_dir = pathlib.Path(step_dir)
    lines = [f"{file_sha256(step_dir / f)}  {f.as_posix()}\n" for f in _checked_files(step_dir)]
    write_atomically(step_dir / MANIFEST, "".join(lines))


def verify(step_dir, items=None) -> bool:
    """Checks the files of a step (only those under ``items`` when given) against its manifest.

    True: they match. False: the step has no manifest (written before checkpoints carried
    one). Raises ``ChecksumError`` naming the first file that is missing or differs.
    """
    step_dir = pathlib.Path(step_dir)
    try:
        text = (step_dir / MANIFEST).read_text()
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as err:
        raise ChecksumError(f"its {MANIFEST} cannot be read ({err})") from err
    expected = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64 or not name:
            raise ChecksumError(f"line {number} of its {MANIFEST} is damaged")
        expected[name] = digest
    if not expected:
        raise ChecksumError(f"its {MANIFEST} is empty")
    for name, digest in expected.items():
        if items is not None and pathlib.PurePosixPath(name).parts[0] not in items:
            continue
        try:
            actual = file_sha256(step_dir / name)
        except FileNotFoundError:
            raise ChecksumError(f"{name} is missing") from None
        if actual != digest:
            raise ChecksumError(f"{name} does not match its SHA-256 checksum (damaged file)")
    return True
