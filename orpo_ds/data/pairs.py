"""One tokenized preference pair: :class:`TokenizedPair` (a data set's pairs are held as columns, in
:mod:`orpo_ds.data.columns`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenizedPair"]


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair, tokenized. Produced by :func:`orpo_ds.data.tokenize_pairs`, consumed by
    :mod:`orpo_ds.packing`.

    Attributes:
        pair_id: index of the source row in the dataset (for error messages and logs).
        prompt_ids: prompt tokens; may be empty.
        chosen_ids: chosen response tokens, non-empty, closed by EOS (unless truncation cut the response:
            like TRL, a cut response carries no EOS, so the model is not taught to stop mid-answer).
        rejected_ids: rejected response tokens, same rules.
    """

    pair_id: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples (the dataclass is hashable then).
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        for name in ("chosen_ids", "rejected_ids"):
            # Each response needs at least one predicted token, or its average log-prob is 0/0 = NaN.
            # Without a prompt the first response token is not predicted by anything.
            n_scored = len(getattr(self, name)) - (0 if self.prompt_ids else 1)
            if n_scored < 1:
                raise ValueError(
                    f"pair {self.pair_id}: {name} has {len(getattr(self, name))} token(s) and the prompt "
                    f"{len(self.prompt_ids)}, which leaves no response token to score; a response needs "
                    f">= 1 token after a non-empty prompt, >= 2 without one")

