"""Stopping cleanly between optimizer steps: SLURM's --signal (SIGUSR1), SIGTERM, and Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import sys

import torch

from orpo_ds import distributed as dist_lib
from orpo_ds.exit_codes import EXIT_INTERRUPTED, EXIT_PREEMPTED


class Preempted(Exception):
    """A stop signal arrived; a checkpoint of the last finished step was saved. ``exit_code`` is 75 for
    SIGTERM/SIGUSR1 and 130 for SIGINT."""

    def __init__(self, message: str, exit_code: int = EXIT_PREEMPTED):
        super().__init__(message)
        self.exit_code = exit_code


class PreemptionSignal:
    """Records SIGTERM / SIGUSR1 (what SLURM sends with --signal) and a first SIGINT, so the loop can
    finish the current step, save and stop. A second SIGINT ends the process at once (exit 130).

    Ranks may see a signal at different moments, so :meth:`requested` all-reduces the flags and every
    rank stops after the same step.
    """

    def __init__(self):
        self._terminate = False
        self._interrupt = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum != signal.SIGINT:
            self._terminate = True
            return
        if self._interrupt:
            print("\norpo-ds: second Ctrl-C: stopping now, without saving", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self._interrupt = True
        print("\norpo-ds: Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self) -> int | None:
        """The exit code to stop with after this step (the same on every rank), or None to go on.
        A SIGTERM/SIGUSR1 on any rank wins over a Ctrl-C: it is the scheduler asking for a requeue."""
        terminate, interrupt = dist_lib.reduce_to_host(torch.tensor([float(self._terminate), float(self._interrupt)]))
        if terminate:
            return EXIT_PREEMPTED
        return EXIT_INTERRUPTED if interrupt else None
