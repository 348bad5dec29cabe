"""The router of a mixture-of-experts model: its load-balancing loss, as the family's ``ForCausalLM`` adds
it, and how many tokens each expert received.

transformers gives each MoE family a ``load_balancing_loss_func`` in its modeling module (Switch
Transformer's loss: ``E * sum_e f_e * P_e``, with ``f_e`` the share of top-k assignments that went to
expert ``e`` and ``P_e`` its mean router probability, over the tokens of one forward pass and all its
MoE layers). The policy runs the decoder body, not the ``ForCausalLM``, so the loss is computed here, by
that same function, on the router logits the body records. A packed row has no padding: every token is
routed and counted, a shared prompt's once.

Pure torch, no host reads: the counts use ``histc`` with fixed bounds, as the family's function does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from orpo_ds.config import ConfigError

__all__ = ["RouterLoss", "resolve_router_loss", "expert_token_counts", "expert_load_figures"]


@dataclass(frozen=True)
class RouterLoss:
    """What a mixture-of-experts policy computes from its router logits.

    ``coef`` is the weight of the balancing loss in the step's loss; 0 when the run does not add it (the
    expert counts are still taken, for the ``moe/`` metrics)."""

    balancing_loss: Callable  # the family's load_balancing_loss_func(gate_logits, num_experts, top_k)
    num_experts: int
    top_k: int
    coef: float
    source: str  # where coef comes from, for the start-up line

    def describe(self) -> str:
        loss = f"balancing loss x {self.coef:g} ({self.source})" if self.coef else f"no balancing loss ({self.source})"
        return f"mixture of experts: {self.num_experts} experts, top-{self.top_k}; {loss}"


def resolve_router_loss(causal_lm: torch.nn.Module, coef_override: float | None) -> RouterLoss | None:
    """The :class:`RouterLoss` of ``causal_lm`` (a transformers ``ForCausalLM``, or peft's model of one),
    or None for a model without a router loss in transformers.

    TRL's rule decides whether the loss is added: the model config's ``output_router_logits`` with its
    ``router_aux_loss_coef``. ``coef_override`` (``loss.router_aux_loss_coef``) turns it on with that
    weight instead; set on a model that has no router loss, it is a :class:`ConfigError`.
    """
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm  # peft
    balancing_loss = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
    num_experts, top_k = getattr(base, "num_experts", None), getattr(base, "num_experts_per_tok", None)
    if balancing_loss is None or num_experts is None or top_k is None:
        if coef_override is not None:
            raise ConfigError(f"loss.router_aux_loss_coef: {type(base).__name__} has no router load-balancing loss "
                              f"in transformers (not a mixture of experts, or a family that balances its "
                              f"experts another way); remove the key")
        return None
    config = base.config
    if coef_override is not None:
        coef, source = float(coef_override), "loss.router_aux_loss_coef"
    elif getattr(config, "output_router_logits", False):
        coef, source = float(config.router_aux_loss_coef), "the model config's router_aux_loss_coef"
    else:
        coef, source = 0.0, "the model config's output_router_logits is false; set loss.router_aux_loss_coef"
    return RouterLoss(balancing_loss, int(num_experts), int(top_k), coef, source)


def expert_token_counts(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Top-k assignments per expert in each MoE layer.

    Args:
        router_logits: one ``[T, E]`` tensor per MoE layer, as the body records them.
    Returns:
        ``[L, E]`` fp32 counts (each layer's row sums to ``T * top_k``); no gradient.
    """
    rows = []
    for logits in router_logits:
        chosen = logits.detach().topk(top_k, dim=-1).indices  # the family's function picks top-k of softmax
        rows.append(torch.histc(chosen.reshape(-1).float(), bins=num_experts, min=0, max=num_experts))
    return torch.stack(rows)


def expert_load_figures(counts: torch.Tensor | list[list[float]]) -> dict[str, float]:
    """The step's expert-load metrics from its summed ``[L, E]`` counts (all micro-batches, all ranks).

    ``moe/load_max_over_mean``: the busiest expert's tokens over the mean expert's, averaged over layers;
    1.0 is a perfect balance, ``E / top_k`` the ceiling: the same ``top_k`` experts took every token (a
    collapsed router; an expert gets a token at most once, the mean is ``T * top_k / E``).
    ``moe/load_max_over_mean_worst_layer``: the same figure in the least balanced layer.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    ratio = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-12)  # [L]
    return {"moe/load_max_over_mean": float(ratio.mean()), "moe/load_max_over_mean_worst_layer": float(ratio.max())}
