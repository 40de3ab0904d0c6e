"""What the comparison's corpus is made of: the ``.py`` files of six pinned packages.

Each entry names a distribution (as pip knows it), its version, the top-level folders of
site-packages whose ``.py`` files are taken (from the distribution's ``RECORD``), and what
those files were when the manifest was written: how many, their bytes, and the SHA-256 of
the sorted ``(path, bytes)`` list (``corpus.source_digest``). ``wheel_tag`` records the build
of a binary wheel (jaxlib: one per CPython minor version and platform; ``None`` for pure Python
wheels, whose files are the same under every Python 3). Only the bytes are checked: another
build whose sources are the same bytes is accepted, and one whose bytes differ is named with
both tags.

To change a version: install it, run ``python -m m2rnn_experiments.lm_comparison.corpus
--measure``, paste its lines here and update ``corpus.sha256`` in the configs.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class PackageSource:
    name: str  # distribution name
    version: str
    roots: tuple[str, ...]  # folders in site-packages whose .py files are taken
    files: int = 0  # how many .py files (before deduplication)
    size: int = 0  # their bytes
    sha256: str = ""  # corpus.source_digest of the sorted (path, bytes) list
    wheel_tag: str | None = None  # the wheel's tag for a binary wheel; None: pure Python


# Measured with Python 3.12 on linux x86_64; 24.7 MB of sources in all.
MANIFEST = (
    PackageSource(name="jax", version="0.11.2", roots=("jax",), files=621, size=13063867,
                  sha256="95e37b65a506039f03e026e9e959d932ed8cebeb2b2019324b671d3e92acbb6f"),
    PackageSource(name="jaxlib", version="0.11.2", roots=("jaxlib",), files=75, size=5101172,
                  sha256="7a06a028e37f3daaf7aedd0ac26269d5b39a2d07168cd9d686d0497d8208ec76",
                  wheel_tag="cp312-cp312-manylinux_2_27_x86_64"),
    PackageSource(name="flax", version="0.12.10", roots=("flax",), files=109, size=1910133,
                  sha256="83639fc9c18e45f800e209cad326a4b10a5cd5ef7e4e9dc32c92c885b7f6fd7a"),
    PackageSource(name="optax", version="0.2.8", roots=("optax",), files=129, size=1389043,
                  sha256="dce18a672e232ce710cd381af9d83b1a17fb849b710235bdb3ca9ca261250ff8"),
    PackageSource(name="orbax-checkpoint", version="0.12.4", roots=("orbax",), files=310,
                  size=2907809,
                  sha256="fa543d185492de60f894708e09b6c148c766a3e292002d549738ccb3d9d49c91"),
    PackageSource(name="chex", version="0.1.92", roots=("chex",), files=23, size=354725,
                  sha256="0cc0c32d82547e5c07c4abde9202b078d1ad8c924945b861d3132ad9c8e9615b"),
)
