"""The ORPO objective against float64 references, with property-based tests over the whole input range."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from orpo_ds.loss import LOGP_CEILING, STAT_KEYS, log1mexp, log_odds, orpo_loss, orpo_metrics

# Average log-probs live in [-1e4, 0]; the strategy also hits the hard spots on purpose.
_SPECIAL = [0.0, -0.0, -1e-30, -1e-38, -1e-12, -1e-7, -1e-6, -math.log(2.0), -1e4, -20.0]
logp = st.one_of(
    st.sampled_from(_SPECIAL),
    st.floats(min_value=-1e4, max_value=0.0, allow_nan=False, width=32),
    st.floats(min_value=-2.0**-10, max_value=0.0, allow_nan=False, width=32),
)


def _log_odds_f64(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """float64 reference with the same clamp; log1mexp by the plain log(-expm1) formula, exact in f64."""
    c = c.double().clamp(max=LOGP_CEILING)
    r = r.double().clamp(max=LOGP_CEILING)
    return (c - r) - (torch.log(-torch.expm1(c)) - torch.log(-torch.expm1(r)))


def _tol(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # fp32 arithmetic on c and r carries an absolute error of a few ulps of max(|c|, |r|), and the
    # log1mexp terms near the clamp are ~|log 1e-6| = 14, so scale the tolerance by those magnitudes.
    return 1e-6 * (1.0 + c.double().abs() + r.double().abs()) + 4e-6


@settings(max_examples=400, deadline=None)
@given(c=logp, r=logp)
def test_log_odds_matches_float64_reference_and_is_finite(c, r):
    ct = torch.tensor([c], dtype=torch.float32, requires_grad=True)
    rt = torch.tensor([r], dtype=torch.float32, requires_grad=True)
    lo = log_odds(ct, rt)
    ref = _log_odds_f64(ct.detach(), rt.detach())
    assert lo.dtype == torch.float32
    assert torch.isfinite(lo).all()
    assert (lo.double() - ref).abs().item() <= _tol(ct, rt).item(), (c, r, lo.item(), ref.item())
    loss = -F.logsigmoid(lo).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(ct.grad).all() and torch.isfinite(rt.grad).all()


@settings(max_examples=300, deadline=None)
@given(c=logp, r=logp, beta=st.sampled_from([0.1, 1.0, 0.0]))
def test_orpo_loss_finite_in_bf16_and_fp32(c, r, beta):
    for dtype in (torch.float32, torch.bfloat16):
        ct = torch.tensor([c, r], dtype=dtype, requires_grad=True)
        rt = torch.tensor([r, c], dtype=dtype, requires_grad=True)
        nll = torch.tensor(3.0, requires_grad=True)
        loss, stats = orpo_loss(ct, rt, nll, 4, beta=beta, global_nll_tokens=4, global_pairs=2)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(ct.grad.float()).all() and torch.isfinite(rt.grad.float()).all()
        assert all(torch.isfinite(v) for v in stats.values())


@settings(max_examples=300, deadline=None)
@given(c=st.floats(-30.0, -0.0625, width=32), r=st.floats(-30.0, -0.0625, width=32))
def test_equals_textbook_formula_where_well_conditioned(c, r):
    """log(p/(1-p)) - log(q/(1-q)) is well conditioned when 1 - e^z is not tiny (z <= -1/16)."""
    ct = torch.tensor([c], dtype=torch.float32, requires_grad=True)
    rt = torch.tensor([r], dtype=torch.float32, requires_grad=True)
    lo = log_odds(ct, rt)
    p, q = ct.double().detach().exp(), rt.double().detach().exp()
    textbook = torch.log(p / (1 - p)) - torch.log(q / (1 - q))
    # 1e-6 relative to the operands' magnitude (the result itself can be ~0 when c ~ r).
    scale = 1.0 + abs(c) + abs(r)
    assert abs(lo.item() - textbook.item()) <= 1e-6 * scale
    # Gradient of the textbook formula: d/dc = 1 / (1 - e^c).
    lo.sum().backward()
    assert ct.grad.item() == pytest.approx(1.0 / (1.0 - math.exp(c)), rel=1e-5)
    assert rt.grad.item() == pytest.approx(-1.0 / (1.0 - math.exp(r)), rel=1e-5)


def test_log1mexp_branches_agree_at_switch_point_and_zero_is_finite():
    z = torch.tensor([-math.log(2.0) + 1e-6, -math.log(2.0) - 1e-6, 0.0, -0.0, -1e-30, -1e4])
    out = log1mexp(z)
    ref = torch.log(-torch.expm1(z.double().clamp(max=LOGP_CEILING)))
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert out[-1].item() == 0.0  # log(1 - e^-1e4) == log(1) exactly


def test_equal_chosen_and_rejected_give_zero_log_odds_and_ln2_loss():
    c = torch.tensor([-1.5, -0.0, -1e-30, -700.0])
    lo = log_odds(c, c.clone())
    assert torch.equal(lo, torch.zeros(4))
    loss, _ = orpo_loss(c, c.clone(), torch.tensor(0.0), 1, beta=1.0, global_nll_tokens=1, global_pairs=4)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_orpo_loss_value_matches_trl_formulas_and_global_normalisation():
    torch.manual_seed(0)
    c = -torch.rand(5, dtype=torch.float64) * 3
    r = -torch.rand(5, dtype=torch.float64) * 3
    nll_sum = torch.tensor(12.5, dtype=torch.float64)
    beta = 0.25
    loss, stats = orpo_loss(c.float(), r.float(), nll_sum.float(), 7, beta=beta, global_nll_tokens=20,
                            global_pairs=8)
    # TRL ORPOTrainer.odds_ratio_loss, in float64.
    lo = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    expected = 12.5 / 20 + beta * (-F.logsigmoid(lo).sum() / 8)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(stats) == set(STAT_KEYS)
    assert stats["pairs"].item() == 5 and stats["nll_tokens"].item() == 7
    assert stats["accurate_pairs"].item() == float((c > r).sum())


def test_step_loss_does_not_depend_on_micro_batch_split():
    torch.manual_seed(1)
    c, r = -torch.rand(6) * 2, -torch.rand(6) * 2
    nll = torch.rand(6) * 5
    whole, _ = orpo_loss(c, r, nll.sum(), 60, beta=0.1, global_nll_tokens=60, global_pairs=6)
    parts = [orpo_loss(c[s], r[s], nll[s].sum(), 10, beta=0.1, global_nll_tokens=60, global_pairs=6)[0]
             for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)


def test_metrics_use_trl_names_and_values():
    c = torch.tensor([-1.0, -2.0, -0.5])
    r = torch.tensor([-2.0, -1.0, -3.0])
    beta = 0.1
    loss, stats = orpo_loss(c, r, torch.tensor(6.0), 3, beta=beta, global_nll_tokens=3, global_pairs=3)
    m = orpo_metrics({k: v.item() for k, v in stats.items()}, beta)
    lo = log_odds(c, r)
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert m["nll_loss"] == pytest.approx(2.0)
    assert m["log_odds_ratio"] == pytest.approx(F.logsigmoid(lo).mean().item(), rel=1e-6)
    assert m["log_odds_chosen"] == pytest.approx(lo.mean().item(), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(beta * c.mean().item())
    assert m["rewards/rejected"] == pytest.approx(beta * r.mean().item())
    assert m["rewards/margins"] == pytest.approx(beta * (c - r).mean().item())
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)
    assert m["logps/chosen"] == pytest.approx(c.mean().item())
    assert m["logps/rejected"] == pytest.approx(r.mean().item())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        log_odds(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="global counts"):
        orpo_loss(torch.zeros(1), torch.zeros(1), torch.tensor(0.0), 0, beta=0.1, global_nll_tokens=0,
                  global_pairs=1)
