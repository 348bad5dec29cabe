"""Issue 34 item 3 on CUDA: one training micro-batch of the torch path (the batch's host-to-device copies,
the forward, the loss, the backward) with PyTorch's sync debug mode set to raise, so that a read of a
device value or a copy that waits for the device fails the test. The CPU twin
(tests/unit/test_host_syncs.py) counts the reads op by op; only a GPU shows the copies. Skipped without
CUDA by tests/conftest.py."""

import pytest
import torch

from orpo_ds import attention
from orpo_ds.batch import micro_batch_loss, prepare_micro_batch
from orpo_ds.packing import build_row, layout_for
from tests.unit.test_host_syncs import PAIRS, tiny_policy


def _train_one_micro_batch(policy, share_prompt: bool):
    mb = prepare_micro_batch(build_row(PAIRS, layout_for(share_prompt)), nll_on_prompt=False, device="cuda")
    loss, _ = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=0.1, global_nll_tokens=20,
                               global_pairs=3)
    loss.backward()


@pytest.mark.parametrize("attn, share_prompt", [(attention.SEGMENTED_SDPA, False), (attention.SEGMENTED_SDPA, True),
                                                (attention.VARLEN_ATTN, False)])
def test_a_training_micro_batch_never_waits_for_the_gpu(attn, share_prompt):
    if attn == attention.VARLEN_ATTN and attention.torch_varlen_attn() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    policy = tiny_policy(torch.bfloat16, attn).cuda()
    _train_one_micro_batch(policy, share_prompt)  # first use: kernels load, handles and pinned pools are made
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_one_micro_batch(policy, share_prompt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
