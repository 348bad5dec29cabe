"""How a pair is laid out in a row: its sequences (:class:`LaidOutSequence`), and the two layouts, separate
sequences or a prompt shared by both responses (``train.share_prompt``)."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from orpo_ds.data.columns import FIELDS, TokenizedPairs  # the input, made by the data pipeline
from orpo_ds.data.pairs import TokenizedPair
from orpo_ds.logps import IGNORE_INDEX  # the label the log-prob head skips


@dataclass(frozen=True)
class LaidOutSequence:
    """One sequence of a row (one ``seq_id``), as a layout places it. Arrays are ``[L]``.

    With :class:`SeparateSequencesLayout` it is prompt + response with positions from 0. With
    :class:`SharedPromptLayout` the chosen sequence is prompt + chosen, and the rejected one holds only its
    response and *borrows* the prompt: it attends to the first ``context_tokens`` tokens of the segment
    before it, and the last of those tokens predicts its first token, ``context_label``.

    Attributes:
        input_ids: ``[L]`` int64.
        position_ids: ``[L]`` int64.
        labels: ``[L]`` int64, next-token target of each position, ``IGNORE_INDEX`` where none.
        response_mask: ``[L]`` bool, True where ``labels`` is a response token.
        is_chosen: whether the sequence is the pair's chosen (else rejected) one.
        context_tokens: tokens at the start of the previous segment that this one attends to before its
            own (0: none).
        context_label: the response token the last context token predicts for this sequence (a second
            target of that position), ``IGNORE_INDEX`` when ``context_tokens`` is 0.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    response_mask: np.ndarray
    is_chosen: bool
    context_tokens: int = 0
    context_label: int = IGNORE_INDEX


class PairLayout(abc.ABC):
    """How a pair's tokens are laid out in a row. Stateless; subclasses must keep
    ``num_tokens(pair) == sum(len(s.input_ids) for s in segments(pair))`` (build_row checks it), since the
    packer budgets with the former and the row is built from the latter."""

    @abc.abstractmethod
    def num_tokens(self, pair: TokenizedPair) -> int:
        """Tokens the pair occupies in a row."""

    @abc.abstractmethod
    def segments(self, pair: TokenizedPair) -> list[LaidOutSequence]:
        """The pair's segments, in row order."""

    def pair_num_tokens(self, pairs: TokenizedPairs) -> np.ndarray:
        """``[N]`` int64 :meth:`num_tokens` of every pair, what the packer budgets. This generic version
        builds each pair; :class:`LengthsLayout` computes it from the length columns alone."""
        return np.fromiter((self.num_tokens(p) for p in pairs), dtype=np.int64, count=len(pairs))


class LengthsLayout(PairLayout):
    """A layout whose token count is a function of the three lengths only (both built-in layouts): one
    formula, :meth:`tokens_of_lengths`, serves one pair and a million at once."""

    @staticmethod
    @abc.abstractmethod
    def tokens_of_lengths(prompt, chosen, rejected):
        """Tokens in a row from the lengths of prompt, chosen and rejected: ints, or ``[N]`` int64 arrays."""

    def num_tokens(self, pair: TokenizedPair) -> int:
        return self.tokens_of_lengths(len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids))

    def pair_num_tokens(self, pairs: TokenizedPairs) -> np.ndarray:
        return self.tokens_of_lengths(*(pairs.lengths(f) for f in FIELDS))


def _sequence_segment(prompt: tuple[int, ...], response: tuple[int, ...], is_chosen: bool) -> LaidOutSequence:
    """One sequence ``prompt + response``, positions from 0, labels shifted within the sequence."""
    input_ids = np.asarray(prompt + response, dtype=np.int64)
    length = input_ids.shape[0]
    labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = input_ids[1:]
    # Position t predicts token t + 1, a response token iff t + 1 >= len(prompt); the last position
    # predicts nothing.
    response_mask = np.zeros(length, dtype=bool)
    response_mask[max(len(prompt) - 1, 0):length - 1] = True
    return LaidOutSequence(input_ids, np.arange(length, dtype=np.int64), labels, response_mask, is_chosen)


