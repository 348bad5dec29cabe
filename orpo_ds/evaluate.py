"""Held-out preference metrics: the same forward path and formulas as training, no gradients.

Used by the trainer's periodic eval (through the DeepSpeed engine) and by ``orpo-ds eval`` (a plain
model on one process), so both report comparable numbers.
"""

from __future__ import annotations

from typing import Callable

import torch

from orpo_ds.batch import dummy_micro_batch, micro_batch_loss, prepare_micro_batch
from orpo_ds.engine import reduce_to_host
from orpo_ds.loss import STAT_KEYS, orpo_metrics
from orpo_ds.packing import DEFAULT_LAYOUT, TokenizedPair, build_row, pack_pairs, plan_steps

# The figures a user compares between checkpoints, by their metric names.
HEADLINE = {"rewards/accuracies": "preference accuracy", "log_odds_chosen": "mean log-odds",
            "nll_loss": "chosen NLL"}


@torch.no_grad()
def evaluate_pairs(forward: Callable[..., torch.Tensor], pairs: list[TokenizedPair], *, micro_batch_tokens: int,
                   beta: float, nll_on_prompt: bool, pad_token_id: int, rank: int = 0, world_size: int = 1,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Metrics (TRL names) of ``pairs`` under ``forward`` (a :class:`PolicyWithChunkedHead` or an engine
    wrapping one). With several ranks each runs its share and the same number of passes (ZeRO-3
    gathers parameters collectively); the sums are all-reduced."""
    lengths = [DEFAULT_LAYOUT.num_tokens(p) for p in pairs]
    bins = pack_pairs(lengths, micro_batch_tokens, seed=0, epoch=0)
    totals = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=device)  # summed on the device: no host sync
    for step in plan_steps([sum(lengths[i] for i in b) for b in bins], world_size, 1):
        (slot,) = step[rank]
        if slot is None:
            mb = dummy_micro_batch(pad_token_id, device)
        else:
            mb = prepare_micro_batch(build_row([pairs[i] for i in bins[slot]]), nll_on_prompt=nll_on_prompt,
                                     device=device)
        _, stats = micro_batch_loss(forward(**mb.model_inputs()), mb, beta=beta, global_nll_tokens=1,
                                    global_pairs=1)
        if stats:
            totals += torch.stack([stats[k] for k in STAT_KEYS]).double()
    return orpo_metrics(dict(zip(STAT_KEYS, reduce_to_host(totals))), beta)


def evaluate_model_dir(model_dir: str, data: str, *, max_length: int = 1024, micro_batch_tokens: int = 8192,
                       beta: float = 0.1, nll_on_prompt: bool = False, fmt: str = "auto",
                       attn_implementation: str = "sdpa") -> dict[str, float]:
    """``orpo-ds eval``: one process, the model in fp32 on the CPU (bf16 on a GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo_ds.data import load_records, tokenize_pairs
    from orpo_ds.model import PolicyWithChunkedHead, resolve_attn_implementation

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, report = tokenize_pairs(load_records(data), tokenizer, max_length=max_length, fmt=fmt, progress=False)
    print(f"[data] {data}: {report.summary()}")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32,
        attn_implementation=resolve_attn_implementation(attn_implementation)).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return evaluate_pairs(PolicyWithChunkedHead(model), pairs, micro_batch_tokens=max(micro_batch_tokens, 2 * max_length),
                          beta=beta, nll_on_prompt=nll_on_prompt, pad_token_id=pad, device=device)
