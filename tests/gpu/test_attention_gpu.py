"""segmented_sdpa on CUDA against the dense masked twin of tests/unit/test_attention_segmented.py, in fp32
and bf16 (the dtype a GPU run trains in), values and gradients. Where flash-attn is installed the bf16
cases run its varlen branch (one call, gathered keys, separate cu_seqlens), the context segments included:
the prefix-sharing path on a GPU. Skipped without CUDA by tests/conftest.py."""

import pytest
import torch

from orpo_ds.attention import segmented_sdpa
from tests.unit.test_attention_segmented import CASES, _qkv, dense_reference


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name, segments, heads, kv_heads, dim", CASES, ids=[c[0] for c in CASES])
def test_segmented_sdpa_on_cuda_matches_dense_reference(name, segments, heads, kv_heads, dim, dtype, tol):
    attend = lambda q, k, v: segmented_sdpa(None, q, k, v, None, attention_segments=segments,  # noqa: E731
                                            scaling=dim ** -0.5)[0]
    _check_on_cuda_against_dense(attend, name, segments, heads, kv_heads, dim, dtype, tol)


def _check_on_cuda_against_dense(attend, name, segments, heads, kv_heads, dim, dtype, tol):
    """``attend(q, k, v)`` on CUDA in ``dtype`` against the float64 dense reference, values and gradients."""
    T = segments[-1].end
    q64, k64, v64 = _qkv(T, heads, kv_heads, dim, seed=len(name))
    q, k, v = (t.detach().to("cuda", dtype).requires_grad_() for t in (q64, k64, v64))
    got = attend(q, k, v)
    upstream = torch.randn(got.shape, dtype=torch.float64)
    got_grads = torch.autograd.grad((got.double() * upstream.cuda()).sum(), (q, k, v))
    want = dense_reference(q64, k64, v64, segments, dim ** -0.5)
    want_grads = torch.autograd.grad((want * upstream).sum(), (q64, k64, v64))
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=tol, atol=tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()))


def test_a_masked_grouped_head_call_runs_without_the_math_kernel():
    """Issue 34 item 4: a shared prompt's masked call with grouped KV heads fell to sdpa's math kernel (flash
    refuses a mask, memory-efficient refused grouped heads). With the KV heads expanded it must run with
    the math kernel disabled."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from orpo_ds.attention import masked_attention

    q = torch.randn(1, 9, 64, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 3, 96, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(64, 96, dtype=torch.bool, device="cuda").tril(diagonal=32)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = masked_attention(q, k, v, mask, dropout=0.0, scale=None, expand_kv=True)
    assert out.shape == (1, 9, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, segments, heads, kv_heads, dim", CASES, ids=[c[0] for c in CASES])
def test_torch_varlen_on_cuda_matches_dense_reference(name, segments, heads, kv_heads, dim):
    """Issue 34 item 1: PyTorch's own varlen flash attention, bf16, values and gradients, plain packed rows
    and context (shared-prompt) segments. The context cases check the causal alignment when a segment has
    more keys than queries, which ``auto`` does not rely on until this passes on a GPU."""
    from orpo_ds.attention import torch_varlen_attn, torch_varlen_segments

    if torch_varlen_attn() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    dim = 64  # the flash kernels take head sizes in multiples of 8; the CPU cases' odd sizes test the masks
    _check_on_cuda_against_dense(lambda q, k, v: torch_varlen_segments(q, k, v, segments, dim ** -0.5), name,
                                 segments, heads, kv_heads, dim, torch.bfloat16, 2e-2)
