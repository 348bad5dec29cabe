"""No host read of the device inside a training micro-batch (issue #34, item 3).

A read (``.item()``, ``bool(t)``, ``nonzero``, a shape only the device knows) stalls the CPU until the
GPU has caught up, and ZeRO-3's CPU-driven prefetch cannot run ahead of it. On the CPU there is nothing to
stall, but the same aten ops run, so a dispatch mode counts them here: ``aten._local_scalar_dense`` (what
``.item()``, ``int(t)``, ``float(t)`` and ``bool(t)`` become), ``aten.nonzero``, ``aten.item`` and
``aten.is_nonzero``. Device-side checks (``aten._assert_async``) are not reads and are not counted.

The count covers our torch path: the policy's forward (decoder body with the segmented-sdpa backend, the
chunked head), the ORPO loss of the micro-batch, and the backward. Liger's head reads its token count
(``.item()``) in forward and backward; it is CUDA-only and outside this count (docs/performance.md, "No
host reads inside a micro-batch"). DeepSpeed's engine reads the device at the optimizer step, once per
step, not per micro-batch.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds import attention
from orpo_ds.batch import dummy_micro_batch, micro_batch_loss, prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row, layout_for

HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero"}


class HostReads(TorchDispatchMode):
    """Counts the aten ops that read a tensor's value back to the host, by name."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_READS:
            self.counts[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def tiny_policy(dtype: torch.dtype, attn: str = attention.SEGMENTED_SDPA) -> PolicyWithChunkedHead:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return PolicyWithChunkedHead(LlamaForCausalLM(config).to(dtype), chunk_size=8)


PAIRS = [TokenizedPair(0, (5, 6, 7), (8, 9, 2), (10, 11, 12, 2)), TokenizedPair(1, (5,), (8, 8, 2), (9, 2)),
         TokenizedPair(2, (), (13, 14, 2), (15, 2))]


def _reads_of_one_micro_batch(policy, mb) -> dict[str, int]:
    with HostReads() as reads:
        loss, _ = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=0.1, global_nll_tokens=20,
                                   global_pairs=3)
        loss.backward()
    return dict(reads.counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("share_prompt", [False, True], ids=["separate", "shared-prompt"])
def test_a_training_micro_batch_reads_nothing_back_to_the_host(share_prompt, dtype):
    policy = tiny_policy(dtype)
    for nll_on_prompt in (False, True):
        mb = prepare_micro_batch(build_row(PAIRS, layout_for(share_prompt)), nll_on_prompt=nll_on_prompt)
        assert _reads_of_one_micro_batch(policy, mb) == {}
    # A rank without a row in the step runs a dummy batch: the same holds.
    assert _reads_of_one_micro_batch(policy, dummy_micro_batch(pad_token_id=0)) == {}


def test_the_counter_sees_each_kind_of_host_read():
    # The negative control: the reads the loop used to make, each counted.
    labels = torch.tensor([1, -100, 3])
    with HostReads() as reads:
        bool((labels < 0).any())
        (labels != -100).nonzero()
        labels.sum().item()
        float(labels.float().mean())
    assert reads.counts["aten::nonzero"] == 1 and reads.counts["aten::_local_scalar_dense"] == 3


def test_the_expert_counts_of_a_mixture_of_experts_read_nothing_back_to_the_host():
    """Issue 37 item 2: the per-micro-batch part of the expert-load metrics (top-k, then histc with fixed
    bounds). The family's own balancing loss and expert loop are transformers' code, outside this count."""
    from orpo_ds.router import expert_token_counts

    logits = tuple(torch.randn(37, 8, generator=torch.Generator().manual_seed(layer)) for layer in range(3))
    with HostReads() as reads:
        counts = expert_token_counts(logits, num_experts=8, top_k=2)
    assert dict(reads.counts) == {}
    assert counts.shape == (3, 8) and counts.sum(dim=1).tolist() == [37 * 2] * 3
