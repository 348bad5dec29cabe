"""Synthetic preference data for trainer tests, written as standard-format jsonl."""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST_HALF = "abcdefghijklm"
SECOND_HALF = "nopqrstuvwxyz"


def write_pairs(path: str | Path, n: int, *, seed: int = 0, prompt_len=(4, 12), response_len=(3, 10)) -> Path:
    """A learnable task: chosen responses use letters a-m, rejected ones n-z, prompts mix both.

    A model that learns to prefer the first half of the alphabet after a prompt separates the pairs, so
    preference accuracy should climb well above chance (0.5) within a few hundred steps.
    """
    rng = random.Random(seed)

    def text(alphabet: str, lo_hi) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(*lo_hi)))

    rows = [{"prompt": text(FIRST_HALF + SECOND_HALF, prompt_len) + "?",
             "chosen": text(FIRST_HALF, response_len),
             "rejected": text(SECOND_HALF, response_len)} for _ in range(n)]
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
