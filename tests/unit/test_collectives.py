"""Every collective of the loop runs on the rank's device (issue 11).

On CUDA the process group is NCCL-only: a collective on a CPU tensor fails with "No backend type
associated with device type cpu" on the first multi-GPU step, and a one-GPU run hides it when the code
skips collectives for a world of one. Here the rank's device is ``meta`` and the collective rejects
any tensor that is not there, so a CPU-made tensor handed to it fails on a machine without a GPU.
"""

from __future__ import annotations

import random
import signal

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds import distributed as dist_lib
from orpo_ds.batch import prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.distributed import raise_if_any_rank_failed
from orpo_ds.evaluate import evaluate_pairs
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row
from orpo_ds.preemption import PreemptionSignal
from orpo_ds.step import train_step
from tests.helpers.engines import PlainEngine

V = 53
META = torch.device("meta")


def _pairs(n):
    rng = random.Random(0)
    ids = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(i, ids(2, 6), ids(1, 5) + (2,), ids(1, 5) + (2,)) for i in range(n)]


@pytest.fixture
def on_meta_rank(monkeypatch):
    """A process group whose collective accepts only tensors on the rank's device, ``meta``."""
    calls = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        if tensor.device != META:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        calls.append(tuple(tensor.shape))

    monkeypatch.setattr(dist_lib, "comm_device", lambda: META)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    # A meta tensor holds no numbers; the host read returns zeros of its shape, which the loop accepts.
    def host_values(tensor):
        calls.append(("host read", tuple(tensor.shape)))
        return [0.0] * tensor.numel()

    monkeypatch.setattr(dist_lib, "host_values", host_values, raising=False)
    return calls


def test_the_loops_collectives_only_see_tensors_on_the_ranks_device(on_meta_rank):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa"))
    policy = PolicyWithChunkedHead(model)
    pairs = _pairs(6)
    mbs = [prepare_micro_batch(build_row(pairs[:3]), nll_on_prompt=False),
           prepare_micro_batch(build_row(pairs[3:]), nll_on_prompt=False)]

    outcome = train_step(PlainEngine(policy), mbs, beta=0.1)
    # The step's counts, summed and read before the forward; its stats summed after, and not read ...
    assert on_meta_rank == [(3,), ("host read", (3,)), (10,)]
    stats = outcome.read()  # ... until the loop logs the step
    assert on_meta_rank[3:] == [("host read", (10,))]
    assert stats.applied and stats.nonfinite_pair_ids == []

    raise_if_any_rank_failed(None, RuntimeError("unused"))  # the data-loading failure flag
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        assert PreemptionSignal().requested() is None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    evaluate_pairs(policy, pairs, micro_batch_tokens=64, beta=0.1, nll_on_prompt=False, pad_token_id=0)
    collectives = [c for c in on_meta_rank if c[0] != "host read"]
    assert len(collectives) == 5  # + failure flag, preemption flags, eval totals: one collective each


def test_a_world_of_one_still_goes_through_the_process_group(on_meta_rank, monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    dist_lib.reduce_to_host(torch.ones(3))
    assert on_meta_rank == [(3,), ("host read", (3,))]
