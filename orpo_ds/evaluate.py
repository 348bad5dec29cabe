"""Held-out preference metrics: the same forward path and formulas as training, no gradients.

Used by the trainer's periodic eval (through the DeepSpeed engine) and by ``orpo-ds eval`` (a plain
model on one process), so both report comparable numbers.
"""

from __future__ import annotations

from typing import Callable

import torch

from orpo_ds.batch import micro_batch_loss, micro_batches
from orpo_ds.data import TokenizedPair
from orpo_ds.engine import reduce_to_host
from orpo_ds.loss import STAT_KEYS, orpo_metrics
from orpo_ds.packing import DEFAULT_LAYOUT, PairLayout, plan_epoch

# The figures a user compares between checkpoints, by their metric names.
HEADLINE = {"rewards/accuracies": "preference accuracy", "log_odds_chosen": "mean log-odds",
            "nll_loss": "chosen NLL"}


@torch.no_grad()
def evaluate_pairs(forward: Callable[..., torch.Tensor], pairs: list[TokenizedPair], *, micro_batch_tokens: int,
                   beta: float, nll_on_prompt: bool, pad_token_id: int, rank: int = 0, world_size: int = 1,
                   device: torch.device | str = "cpu", layout: PairLayout = DEFAULT_LAYOUT) -> dict[str, float]:
    """Metrics (TRL names) of ``pairs`` under ``forward`` (a :class:`PolicyWithChunkedHead` or an engine
    wrapping one). The pairs are packed as one training epoch with one micro-batch per step (seed 0), so
    with several ranks each runs its share and the same number of passes (ZeRO-3 gathers parameters
    collectively); the sums are all-reduced."""
    totals = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=device)  # summed on the device: no host sync
    for plan in plan_epoch(pairs, micro_batch_tokens, world_size, 1, seed=0, epoch=0, layout=layout):
        for mb in micro_batches(plan.rows[rank], pairs, nll_on_prompt=nll_on_prompt, pad_token_id=pad_token_id,
                                device=device, layout=layout):
            _, stats = micro_batch_loss(forward(**mb.model_inputs()), mb, beta=beta, global_nll_tokens=1,
                                        global_pairs=1)
            if stats:
                totals += torch.stack([stats[k] for k in STAT_KEYS]).double()
    return orpo_metrics(dict(zip(STAT_KEYS, reduce_to_host(totals), strict=True)), beta)


class Evaluator:
    """The run's held-out evaluation: whether it is enabled, when it is due, and its ``eval/`` figures."""

    def __init__(self, engine, pairs: list[TokenizedPair], *, every: int, total_steps: int, micro_batch_tokens: int,
                 beta: float, nll_on_prompt: bool, pad_token_id: int, rank: int, world_size: int,
                 device: torch.device, layout: PairLayout = DEFAULT_LAYOUT):
        self.engine, self.pairs, self.every, self.total_steps = engine, pairs, every, total_steps
        self.options = dict(micro_batch_tokens=micro_batch_tokens, beta=beta, nll_on_prompt=nll_on_prompt,
                            pad_token_id=pad_token_id, rank=rank, world_size=world_size, device=device,
                            layout=layout)

    @property
    def enabled(self) -> bool:
        return bool(self.pairs)

    def due(self, step: int) -> bool:
        """Every ``train.eval_steps`` steps; not at the last step, which the after-training eval covers."""
        return self.enabled and bool(self.every) and step % self.every == 0 and step < self.total_steps

    def __call__(self) -> dict[str, float]:
        """Held-out metrics under ``eval/`` names, through the engine, without gradients."""
        self.engine.eval()
        metrics = evaluate_pairs(self.engine, self.pairs, **self.options)
        self.engine.release_gathered()
        self.engine.train()
        return {f"eval/{k}": v for k, v in metrics.items()}


def evaluate_model_dir(model_dir: str, data: str, *, max_length: int = 1024, micro_batch_tokens: int = 8192,
                       beta: float = 0.1, nll_on_prompt: bool = False, fmt: str = "auto",
                       attn_implementation: str = "auto") -> dict[str, float]:
    """``orpo-ds eval``: one process, the model in fp32 on the CPU (bf16 on a GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo_ds.attention import resolve_attn_implementation
    from orpo_ds.data import load_records, tokenize_pairs
    from orpo_ds.model import PolicyWithChunkedHead

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, report = tokenize_pairs(load_records(data), tokenizer, max_length=max_length, fmt=fmt, progress=False)
    print(f"[data] {data}: {report.summary()}")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32,
        attn_implementation=resolve_attn_implementation(attn_implementation)).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return evaluate_pairs(PolicyWithChunkedHead(model), pairs,
                          micro_batch_tokens=max(micro_batch_tokens, 2 * max_length), beta=beta,
                          nll_on_prompt=nll_on_prompt, pad_token_id=pad, device=device)
