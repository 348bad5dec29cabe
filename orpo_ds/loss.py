"""The ORPO objective (Hong et al. 2024, arXiv 2403.07691), exactly as docs/objective.md states it.

Pure tensors in, tensors out: no engine, no config object, no logging.

For a pair with chosen average log-prob ``c`` and rejected ``r`` (length-normalised over the response
tokens, EOS included):

    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))         with log1mexp(z) = log(1 - e^z)
    L_OR     = -logsigmoid(log_odds)
    L        = L_SFT + beta * L_OR

Global normalisation: the micro-batch loss returned by :func:`orpo_loss` divides the summed token NLL by
the number of NLL tokens of the whole optimizer step (all micro-batches, all ranks) and the summed pair
losses by the number of pairs of the whole step. Summing these micro-batch losses over the step gives the
step loss, whatever the packing split was.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# An average log-prob of exactly 0 makes log1mexp(0) = log(0) = -inf and the log-odds gradient inf - inf.
# Clamping c and r to at most this value keeps loss and gradients finite. A per-token probability of
# 1 - 1e-6 is already beyond what fp32 log_softmax resolves (its error is ~1e-7 per token), so the clamp
# changes nothing a model could actually express.
LOGP_CEILING = -1e-6

_LN2 = math.log(2.0)


def log1mexp(z: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(z))`` for ``z <= 0``, computed stably in fp32 (Maechler 2012).

    ``log(-expm1(z))`` is accurate for ``z > -ln 2`` (where ``1 - e^z`` is small), ``log1p(-exp(z))``
    below it (where ``e^z`` is small). ``z`` is clamped to ``LOGP_CEILING`` so ``z = 0`` stays finite.

    Args:
        z: ``[...]`` any float dtype; values must be <= 0.
    Returns:
        ``[...]`` fp32.
    """
    z = z.float().clamp(max=LOGP_CEILING)
    # torch.where evaluates both branches; each branch is fed only values in its good range so neither
    # produces inf/NaN whose (masked) gradient would still poison the backward pass.
    near_zero = z > -_LN2
    z_near = torch.where(near_zero, z, torch.full_like(z, -_LN2))
    z_far = torch.where(near_zero, torch.full_like(z, -_LN2), z)
    return torch.where(near_zero, torch.log(-torch.expm1(z_near)), torch.log1p(-torch.exp(z_far)))


