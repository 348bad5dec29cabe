"""ZeRO-3 and experts kept as separate modules (issue #37, item 6): ranks whose tokens go to different
experts must not wait on each other. A tiny block with an ``experts`` ModuleList routes every token of
rank r to expert r, under 2-rank ZeRO-3, with a 60 s collective timeout so that a wait that never ends
fails the run rather than the test suite. Marked as a leaf (orpo_ds.engine.mark_expert_blocks_as_leaves),
it trains; unmarked, the negative control, the ranks' gathers disagree and the run fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed.conftest import REPO, run_env
from tests.helpers.network import free_port

SCRIPT = """
import sys
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist

from orpo_ds.engine import mark_expert_blocks_as_leaves

deepspeed.init_distributed("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

    def forward(self, x, expert):  # a router whose choice depends on the rank's data
        return self.experts[expert](x)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.block, self.out = torch.nn.Linear(8, 8), Block(), torch.nn.Linear(8, 1)

    def forward(self, x, expert):
        return self.out(self.block(self.inp(x), expert))


torch.manual_seed(0)
model = Model()
marked = mark_expert_blocks_as_leaves(model) if sys.argv[1] == "mark" else []
config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
for _ in range(2):
    loss = engine(torch.randn(4, 8), expert=rank).sum()
    engine.backward(loss)
    engine.step()
# One file per rank: the ranks share one stdout pipe, so their prints can interleave mid-line.
with open(f"{sys.argv[2]}/trained-{rank}.txt", "w") as record:
    record.write(repr(marked))
dist.destroy_process_group()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
"""


@pytest.mark.parametrize("mark", [True, False], ids=["leaf", "negative-control"])
def test_ranks_routing_to_different_separate_experts_train_under_zero3_once_marked(mark, tmp_path):
    script = tmp_path / "route.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), str(script), "mark" if mark else "plain", str(tmp_path)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=240, start_new_session=True)
    if mark:
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = sorted(tmp_path.glob("trained-*.txt"))
        assert [r.name for r in records] == ["trained-0.txt", "trained-1.txt"]
        assert all(r.read_text() == "['block']" for r in records)
    else:
        # DeepSpeed 0.19.8 catches the ranks' different gathers itself, before the timeout would.
        assert proc.returncode != 0 and not list(tmp_path.glob("trained-*.txt"))
        assert "disagreement" in proc.stderr or "timed out" in proc.stderr.lower(), proc.stderr[-3000:]
