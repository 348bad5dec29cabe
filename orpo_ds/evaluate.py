"""Held-out preference metrics: the same forward path and formulas as training, no gradients.

Used by the trainer's periodic eval (through the DeepSpeed engine) and by ``orpo-ds eval`` (a plain
model on one process), so both report comparable numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from orpo_ds.batch import micro_batch_pair_stats, micro_batches
from orpo_ds.compare import HELD_OUT, SEEN
from orpo_ds.data import TokenizedPair
from orpo_ds.distributed import reduce_to_host
from orpo_ds.loss import STAT_KEYS, orpo_metrics
from orpo_ds.metrics import progress_bar
from orpo_ds.model import PolicyOutput
from orpo_ds.packing import DEFAULT_LAYOUT, PairLayout, schedule_epoch

# The figures a user compares between checkpoints, by their metric names.
HEADLINE = {"rewards/accuracies": "preference accuracy", "log_odds_chosen": "mean log-odds",
            "nll_loss": "chosen NLL"}


@torch.no_grad()
def pair_stats(forward: Callable[..., PolicyOutput], pairs: Sequence[TokenizedPair], *, micro_batch_tokens: int,
               nll_on_prompt: bool, pad_token_id: int, rank: int = 0, world_size: int = 1,
               device: torch.device | str = "cpu", layout: PairLayout = DEFAULT_LAYOUT,
               progress: str | None = None) -> np.ndarray:
    """Each pair's additive ORPO statistics under ``forward`` (a :class:`PolicyWithChunkedHead` or an
    engine wrapping one), without gradients. Collective: the pairs are packed as one training epoch with
    one micro-batch per step (seed 0), so each rank runs its share and the same number of passes (ZeRO-3
    gathers parameters collectively); every rank gets every pair's row. ``progress`` names a progress
    bar shown on rank 0.

    Returns:
        ``[len(pairs), len(STAT_KEYS)]`` fp64, row ``i`` for ``pairs[i]``.
    """
    rows = torch.zeros(len(pairs), len(STAT_KEYS), dtype=torch.float64, device=device)  # filled on the device
    plans = schedule_epoch(pairs, micro_batch_tokens, world_size, 1, seed=0, epoch=0, layout=layout)
    bar = progress_bar(len(plans), enabled=progress is not None and rank == 0, desc=progress or "", unit="row")
    for plan in plans:
        slots = plan.rows[rank]
        for slot, mb in zip(slots, micro_batches(slots, pairs, nll_on_prompt=nll_on_prompt,
                                                 pad_token_id=pad_token_id, device=device, layout=layout),
                            strict=True):
            token_logps = forward(**mb.model_inputs()).token_logps
            if slot is not None:  # a row's pairs are in its slot's order
                rows[list(slot)] = micro_batch_pair_stats(token_logps, mb)
        bar.update(1)
    bar.close()
    # Each pair's row is filled on one rank and zero on the others: a sum puts every row on every rank.
    return np.asarray(reduce_to_host(rows), dtype=np.float64).reshape(len(pairs), len(STAT_KEYS))


def metrics_of(stats: np.ndarray, beta: float) -> dict[str, float]:
    """Metrics (TRL names) of the pairs whose :func:`pair_stats` rows are ``stats`` ``[N, K]``."""
    return orpo_metrics(dict(zip(STAT_KEYS, stats.sum(axis=0).tolist(), strict=True)), beta)


def evaluate_pairs(forward: Callable[..., PolicyOutput], pairs: Sequence[TokenizedPair], *, beta: float,
                   **options) -> dict[str, float]:
    """Metrics (TRL names) of ``pairs`` under ``forward``; ``options`` as :func:`pair_stats`. Collective."""
    return metrics_of(pair_stats(forward, pairs, **options), beta)


class Evaluator:
    """The run's evaluation through the engine: the held-out figures (``eval/`` names) every
    ``train.eval_steps``, and the before/after snapshots of :mod:`orpo_ds.compare`.

    A snapshot holds each fixed set's per-pair stats (the held-out pairs and ``seen``, a sample of the
    training pairs) and ``answer``'s greedy answers to the prompts of the ``samples`` pairs.
    """

    def __init__(self, engine, pairs: Sequence[TokenizedPair], *, every: int, total_steps: int, micro_batch_tokens: int,
                 beta: float, nll_on_prompt: bool, pad_token_id: int, rank: int, world_size: int,
                 device: torch.device, layout: PairLayout = DEFAULT_LAYOUT, seen: Sequence[TokenizedPair] = (),
                 samples: Sequence[TokenizedPair] = (),
                 answer: Callable[[list[tuple[int, ...]]], list[str]] | None = None):
        self.engine, self.pairs, self.every, self.total_steps, self.beta = engine, pairs, every, total_steps, beta
        self.sets = {name: s for name, s in ((HELD_OUT, pairs), (SEEN, list(seen))) if s}
        self.samples, self.answer = (list(samples), answer) if answer is not None else ([], None)
        self.options = dict(micro_batch_tokens=micro_batch_tokens, nll_on_prompt=nll_on_prompt,
                            pad_token_id=pad_token_id, rank=rank, world_size=world_size, device=device,
                            layout=layout)

    @property
    def enabled(self) -> bool:
        return bool(self.pairs)

    @property
    def compares(self) -> bool:
        """Whether there is anything to snapshot before and after training."""
        return bool(self.sets or self.samples)

    def due(self, step: int) -> bool:
        """Every ``train.eval_steps`` steps; not at the last step, which the after-training eval covers."""
        return self.enabled and bool(self.every) and step % self.every == 0 and step < self.total_steps

    def stats(self, pairs: Sequence[TokenizedPair], name: str = HELD_OUT) -> np.ndarray:
        """:func:`pair_stats` through the engine, in eval mode, with a progress bar named ``name``."""
        self.engine.eval()
        try:
            return pair_stats(self.engine, pairs, progress=f"eval {name}", **self.options)
        finally:
            self.engine.release_gathered()
            self.engine.train()

    def __call__(self) -> dict[str, float]:
        """Held-out metrics under ``eval/`` names."""
        return self.eval_record(self.stats(self.pairs))

    def eval_record(self, held_out_stats: np.ndarray) -> dict[str, float]:
        return {f"eval/{k}": v for k, v in metrics_of(held_out_stats, self.beta).items()}

    def snapshot(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective. ``(record, snapshot)``: the held-out ``eval/`` record of ``step`` for metrics.jsonl
        (just ``{"step": step}`` without held-out pairs), and the snapshot ``{"step", "pairs": {set:
        [N, K] rows}, "answers": [...]}``."""
        stats = {name: self.stats(s, name) for name, s in self.sets.items()}
        record = {"step": step, **(self.eval_record(stats[HELD_OUT]) if HELD_OUT in stats else {})}
        answers = []
        if self.samples:
            self.engine.eval()
            try:
                answers = self.answer([p.prompt_ids for p in self.samples])
            finally:
                self.engine.release_gathered()
                self.engine.train()
        return record, {"step": step, "pairs": {k: v.tolist() for k, v in stats.items()}, "answers": answers}


