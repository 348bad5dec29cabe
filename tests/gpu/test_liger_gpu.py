"""Liger-Kernel on CUDA: its layer kernels and fused head against the torch path, values and gradients.

Skipped without CUDA by tests/conftest.py; with CUDA, a missing liger-kernel is a failure, not a skip. The
CPU side of the same code (resolution, patching, dispatch) is tested in tests/unit/test_liger.py.
"""

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orpo_ds import liger as liger_lib
from orpo_ds.batch import micro_batch_loss, prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.logps import chunked_token_logps
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row
from tests.helpers.models import save_tiny_llama
from tests.helpers.synthetic import write_pairs
from tests.helpers.tokenizers import make_tiny_tokenizer
from tests.unit.test_logps import BF16_EPS, FP32_TOL, make_inputs, naive_token_logps, values_and_grads

REPO = Path(__file__).resolve().parents[2]

V = 1031  # odd: no power-of-two block fits the vocabulary exactly


def _pairs(n, seed=0):
    rng = random.Random(seed)
    rand = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(pair_id=i, prompt_ids=rand(5, 40), chosen_ids=rand(3, 30) + (2,),
                          rejected_ids=rand(3, 30) + (2,)) for i in range(n)]


def _orpo_loss_and_grads(model, policy, mb):
    model.zero_grad()
    loss, _ = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=0.5,
                               global_nll_tokens=mb.num_nll_tokens, global_pairs=mb.num_pairs)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def _rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def test_liger_on_and_off_give_the_same_orpo_loss_and_gradients(restore_llama_module):
    """A tiny random Llama on one packed row: the torch path (off) against Liger's RMSNorm, SwiGLU, RoPE
    and fused head (on), in fp32 (equal to fp32 roundoff) and in bf16 (no less accurate than the torch
    path's own bf16 run, both measured against the fp32 torch run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert not torch.backends.cuda.matmul.allow_tf32  # true fp32 matmuls for the fp32 comparison
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    base = LlamaForCausalLM(config).cuda().float()
    mb = prepare_micro_batch(build_row(_pairs(6)), nll_on_prompt=False, device="cuda")
    models = {dtype: copy.deepcopy(base).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    # The torch runs first: the patch swaps modeling_llama's RoPE for every Llama in the process.
    off = {dtype: _orpo_loss_and_grads(m, PolicyWithChunkedHead(m, chunk_size=64), mb) for dtype, m in models.items()}
    choice = liger_lib.resolve("on", config, device_type="cuda", logit_scale=1.0)
    assert (choice.layers, choice.head) == (True, True)
    on = {}
    for dtype, m in models.items():
        assert liger_lib.patch_model(m) == 3 * 3 + 1
        on[dtype] = _orpo_loss_and_grads(m, PolicyWithChunkedHead(m, liger=choice), mb)

    (loss_off, grads_off), (loss_on, grads_on) = off[torch.float32], on[torch.float32]
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)

    (bf_loss_off, bf_grads_off), (bf_loss_on, bf_grads_on) = off[torch.bfloat16], on[torch.bfloat16]
    torch_err = _rel_err(bf_loss_off, loss_off)
    assert _rel_err(bf_loss_on, loss_off) <= 2 * torch_err + 2 * BF16_EPS, (bf_loss_on, bf_loss_off, loss_off)
    for name, g in grads_off.items():
        torch_err = _rel_err(bf_grads_off[name], g)
        assert _rel_err(bf_grads_on[name], g) <= 2 * torch_err + 2 * BF16_EPS, name


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_head_matches_the_float64_reference_like_the_torch_head(dtype, softcap):
    """Liger's fused head against the float64 naive reference, with the tolerances the torch chunked head
    meets (tests/gpu/test_logps_gpu.py), and against the torch chunked head itself."""
    hidden, weight, labels, b, up = make_inputs(300, 5003, 64, dtype=dtype, bias=True, seed=7)
    hidden, weight, b = (t.detach().cuda().requires_grad_() for t in (hidden, weight, b))
    labels, up = labels.cuda(), up.cuda()
    out, grads = values_and_grads(liger_lib.liger_token_logps, hidden, weight, labels, b, up, softcap=softcap)
    ref_in = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    ref, ref_grads = values_and_grads(naive_token_logps, ref_in[0], ref_in[1], labels, ref_in[2], up, softcap=softcap)
    assert out.dtype == torch.float32 and [g.dtype for g in grads] == [dtype] * 3
    assert bool((out[labels == -100] == 0).all())
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref.float(), **FP32_TOL)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r.float(), **FP32_TOL)
    else:
        max_z = (ref_in[0] @ ref_in[1].T + ref_in[2]).abs().max().item()
        torch.testing.assert_close(out, ref.float(), rtol=0, atol=2 * BF16_EPS * max_z)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.float(), r.float(), rtol=2.0**-5, atol=2.0**-5 * r.abs().max().item())
    torch_out, _ = values_and_grads(lambda *a, **k: chunked_token_logps(*a, chunk_size=128, **k),
                                    hidden, weight, labels, b, up, softcap=softcap)
    tol = FP32_TOL if dtype == torch.float32 else dict(rtol=0, atol=4 * BF16_EPS * torch_out.abs().max().item())
    torch.testing.assert_close(out, torch_out, **tol)


# ZeRO-3 at its most eager to release: nothing persists, nothing is prefetched or kept for reuse, so the
# head weight is partitioned again between the forward and the backward of the policy.
RELEASE_EVERYTHING = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                            "stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 0,
                                            "stage3_max_reuse_distance": 0, "reduce_bucket_size": 1000},
                      "steps_per_print": 1000000}


def test_zero3_training_with_liger_on_and_off_follows_the_same_losses(tmp_path):
    """The trainer, one GPU, ZeRO-3, fp32: 4 steps with Liger (patched layers, fused head reading the
    gathered lm_head.weight inside the engine's forward) and 4 without give the same losses and gradient
    norms. A head that read a released weight, or gradients that missed the partitioned parameter, would
    part ways from the first update on."""
    model = save_tiny_llama(tmp_path / "model", make_tiny_tokenizer(), hidden_size=64)
    data = write_pairs(tmp_path / "pairs.jsonl", 48)
    ds_json = tmp_path / "zero3_release.json"
    ds_json.write_text(json.dumps(RELEASE_EVERYTHING))
    runs = {}
    for option in ("on", "off"):
        out = tmp_path / f"run-{option}"
        args = [f"model.name_or_path={model}", f"data.train={data}", "data.max_length=64",
                f"data.cache_dir={tmp_path / 'tok'}", f"train.output_dir={out}", "train.micro_batch_tokens=256",
                "train.lr=1e-3", "train.max_steps=4", "train.precision=fp32", "train.eval_before=false",
                "train.export=false", f"deepspeed.config={ds_json}", f"model.liger_kernels={option}"]
        env = {**os.environ, "DS_ACCELERATOR": "cuda", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "orpo_ds", "train", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)  # 2 runs in gpu_check's gpu-tests part
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("[model]")]
        assert ("liger: RMSNorm/SwiGLU/RoPE kernels, head Liger" in line) == (option == "on"), line
        records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        runs[option] = [(r["loss"], r["grad_norm"]) for r in records if "loss" in r]
    assert len(runs["on"]) == len(runs["off"]) == 4
    for (loss_on, norm_on), (loss_off, norm_off) in zip(runs["on"], runs["off"], strict=True):
        assert abs(loss_on - loss_off) <= 1e-4 * abs(loss_off), runs
        assert abs(norm_on - norm_off) <= 1e-3 * abs(norm_off), runs