class SeparateSequencesLayout(LengthsLayout):
    """Two independent sequences, ``[prompt + chosen]`` then ``[prompt + rejected]``, each with position
    ids from 0. The prompt is stored twice: ``2*len(prompt) + len(chosen) + len(rejected)`` tokens."""

    @staticmethod
    def tokens_of_lengths(prompt, chosen, rejected):
        return 2 * prompt + chosen + rejected

    def segments(self, pair: TokenizedPair) -> list[LaidOutSequence]:
        return [_sequence_segment(pair.prompt_ids, pair.chosen_ids, is_chosen=True),
                _sequence_segment(pair.prompt_ids, pair.rejected_ids, is_chosen=False)]


class SharedPromptLayout(LengthsLayout):
    """Prompt once: ``[prompt + chosen]`` then ``[rejected]``, ``len(prompt) + len(chosen) + len(rejected)``
    tokens. The rejected response attends to the prompt's keys and values, never to the chosen ones, and
    its position ids continue from the prompt's end, so every token sees exactly what it sees in
    :class:`SeparateSequencesLayout` and gets the same hidden state.

    The first chosen token and the first rejected token are both predicted from the prompt's last
    position: that position carries the chosen token as its label, and the rejected segment names the
    rejected token as its ``context_label``, which ``build_row`` turns into a second head target of the
    same position (``PackedRow.extra_*``).

    Worked example: the pair of the module docstring, prompt ``(11, 12)``, chosen ``(21, 22, 2)``, rejected
    ``(31, 2)``; ``T = 7`` instead of 9::

        t               0    1    2    3    4  |  5    6
        input_ids      11   12   21   22    2  | 31    2
        position_ids    0    1    2    3    4  |  2    3
        labels         12   21   22    2 -100  |  2 -100
        response_mask   F    T    T    T    F  |  T    F
        seq_id          0    0    0    0    0  |  1    1
        attends to      causal over 0..t       |  0, 1, then causal over 5..t

        extra target: position 1 (token 12) -> label 31, sequence 1, a response token

    The chosen response scores 21, 22, 2 at t = 1, 2, 3; the rejected one 31 at t = 1 (the extra target)
    and 2 at t = 5: the same five log-probs as the separate layout. The prompt-predicting target (t = 0)
    belongs to the chosen sequence, so ``nll_on_prompt`` counts the prompt once, as without sharing. An
    empty prompt leaves nothing to share: the two responses are then laid out as separate sequences.
    """

    @staticmethod
    def tokens_of_lengths(prompt, chosen, rejected):
        return prompt + chosen + rejected

    def segments(self, pair: TokenizedPair) -> list[LaidOutSequence]:
        prompt = pair.prompt_ids
        chosen = _sequence_segment(prompt, pair.chosen_ids, is_chosen=True)
        if not prompt:
            return [chosen, _sequence_segment((), pair.rejected_ids, is_chosen=False)]
        rejected = np.asarray(pair.rejected_ids, dtype=np.int64)
        labels = np.full(rejected.shape[0], IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = rejected[1:]
        response_mask = np.zeros(rejected.shape[0], dtype=bool)
        response_mask[:-1] = True
        positions = np.arange(len(prompt), len(prompt) + rejected.shape[0], dtype=np.int64)
        return [chosen, LaidOutSequence(rejected, positions, labels, response_mask, is_chosen=False,
                                context_tokens=len(prompt), context_label=int(rejected[0]))]


DEFAULT_LAYOUT: PairLayout = SeparateSequencesLayout()


def layout_for(share_prompt: bool) -> PairLayout:
    """The layout of ``train.share_prompt``."""
    return SharedPromptLayout() if share_prompt else DEFAULT_LAYOUT
