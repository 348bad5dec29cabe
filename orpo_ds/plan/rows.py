"""The rows and steps a config would train on: from its data through the trainer's own tokenizer, cache
and packer when the data file exists, else from the config's limits (full rows of full-length pairs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orpo_ds.config import Config
from orpo_ds.flops import step_flops, step_shape
from orpo_ds.packing import layout_for, schedule_epoch
from orpo_ds.plan.shapes import preset_of

# Without data: the share of a row's tokens that reach the head (response tokens). ORPO pairs in the
# public sets (UltraFeedback, Capybara) put about half of their tokens in the responses.
ASSUMED_HEAD_FRACTION = 0.5


@dataclass(frozen=True)
class RowStats:
    """What memory and time need from the data.

    Attributes:
        largest_row_tokens: tokens of the fullest packed row (memory is planned for it).
        head_fraction: positions reaching the head per token, over the epoch.
        steps_per_epoch: optimizer steps of one epoch on ``ranks`` GPUs.
        flops_per_step: mean model FLOPs of a step, all ranks together.
        tokens_per_step: mean tokens of a step's packed rows, all ranks together.
        pairs: usable pairs (None without data).
        source: where the figures come from, for the report.
    """

    largest_row_tokens: int
    head_fraction: float
    steps_per_epoch: int | None
    flops_per_step: float
    tokens_per_step: float
    pairs: int | None
    source: str


def from_data(cfg: Config, model_config, ranks: int) -> RowStats:
    """Tokenize (or read the tokenized cache of) ``data.train`` and pack epoch 0 exactly as training would."""
    from orpo_ds.data import tokenize_data_section
    from orpo_ds.model_files import load_tokenizer

    d, t = cfg.data, cfg.train
    pairs, _ = tokenize_data_section(d.train, load_tokenizer(cfg), d, progress=True)
    layout = layout_for(t.share_prompt)
    steps = schedule_epoch(pairs, t.micro_batch_tokens, ranks, t.grad_accum, seed=t.seed, epoch=0, layout=layout)
    pair_tokens = layout.pair_num_tokens(pairs)  # [N], from the length columns: no pair is built
    row_tokens = [int(pair_tokens[row].sum()) for s in steps for row in s.filled_rows()]
    flops, head = 0.0, 0
    for s in steps:
        lengths, head_positions = step_shape(s, pairs, cfg.loss.nll_on_prompt)
        flops += step_flops(model_config, lengths, head_positions)
        head += head_positions
    return RowStats(largest_row_tokens=max(row_tokens), head_fraction=head / sum(row_tokens),
                    steps_per_epoch=len(steps), flops_per_step=flops / len(steps),
                    tokens_per_step=sum(row_tokens) / len(steps), pairs=len(pairs),
                    source=f"{d.train}: {len(pairs)} pairs packed into {len(row_tokens)} rows")


def assumed(cfg: Config, model_config, ranks: int) -> RowStats:
    """Full rows of ``data.max_length``-token sequences, half of whose tokens reach the head."""
    t, max_length = cfg.train, cfg.data.max_length
    per_row = [max_length] * (t.micro_batch_tokens // max_length)
    rows = ranks * t.grad_accum
    tokens = rows * len(per_row) * max_length
    flops = step_flops(model_config, per_row * rows, int(tokens * ASSUMED_HEAD_FRACTION))
    return RowStats(largest_row_tokens=t.micro_batch_tokens, head_fraction=ASSUMED_HEAD_FRACTION,
                    steps_per_epoch=None, flops_per_step=flops, tokens_per_step=tokens, pairs=None,
                    source=f"no data read from {cfg.data.train}: full rows of {max_length}-token sequences, "
                           f"{ASSUMED_HEAD_FRACTION:.0%} of tokens in responses (assumed); no epoch time")


def row_stats(cfg: Config, model_config, ranks: int) -> RowStats:
    """From the data when it exists and the model names a tokenizer (a folder or hub name, not a preset)."""
    if Path(cfg.data.train).is_file() and preset_of(cfg.model.name_or_path) is None:
        return from_data(cfg, model_config, ranks)
    return assumed(cfg, model_config, ranks)