def log_odds(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """Log odds ratio ``log(odds(c) / odds(r))`` with ``odds(p) = p / (1 - p)`` and ``p = e^logp``.

    Args:
        chosen_logps: ``[P]`` average log-prob of each chosen response, <= 0.
        rejected_logps: ``[P]`` average log-prob of each rejected response, <= 0.
    Returns:
        ``[P]`` fp32.
    """
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(f"chosen_logps {tuple(chosen_logps.shape)} and rejected_logps "
                         f"{tuple(rejected_logps.shape)} must have the same shape")
    c = chosen_logps.float().clamp(max=LOGP_CEILING)
    r = rejected_logps.float().clamp(max=LOGP_CEILING)
    return (c - r) - (log1mexp(c) - log1mexp(r))


# Keys of the additive statistics returned by orpo_loss. Summing them over micro-batches and ranks and
# then calling orpo_metrics gives the step's metrics.
STAT_KEYS = (
    "nll_sum", "nll_tokens", "pairs", "log_odds_ratio_sum", "log_odds_sum",
    "chosen_logps_sum", "rejected_logps_sum", "accurate_pairs",
)
NLL_STAT_KEYS = ("nll_sum", "nll_tokens")  # of tokens, not of pairs: the ranks sharing a row each hold a part


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_sum: torch.Tensor,
    nll_tokens: int,
    *,
    beta: float,
    global_nll_tokens: int,
    global_pairs: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ORPO loss of one micro-batch, normalised by global (whole-step) counts.

    Args:
        chosen_logps: ``[P]`` average log-prob of the chosen responses in this micro-batch.
        rejected_logps: ``[P]`` same for the rejected responses, pair-aligned with ``chosen_logps``.
        nll_sum: scalar, summed negative log-likelihood of this micro-batch's NLL tokens (the chosen
            response tokens; with ``nll_on_prompt`` the chosen prompt tokens too).
        nll_tokens: number of tokens in ``nll_sum``.
        beta: weight of the odds-ratio term (the paper's lambda).
        global_nll_tokens: NLL tokens in the whole optimizer step (all micro-batches, all ranks).
        global_pairs: pairs in the whole optimizer step.
    Returns:
        ``(loss, stats)``: ``loss`` is a differentiable fp32 scalar, this micro-batch's share of the step
        loss. ``stats`` holds detached fp32 scalars with the keys of ``STAT_KEYS``, to be summed over
        the step and turned into metrics by :func:`orpo_metrics`.
    """
    if global_nll_tokens <= 0 or global_pairs <= 0:
        raise ValueError(f"global counts must be positive, got global_nll_tokens={global_nll_tokens}, "
                         f"global_pairs={global_pairs}")
    lo = log_odds(chosen_logps, rejected_logps)
    log_sig = F.logsigmoid(lo)
    sft_term = nll_sum.float() / global_nll_tokens
    or_term = -log_sig.sum() / global_pairs
    loss = sft_term + beta * or_term

    c, r = chosen_logps.detach().float(), rejected_logps.detach().float()
    stats = {
        "nll_sum": nll_sum.detach().float(),
        # torch.full launches a fill on the device; torch.tensor(x, device=...) would copy from the host
        # and, on CUDA, wait for the stream.
        "nll_tokens": torch.full((), float(nll_tokens), device=c.device),
        "pairs": torch.full((), float(c.numel()), device=c.device),
        "log_odds_ratio_sum": log_sig.detach().sum(),
        "log_odds_sum": lo.detach().sum(),
        "chosen_logps_sum": c.sum(),
        "rejected_logps_sum": r.sum(),
        "accurate_pairs": (c > r).float().sum(),
    }
    return loss, stats


def orpo_pair_stats(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_nll_sum: torch.Tensor,
                    chosen_nll_tokens: torch.Tensor) -> torch.Tensor:
    """The additive statistics of each pair on its own: summing the rows over any set of pairs gives the
    stats :func:`orpo_loss` returns for that set, so a figure of :func:`orpo_metrics` can be recomputed
    on any resample of the pairs (the before/after intervals of :mod:`orpo_ds.compare`).

    Args:
        chosen_logps, rejected_logps: ``[P]`` average log-probs, as :func:`orpo_loss`.
        chosen_nll_sum: ``[P]`` summed NLL of each pair's NLL tokens, and ``chosen_nll_tokens`` ``[P]``
            their number.
    Returns:
        ``[P, len(STAT_KEYS)]`` fp64, columns in ``STAT_KEYS`` order.
    """
    c, r = chosen_logps.detach().float(), rejected_logps.detach().float()
    lo = log_odds(c, r)
    columns = {"nll_sum": chosen_nll_sum.detach(), "nll_tokens": chosen_nll_tokens, "pairs": torch.ones_like(c),
               "log_odds_ratio_sum": F.logsigmoid(lo), "log_odds_sum": lo, "chosen_logps_sum": c,
               "rejected_logps_sum": r, "accurate_pairs": (c > r).float()}
    return torch.stack([columns[k].double() for k in STAT_KEYS], dim=1)


def orpo_metrics(stats: dict[str, float], beta: float) -> dict[str, float]:
    """Step metrics under TRL ORPOTrainer's names, from stats summed over micro-batches and ranks."""
    pairs = max(stats["pairs"], 1.0)
    nll_loss = stats["nll_sum"] / max(stats["nll_tokens"], 1.0)
    log_odds_ratio = stats["log_odds_ratio_sum"] / pairs
    chosen = stats["chosen_logps_sum"] / pairs
    rejected = stats["rejected_logps_sum"] / pairs
    return {
        "loss": nll_loss - beta * log_odds_ratio,
        "nll_loss": nll_loss,
        "log_odds_ratio": log_odds_ratio,
        "log_odds_chosen": stats["log_odds_sum"] / pairs,
        "rewards/chosen": beta * chosen,
        "rewards/rejected": beta * rejected,
        "rewards/margins": beta * (chosen - rejected),
        "rewards/accuracies": stats["accurate_pairs"] / pairs,
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }
