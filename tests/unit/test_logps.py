"""Chunked log-probs against a naive full-logits reference: values, gradients, memory, and the sequence sums."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from orpo_ds.logps import chunked_token_logps, sequence_logp_sums, sequence_mean_logps

# fp32 tolerance. rtol is the brief's 1e-5. atol: the reference is float64, so the error measured is
# ours alone: fp32 roundoff (6e-8) on logits / log-sum-exp of magnitude O(10) is ~1e-6 absolute, and
# gradient entries that are sums of O(N) cancelling terms of that size (grad_weight rows of unlabelled
# classes, sum_i g_i p_iv h_i) carry the same absolute error while their value can be ~0, where rtol alone
# would demand the impossible. Measured worst case over the property test below: ~1e-6.
FP32_TOL = dict(rtol=1e-5, atol=3e-6)

# bf16: one rounding is 2^-9 relative (eps 2^-8). The chunked bf16 path, like HF's, rounds the logits
# once (bf16 matmul output), the logits gradient once (cast back to bf16 for the backward matmuls) and the
# matmul outputs once more; grad_weight also rounds each chunk's partial before the fp32 accumulation.
# A log-prob z_y - lse inherits at most 2^-8 * max|z| from the rounded logits; gradients inherit the
# relative error of p (~2^-8 * max|z|) plus ~3 roundings of 2^-9. With logits of O(1) (max|z| ~ 4) that
# is ~2% of the gradient's scale; we allow 2^-5 of each tensor's max magnitude (~3%, still 25x tighter
# than a wrong gradient, whose error is O(100%)).
BF16_EPS = 2.0**-8


def naive_token_logps(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None):
    """Full [N, V] logits -> log_softmax -> gather, in the dtype of the inputs (fp64 for references)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = logits.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(labels != -100, logp, torch.zeros_like(logp))


def make_inputs(n, v, h, *, dtype=torch.float32, bias=False, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    # weight ~ 1/sqrt(H) keeps the logits O(1) as in a trained LM head.
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / max(h, 1) ** 0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), labels, cast(b), upstream


def values_and_grads(fn, hidden, weight, labels, bias, upstream, **kw):
    out = fn(hidden, weight, labels, bias=bias, **kw)
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), params)
    return out, grads


def run_both(n, v, h, *, chunk_size, dtype=torch.float32, bias=False, logit_scale=1.0, softcap=None,
             ignore_frac=0.25, seed=0):
    """Chunked on `dtype` inputs; reference in float64 on exactly the same (dtype-rounded) values."""
    hidden, weight, labels, b, up = make_inputs(n, v, h, dtype=dtype, bias=bias, ignore_frac=ignore_frac,
                                                seed=seed)
    kw = dict(logit_scale=logit_scale, softcap=softcap)
    out, grads = values_and_grads(
        lambda *a, bias, **k: chunked_token_logps(*a, bias=bias, chunk_size=chunk_size, **k),
        hidden, weight, labels, b, up, **kw)
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    ref, ref_grads = values_and_grads(naive_token_logps, ref_in[0], ref_in[1], labels, ref_in[2], up, **kw)
    return (out, grads), (ref, ref_grads), (hidden, weight, labels, b)


def assert_fp32_close(got, ref):
    (out, grads), (rout, rgrads) = got, ref
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rout.float(), **FP32_TOL)
    assert len(grads) == len(rgrads)
    for gr, rg in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(gr, rg.float(), **FP32_TOL)