def evaluate_model_dir(model_dir: str, data: str, *, max_length: int = 1024, micro_batch_tokens: int = 8192,
                       beta: float = 0.1, nll_on_prompt: bool = False, fmt: str = "auto",
                       attn_implementation: str = "auto") -> dict[str, float]:
    """``orpo-ds eval``: one process, the model in fp32 on the CPU (bf16 on a GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo_ds.attention import resolve_attn_implementation
    from orpo_ds.data import DataError, load_records, tokenize_pairs
    from orpo_ds.model import PolicyWithChunkedHead
    from orpo_ds.model_files import check_max_length, pad_token_id, read_model_config

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    model_config = read_model_config(model_dir, "--model")
    check_max_length(max_length, model_config, "--max-length")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, report = tokenize_pairs(load_records(data), tokenizer, max_length=max_length, fmt=fmt, progress=False)
    print(f"[data] {data}: {report.summary()}")
    if not pairs:
        raise DataError(f"--data {data}: no usable pair to evaluate ({report.summary()})")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation, dtype=dtype),
    ).to(device).eval()
    pad = pad_token_id(tokenizer)
    return evaluate_pairs(PolicyWithChunkedHead(model), pairs,
                          micro_batch_tokens=max(micro_batch_tokens, 2 * max_length), beta=beta,
                          nll_on_prompt=nll_on_prompt, pad_token_id=pad, device=device)
