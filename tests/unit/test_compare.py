"""Before/after comparison: per-pair stats against a naive per-pair reference, the paired bootstrap on
cases with a known answer, the report tables, and the progressive-validation moving average."""

import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds.compare import (
    FIGURES,
    HELD_OUT,
    SEEN,
    Change,
    compare_snapshots,
    comparison_report,
    figure_of,
    paired_bootstrap,
    seen_sample,
)
from orpo_ds.data import TokenizedPair
from orpo_ds.evaluate import evaluate_pairs, metrics_of, pair_stats
from orpo_ds.loss import STAT_KEYS
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import DEFAULT_LAYOUT, SharedPromptLayout
from orpo_ds.report import moving_average
from tests.helpers.reference import reference_step_loss

V = 61
COLUMN = {key: i for i, key in enumerate(STAT_KEYS)}


def _pairs(n, seed=0):
    rng = random.Random(seed)
    rand = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(pair_id=10 + i, prompt_ids=rand(1, 9), chosen_ids=rand(0, 6) + (2,),
                          rejected_ids=rand(0, 6) + (2,)) for i in range(n)]


def _model(attn="segmented_sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(cfg).float().eval()


def _stats(n, seed=0):
    """[n, K] plausible per-pair stats: random log-odds, 0/1 accuracies, NLL sums over 3-9 tokens."""
    rng = np.random.default_rng(seed)
    stats = np.zeros((n, len(STAT_KEYS)))
    stats[:, COLUMN["pairs"]] = 1
    stats[:, COLUMN["log_odds_sum"]] = rng.normal(0.1, 1.0, n)
    stats[:, COLUMN["accurate_pairs"]] = rng.integers(0, 2, n)
    stats[:, COLUMN["nll_tokens"]] = rng.integers(3, 10, n)
    stats[:, COLUMN["nll_sum"]] = stats[:, COLUMN["nll_tokens"]] * rng.uniform(1.0, 3.0, n)
    return stats


# ------------------------------------------------------------------------------------ per-pair stats


@pytest.mark.parametrize("layout", [DEFAULT_LAYOUT, SharedPromptLayout()], ids=["separate", "shared-prompt"])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_pair_stats_of_packed_rows_equal_each_pair_alone_in_the_naive_reference(layout, nll_on_prompt):
    pairs = _pairs(9, seed=3)
    model = _model()
    stats = pair_stats(PolicyWithChunkedHead(model), pairs, micro_batch_tokens=64, nll_on_prompt=nll_on_prompt,
                       pad_token_id=0, layout=layout)  # several pairs per 64-token row
    reference = _model(attn="sdpa")
    reference.load_state_dict(model.state_dict())
    assert stats.shape == (len(pairs), len(STAT_KEYS))
    for row, pair in zip(stats, pairs, strict=True):
        with torch.no_grad():
            _, ref = reference_step_loss(reference, [pair], beta=1.0, nll_on_prompt=nll_on_prompt, pad_id=0)
        assert row[COLUMN["pairs"]] == 1
        assert row[COLUMN["log_odds_sum"]] == pytest.approx(ref["log_odds_chosen"], abs=1e-5)
        assert row[COLUMN["chosen_logps_sum"]] == pytest.approx(ref["logps/chosen"], abs=1e-5)
        assert row[COLUMN["rejected_logps_sum"]] == pytest.approx(ref["logps/rejected"], abs=1e-5)
        assert row[COLUMN["accurate_pairs"]] == ref["rewards/accuracies"]
        assert row[COLUMN["nll_sum"]] / row[COLUMN["nll_tokens"]] == pytest.approx(ref["nll_loss"], abs=1e-5)


def test_metrics_of_pair_stats_are_the_figures_of_the_whole_set():
    pairs = _pairs(7, seed=5)
    policy = PolicyWithChunkedHead(_model(seed=1))
    stats = pair_stats(policy, pairs, micro_batch_tokens=48, nll_on_prompt=False, pad_token_id=0)
    with torch.no_grad():
        _, ref = reference_step_loss(_model(attn="sdpa", seed=1), pairs, beta=0.5, nll_on_prompt=False, pad_id=0)
    got = metrics_of(stats, beta=0.5)
    assert got == evaluate_pairs(policy, pairs, beta=0.5, micro_batch_tokens=48, nll_on_prompt=False, pad_token_id=0)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    # the comparison's figures are the same ratios as the metrics of those names
    assert figure_of(stats, "preference accuracy") == pytest.approx(got["rewards/accuracies"])
    assert figure_of(stats, "mean log-odds") == pytest.approx(got["log_odds_chosen"])
    assert figure_of(stats, "chosen NLL") == pytest.approx(got["nll_loss"])


# ------------------------------------------------------------------------------------------ bootstrap


@pytest.mark.parametrize("figure", list(FIGURES))
def test_identical_before_and_after_give_an_interval_of_exactly_zero(figure):
    stats = _stats(40)
    c = paired_bootstrap(stats, stats.copy(), figure)
    assert (c.low, c.high, c.change) == (0.0, 0.0, 0.0)
    assert c.reading == "no clear change (interval includes 0)"


def test_a_constant_shift_gives_that_shift():
    before = _stats(40, seed=1)
    after = before.copy()
    after[:, COLUMN["log_odds_sum"]] += 0.25  # every pair's log-odds up by 0.25
    after[:, COLUMN["nll_sum"]] -= 0.1 * after[:, COLUMN["nll_tokens"]]  # every token's NLL down by 0.1
    odds = paired_bootstrap(before, after, "mean log-odds")
    assert odds.change == pytest.approx(0.25) and odds.low == pytest.approx(0.25) and odds.high == pytest.approx(0.25)
    assert odds.reading == "up (interval above 0)"
    nll = paired_bootstrap(before, after, "chosen NLL")
    assert nll.low == pytest.approx(-0.1) and nll.high == pytest.approx(-0.1) and nll.reading.startswith("down")
    assert paired_bootstrap(before, after, "preference accuracy").high == 0.0  # untouched


def test_the_interval_of_a_mean_change_matches_the_normal_approximation():
    rng = np.random.default_rng(7)
    n, mean, sd = 400, 0.3, 1.0
    before = _stats(n, seed=2)
    after = before.copy()
    after[:, COLUMN["log_odds_sum"]] += rng.normal(mean, sd, n)
    c = paired_bootstrap(before, after, "mean log-odds", resamples=4000)
    diffs = after[:, COLUMN["log_odds_sum"]] - before[:, COLUMN["log_odds_sum"]]
    half = 1.96 * diffs.std(ddof=1) / np.sqrt(n)
    assert c.change == pytest.approx(diffs.mean())
    assert c.low == pytest.approx(diffs.mean() - half, abs=0.15 * half)
    assert c.high == pytest.approx(diffs.mean() + half, abs=0.15 * half)


def test_the_bootstrap_is_seeded_and_refuses_unpaired_sets():
    before, after = _stats(30, seed=3), _stats(30, seed=4)
    assert paired_bootstrap(before, after, "chosen NLL") == paired_bootstrap(before, after, "chosen NLL")
    assert paired_bootstrap(before, after, "chosen NLL", seed=1) != paired_bootstrap(before, after, "chosen NLL")
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(before, after[:-1], "chosen NLL")


def test_the_reading_says_where_the_interval_lies():
    assert Change(0.0, 1.0, 0.1, 1.5).reading == "up (interval above 0)"
    assert Change(1.0, 0.0, -1.5, -0.1).reading == "down (interval below 0)"
    assert Change(0.0, 0.1, -0.2, 0.4).reading == "no clear change (interval includes 0)"


# --------------------------------------------------------------------------------------- sets, report


def test_the_seen_sample_is_fixed_by_seed_and_data_only():
    pairs = _pairs(100)
    sample = seen_sample(pairs, 40)
    assert len(sample) == 40 and sample == seen_sample(list(pairs), 40)
    assert [p.pair_id for p in sample] == sorted(p.pair_id for p in sample)  # in file order
    assert sample != seen_sample(pairs, 40, seed=1)
    assert seen_sample(pairs[:5], 40) == pairs[:5] and seen_sample(pairs, 0) == []


def test_the_report_tables_both_sets_with_intervals():
    before = {"step": 0, "pairs": {HELD_OUT: _stats(40, seed=5).tolist(), SEEN: _stats(12, seed=6).tolist()}}
    after_seen = np.asarray(before["pairs"][SEEN])
    after_seen[:, COLUMN["log_odds_sum"]] += 1.0
    after = {"step": 9, "pairs": {HELD_OUT: before["pairs"][HELD_OUT], SEEN: after_seen.tolist()}}
    tables = compare_snapshots(before, after)
    assert tables.keys() == {HELD_OUT, SEEN} and tables[SEEN]["mean log-odds"].low == pytest.approx(1.0)
    text = comparison_report(before, after)
    assert text.index("seen: 12 training pairs") < text.index("held-out: 40 pairs")
    assert "| mean log-odds |" in text and "[+1.0000, +1.0000] | up (interval above 0)" in text
    assert "2000 resamples" in text
    assert compare_snapshots(before, {"step": 9, "pairs": {}}) == {} and comparison_report({}, after) == ""


def test_moving_average_against_a_loop():
    values = [0.5, 1.0, 0.0, 0.25, 1.0, 0.75, 0.0]
    for window in (1, 3, 10):
        expected = [np.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
        np.testing.assert_allclose(moving_average(values, window), expected)
