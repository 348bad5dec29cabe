"""Preemption: SLURM's --signal (SIGUSR1) or a SIGTERM stops the run cleanly between optimizer steps."""

from __future__ import annotations

import signal

import torch

from orpo_ds import engine as eng_lib


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; a checkpoint of the last finished step was saved."""


class PreemptionSignal:
    """Records SIGTERM / SIGUSR1 (what SLURM sends with --signal) so the loop can stop between steps.

    Ranks may see the signal at different moments, so :meth:`requested` all-reduces the flag and every
    rank stops after the same step.
    """

    def __init__(self):
        self._flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self._flag = True

    def requested(self) -> bool:
        return eng_lib.all_reduce_sum(torch.tensor([float(self._flag)])).item() > 0