CASES = {
    "n1": dict(n=1, v=37, h=8, chunk_size=4, ignore_frac=0.0),
    "v_not_multiple_of_chunk": dict(n=29, v=103, h=16, chunk_size=8),
    "chunk_larger_than_n": dict(n=5, v=50, h=8, chunk_size=64),
    "chunk_1": dict(n=13, v=41, h=8, chunk_size=1),
    "chunk_equals_n": dict(n=16, v=33, h=8, chunk_size=16),
    "logit_scale": dict(n=24, v=70, h=8, chunk_size=5, logit_scale=0.0625),
    "logit_scale_gt1": dict(n=24, v=70, h=8, chunk_size=5, logit_scale=3.0),
    "softcap": dict(n=24, v=70, h=8, chunk_size=7, softcap=2.0),  # small cap: tanh well off linear
    "bias": dict(n=24, v=70, h=8, chunk_size=7, bias=True),
    "everything": dict(n=31, v=97, h=12, chunk_size=6, bias=True, logit_scale=1.7, softcap=3.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fp32_values_and_grads_match_naive(case):
    got, ref, _ = run_both(**case)
    assert_fp32_close(got, ref)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), v=st.integers(1, 80), h=st.integers(1, 12), chunk=st.integers(1, 50),
       bias=st.booleans(), scale=st.sampled_from([1.0, 0.3, 2.5]), softcap=st.sampled_from([None, 1.5, 30.0]),
       ignore_frac=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16))
def test_fp32_property_matches_naive(n, v, h, chunk, bias, scale, softcap, ignore_frac, seed):
    got, ref, _ = run_both(n, v, h, chunk_size=chunk, bias=bias, logit_scale=scale, softcap=softcap,
                           ignore_frac=ignore_frac, seed=seed)
    assert_fp32_close(got, ref)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_bf16_values_and_grads_match_reference(softcap):
    (out, grads), (ref, rgrads), (hidden, weight, labels, b) = run_both(
        48, 300, 32, chunk_size=16, dtype=torch.bfloat16, bias=True, softcap=softcap)
    assert out.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3  # gradients come back in the input dtypes
    max_z = (hidden.double() @ weight.double().T + b.double()).abs().max().item()
    torch.testing.assert_close(out, ref.float(), rtol=0, atol=2 * BF16_EPS * max_z)
    for gr, rg in zip(grads, rgrads, strict=True):
        scale = rg.abs().max().item()
        torch.testing.assert_close(gr.float(), rg.float(), rtol=2.0**-5, atol=2.0**-5 * scale)


def test_bf16_is_as_accurate_as_the_hf_style_naive_path():
    # The naive path with bf16 inputs is what HF computes; chunking must not be much worse than it.
    hidden, weight, labels, b, up = make_inputs(64, 500, 32, dtype=torch.bfloat16, bias=True, seed=3)
    out, grads = values_and_grads(chunked_token_logps, hidden, weight, labels, b, up, chunk_size=8)
    hf, hf_grads = values_and_grads(naive_token_logps, hidden, weight, labels, b, up)
    ref_in = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    ref, ref_grads = values_and_grads(naive_token_logps, *ref_in[:2], labels, ref_in[2], up)
    err = lambda a, r: (a.double() - r).abs().max().item()  # noqa: E731
    assert err(out, ref) <= 2 * err(hf, ref) + 1e-6
    for gr, hg, rg in zip(grads, hf_grads, ref_grads, strict=True):
        assert err(gr, rg) <= 2 * err(hg, rg) + 1e-3 * rg.abs().max().item()


def test_ignored_labels_give_exact_zero_value_and_gradient():
    hidden, weight, labels, b, up = make_inputs(20, 30, 8, bias=True, ignore_frac=0.5, seed=1)
    ignored = labels == -100
    assert 0 < ignored.sum() < 20
    out, (gh, gw, gb) = values_and_grads(chunked_token_logps, hidden, weight, labels, b, up, chunk_size=3)
    assert torch.equal(out[ignored], torch.zeros(int(ignored.sum())))
    assert (out[~ignored] < 0).all()
    assert torch.equal(gh[ignored], torch.zeros_like(gh[ignored]))
    assert gh[~ignored].abs().sum(1).gt(0).all()
    # The upstream gradient on ignored positions must not leak into weight/bias gradients.
    up2 = torch.where(ignored, torch.full_like(up, 1e6), up)
    _, (gh2, gw2, gb2) = values_and_grads(chunked_token_logps, hidden, weight, labels, b, up2, chunk_size=3)
    assert torch.equal(gw, gw2) and torch.equal(gb, gb2) and torch.equal(gh, gh2)


