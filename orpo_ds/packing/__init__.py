"""Padding-free packing of preference pairs: a pure data-stage transform with a written contract.

Pipeline (all pure: no torch.distributed, engine, config object or logging in here)::

    pairs ─layout.num_tokens─► pack_pairs ─► bins ─► schedule_steps ─► steps[step][rank] = bin or None
                                              └─► build_row(pairs of a bin) ─► PackedRow

* :func:`pack_pairs` puts pairs into bins of at most ``micro_batch_tokens`` tokens (best-fit-decreasing). A
  pair is the unit of packing, so its chosen and rejected sequences always land in the same row.
* :func:`schedule_steps` deals the bins of each optimizer step to ranks and micro-batch slots, filling the
  last step's empty slots with ``None`` (``orpo_ds.batch.micro_batches`` runs a dummy micro-batch there:
  ZeRO-3 needs every rank in every pass).
* :func:`build_row` lays the pairs of one bin out in one row (batch dim 1, no padding), and
  ``orpo_ds.batch.prepare_micro_batch`` turns it into tensors. The model runs on it with ``position_ids`` and
  ``use_cache=False`` and *no* attention mask; the row's boundaries reach attention as host segments
  (``segmented_sdpa``) or ``cu_seqlens`` (flash-attn varlen), see :mod:`orpo_ds.attention`. The dense
  backends (sdpa/eager) find them where the position ids stop increasing by 1.

Row contract (``T`` tokens, ``S`` sequences, ``P`` pairs; order: pair by pair, and within a pair its
chosen sequence, then its rejected sequence, so sequence ``2p`` is chosen and ``2p + 1`` rejected with
:class:`SeparateSequencesLayout`):

* ``labels[t]`` is the *next-token target* of position ``t``: ``input_ids[t + 1]`` when ``t + 1`` is in the
  same sequence, else ``IGNORE_INDEX`` (-100; the last token of every sequence). The shift is done here,
  per sequence, so it never crosses a boundary. Do NOT pass these labels to a Hugging Face model's
  ``labels=`` argument: it would shift them a second time.
* Prompt-predicting positions carry labels too (for ``nll_on_prompt``); ``response_mask[t]`` is True where
  ``labels[t]`` is a response token (chosen or rejected, the closing EOS included).
* With an empty prompt the first response token has no context and is not predicted, so that sequence
  scores ``len(response) - 1`` tokens; otherwise all ``len(response)`` tokens are scored.

Worked example. One pair, ``pair_id=7``, prompt ``(11, 12)``, chosen ``(21, 22, 2)``, rejected
``(31, 2)`` (2 is EOS). Sequence 0 = prompt + chosen, sequence 1 = prompt + rejected; ``T = 9``, ``S = 2``::

    t               0    1    2    3    4  |  5    6    7    8
    input_ids      11   12   21   22    2  | 11   12   31    2
    position_ids    0    1    2    3    4  |  0    1    2    3
    labels         12   21   22    2 -100  | 12   31    2 -100
    response_mask   F    T    T    T    F  |  F    T    T    F
    seq_id          0    0    0    0    0  |  1    1    1    1

    seq_pair_index = [0, 0]    seq_pair_id = [7, 7]    seq_is_chosen = [True, False]
    seq_lengths    = [5, 4]    num_pairs   = 1

The chosen response scores 21, 22, 2 (at t = 1, 2, 3); the rejected one 31, 2 (at t = 6, 7). Position 4
would "predict" the first token of the next sequence, so its label is -100.

Layouts. A :class:`PairLayout` decides how a pair's tokens sit in a row: it reports ``num_tokens(pair)``
(what the packer budgets) and emits :class:`LaidOutSequence` objects (what the row builder concatenates).
:class:`SeparateSequencesLayout` (above) stores the prompt twice; :class:`SharedPromptLayout`
(``train.share_prompt``) stores it once, and its docstring works the same pair through. The callers of
:func:`pack_pairs` and ``prepare_micro_batch`` do not change with the layout.
"""

from orpo_ds.packing.bins import fill_ratio, pack_pairs, packing_efficiency
from orpo_ds.packing.layout import (
    DEFAULT_LAYOUT,
    LaidOutSequence,
    PairLayout,
    SeparateSequencesLayout,
    SharedPromptLayout,
    layout_for,
)
from orpo_ds.packing.rows import PackedRow, build_row
from orpo_ds.packing.schedule import ScheduledStep, reschedule_run, schedule_epoch, schedule_run, schedule_steps

__all__ = [
    "LaidOutSequence", "PairLayout", "SeparateSequencesLayout", "SharedPromptLayout", "DEFAULT_LAYOUT",
    "layout_for", "PackedRow", "pack_pairs", "packing_efficiency", "fill_ratio", "schedule_steps", "ScheduledStep",
    "schedule_epoch", "schedule_run", "reschedule_run", "build_row",
]
