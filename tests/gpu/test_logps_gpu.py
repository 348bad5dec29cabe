"""Chunked log-probs on CUDA (torch path): parity with the naive reference and peak-memory bound.

Skipped without CUDA by tests/conftest.py. Tolerances are the ones justified in tests/unit/test_logps.py.
"""

import pytest
import torch

from orpo_ds.logps import chunked_token_logps
from tests.unit.test_logps import BF16_EPS, FP32_TOL, make_inputs, naive_token_logps, values_and_grads


def _cuda(t):
    return None if t is None else t.detach().cuda().requires_grad_()


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_reference(dtype, softcap):
    hidden, weight, labels, b, up = make_inputs(300, 5003, 64, dtype=dtype, bias=True, seed=7)
    hidden, weight, b = _cuda(hidden), _cuda(weight), _cuda(b)
    labels, up = labels.cuda(), up.cuda()
    out, grads = values_and_grads(chunked_token_logps, hidden, weight, labels, b, up,
                                  chunk_size=128, logit_scale=0.9, softcap=softcap)
    ref_in = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    ref, ref_grads = values_and_grads(naive_token_logps, ref_in[0], ref_in[1], labels, ref_in[2], up,
                                      logit_scale=0.9, softcap=softcap)
    assert out.dtype == torch.float32 and [g.dtype for g in grads] == [dtype] * 3
    if dtype == torch.float32:
        # cuBLAS may use TF32 for fp32 matmuls if the process enabled it; this test wants true fp32.
        assert not torch.backends.cuda.matmul.allow_tf32
        torch.testing.assert_close(out, ref.float(), **FP32_TOL)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r.float(), **FP32_TOL)
    else:
        max_z = (ref_in[0] @ ref_in[1].T + ref_in[2]).abs().max().item() * 0.9
        torch.testing.assert_close(out, ref.float(), rtol=0, atol=2 * BF16_EPS * max_z)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.float(), r.float(), rtol=2.0**-5, atol=2.0**-5 * r.abs().max().item())


def _extra_peak_bytes(fn, hidden, weight, labels, up):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(hidden, weight, labels)
    (out * up).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    hidden.grad = weight.grad = None
    return peak


def test_cuda_extra_memory_is_a_small_fraction_of_naive():
    n, v, h, chunk = 8192, 32000, 512, 1024
    hidden, weight, labels, _, up = make_inputs(n, v, h, dtype=torch.bfloat16, ignore_frac=0.0)
    hidden, weight, labels, up = _cuda(hidden), _cuda(weight), labels.cuda(), up.float().cuda()
    naive = _extra_peak_bytes(naive_token_logps, hidden, weight, labels, up)
    chunked = _extra_peak_bytes(lambda *a: chunked_token_logps(*a, chunk_size=chunk), hidden, weight, labels, up)
    assert naive >= n * v * 4  # sanity: the naive path really materialises fp32 [N, V] logits
    # chunk buffers (fp32 + bf16, C x V), the fp32 grad_weight accumulator and its bf16 copy, grad_hidden
    budget = chunk * v * 6 * 2 + v * h * (4 + 2 + 2) + n * h * 2 * 2
    assert chunked <= budget, (chunked, budget)
    assert chunked <= 0.15 * naive, (chunked, naive)