@pytest.mark.parametrize("n", [0, 6])
def test_no_loss_tokens_gives_zero_outputs_and_zero_grads(n):
    hidden, weight, labels, b, up = make_inputs(n, 11, 4, bias=True, ignore_frac=1.0)
    out, grads = values_and_grads(chunked_token_logps, hidden, weight, labels, b, up, chunk_size=4)
    assert out.shape == (n,) and out.dtype == torch.float32 and not out.any()
    assert [g.shape for g in grads] == [(n, 4), (11, 4), (11,)]
    assert not any(g.any() for g in grads)


def test_result_does_not_depend_on_chunk_size():
    hidden, weight, labels, b, up = make_inputs(33, 64, 8, bias=True, seed=5)
    results = [values_and_grads(chunked_token_logps, hidden, weight, labels, b, up, chunk_size=c,
                                softcap=5.0) for c in (1, 4, 33, 1000)]
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], **FP32_TOL)
        for a, r in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, r, **FP32_TOL)


def test_frozen_weight_or_frozen_hidden():
    hidden, weight, labels, _, up = make_inputs(10, 20, 6)
    _, (ref_gh, ref_gw) = values_and_grads(chunked_token_logps, hidden, weight, labels, None, up)
    frozen_w = weight.detach()
    gh, = torch.autograd.grad((chunked_token_logps(hidden, frozen_w, labels) * up.float()).sum(), [hidden])
    frozen_h = hidden.detach()
    gw, = torch.autograd.grad((chunked_token_logps(frozen_h, weight, labels) * up.float()).sum(), [weight])
    assert torch.equal(gh, ref_gh) and torch.equal(gw, ref_gw)


def test_autocast_does_not_change_the_matmul_dtype():
    hidden, weight, labels, _, up = make_inputs(12, 40, 8, seed=2)
    plain = chunked_token_logps(hidden, weight, labels, chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = chunked_token_logps(hidden, weight, labels, chunk_size=5)
    assert torch.equal(plain, cast)


def test_invalid_inputs_raise_clear_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    lab = torch.tensor([1, 2, -100, 9])
    with pytest.raises(ValueError, match="disagree on H"):
        chunked_token_logps(h, torch.randn(10, 7), lab)
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\]"):
        chunked_token_logps(h[None], w, lab)
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        chunked_token_logps(h, w, lab[:3])
    with pytest.raises(ValueError, match="integer tensor"):
        chunked_token_logps(h, w, lab.float())
    with pytest.raises(ValueError, match="one float dtype"):
        chunked_token_logps(h, w.double(), lab)
    with pytest.raises(ValueError, match=r"bias must be \[V\]"):
        chunked_token_logps(h, w, lab, bias=torch.randn(9))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(h, w, lab, chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        chunked_token_logps(h, w, lab, softcap=0.0)
    # Checked on the device (no host read): on the CPU that raises at once, on CUDA it is a device assert.
    for bad in (10, -1, -101):
        with pytest.raises(RuntimeError, match=re.escape("labels must be in [0, 10) or -100")):
            chunked_token_logps(h, w, torch.tensor([1, 2, -100, bad]))
    chunked_token_logps(h, w, lab.int())  # int32 labels are fine


class _MaxOpOutput(TorchDispatchMode):
    """Records the largest tensor produced by any aten op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _memory_profile(fn, n, v, h):
    """(largest saved-for-backward tensor, largest tensor created by any op) over one forward+backward."""
    hidden, weight, labels, b, up = make_inputs(n, v, h, bias=True, ignore_frac=0.1)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with _MaxOpOutput() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(hidden, weight, labels, bias=b)
        (out * up.float()).sum().backward()
    return max(saved), mode.max_numel


def test_no_n_by_v_tensor_is_saved_or_created():
    n, v, h, chunk = 64, 300, 16, 8  # N > H so the saved weight ([V, H]) is smaller than N * V
    saved, created = _memory_profile(lambda *a, **k: chunked_token_logps(*a, chunk_size=chunk, **k), n, v, h)
    assert saved < n * v, f"autograd graph holds a tensor of {saved} >= N*V = {n * v} elements"
    assert created <= max(chunk * v, v * h), f"an op created {created} elements, more than chunk*V"
    # The same probes catch the naive path, so the assertions above can fail.
    naive_saved, naive_created = _memory_profile(naive_token_logps, n, v, h)
    assert naive_saved >= n * v and naive_created >= n * v


# ---------------------------------------------------------------- per-sequence sums and means


def _loop_sums(tok, seq, s, mask):
    sums, counts = [0.0] * s, [0] * s
    for i in range(tok.shape[0]):
        if mask is None or mask[i]:
            sums[seq[i]] += float(tok[i])
            counts[seq[i]] += 1
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


@pytest.mark.parametrize("use_mask", [False, True])
def test_sequence_sums_and_means_match_python_loop(use_mask):
    g = torch.Generator().manual_seed(0)
    n, s = 50, 6
    tok = (-torch.rand(n, generator=g) * 5).requires_grad_()
    seq = torch.randint(0, s, (n,), generator=g)
    seq[:s] = torch.arange(s)  # every sequence has at least one token ...
    mask = torch.rand(n, generator=g) < 0.6 if use_mask else None
    if mask is not None:
        mask[:s] = True  # ... that counts
    sums, counts = sequence_logp_sums(tok, seq, s, mask)
    ref_sums, ref_counts = _loop_sums(tok.detach(), seq, s, mask)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-6, atol=1e-5)
    assert torch.equal(counts, ref_counts)
    means = sequence_mean_logps(tok, seq, s, mask)
    torch.testing.assert_close(means.double(), ref_sums / ref_counts, rtol=1e-6, atol=1e-6)
    # d(sum_s w_s * mean_s)/d tok_i = w_{seq_i} * mask_i / count_{seq_i}
    w = torch.randn(s, generator=g)
    grad, = torch.autograd.grad((means * w).sum(), [tok])
    keep = torch.ones(n, dtype=torch.bool) if mask is None else mask
    expected = torch.where(keep, w[seq] / ref_counts[seq].float(), torch.zeros(n))
    torch.testing.assert_close(grad, expected)


def test_masked_out_nonfinite_tokens_do_not_poison_sums():
    tok = torch.tensor([-1.0, float("-inf"), -2.0, float("nan")], requires_grad=True)
    seq = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([True, False, True, False])
    means = sequence_mean_logps(tok, seq, 2, mask)
    assert torch.equal(means, torch.tensor([-1.0, -2.0]))
    means.sum().backward()
    assert torch.equal(tok.grad, torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_sequence_without_loss_tokens_is_a_clear_error():
    seq = torch.tensor([0, 0, 1, 2, 4, 5, 6, 8])
    tok = -torch.rand(8)
    mask = torch.tensor([True, True, True, True, True, True, False, True])
    # sequences 3 and 7 have no token at all; 6 has one that is masked out
    with pytest.raises(RuntimeError, match=re.escape("a sequence has no loss tokens")):
        sequence_mean_logps(tok, seq, 9, mask)
    sums, counts = sequence_logp_sums(tok, seq, 9, mask)  # the sums themselves are well defined
    assert counts.tolist() == [2, 1, 1, 0, 1, 1, 0, 0, 1]


def test_sequence_sums_validate_inputs():
    tok = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"seq_id must be in \[0, 2\)"):
        sequence_logp_sums(tok, torch.tensor([0, 1, 2]), 2)
    with pytest.raises(RuntimeError, match=r"seq_id must be in \[0, 2\)"):
        sequence_logp_sums(tok, torch.tensor([0, -1, 1]), 2)
    with pytest.raises(ValueError, match=r"must both be \[N\]"):
        sequence_logp_sums(tok, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="integer tensor"):
        sequence_logp_sums(tok, torch.tensor([0.0, 1.0, 1.0]), 2)
    with pytest.raises(ValueError, match="bool tensor"):
        sequence_logp_sums(tok, torch.tensor([0, 1, 1]), 2, mask=torch.tensor([1, 0, 1]))
    sums, counts = sequence_logp_sums(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2)
    assert sums.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
