"""The planner's Ulysses all-to-all traffic (orpo_ds.plan.timing.ulysses_bytes_per_step) against the bytes
DeepSpeed's all-to-alls actually send on 2 CPU ranks, for one training micro-batch of one packed row.

Each rank counts what every ``all_to_all_single`` of DeepSpeed's sequence layer hands to the other rank:
``(N - 1) / N`` of its input. Cases: all layers trained, with and without activation checkpointing (the
recomputed forward sends again), the top layer only (backward stops below it; checkpointed, only it is
recomputed), and a model with one KV
head, which Ulysses replicates to N before the exchange."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orpo_ds.plan.shapes import model_shape
from orpo_ds.plan.timing import ulysses_bytes_per_step
from tests.distributed.conftest import REPO, run_env
from tests.helpers.network import free_port

SIZE = 2
CASES = {  # name: (kv heads, checkpointing, trainable layers or None for all)
    "all-layers": (2, False, None),
    "checkpointed": (2, True, None),
    "top-layer-only": (2, False, 1),
    "top-layer-checkpointed": (2, True, 1),
    "one-kv-head-replicated": (1, False, None),
}

SCRIPT = """
import json
import sys

import deepspeed
import deepspeed.sequence.layer as sequence_layer
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds import distributed as dist_lib
from orpo_ds.attention import SEGMENTED_SDPA
from orpo_ds.batch import Shard, micro_batch_loss, prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.model import PolicyWithChunkedHead, enable_activation_checkpointing, train_top_layers_only
from orpo_ds.packing import build_row

kv_heads, checkpointing, trainable_layers, out = json.loads(sys.argv[1])
deepspeed.init_distributed("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=kv_heads, attn_implementation=SEGMENTED_SDPA)
model = LlamaForCausalLM(config)
if trainable_layers is not None:
    train_top_layers_only(model, trainable_layers)
if checkpointing:
    enable_activation_checkpointing(model)  # the trainer's own
sp = dist_lib.enable_sequence_parallel(size, model)
policy = PolicyWithChunkedHead(model)
sent = 0
exchange = sequence_layer.dist.all_to_all_single


def counting_all_to_all(output, tensor, *args, **kwargs):
    global sent
    sent += tensor.numel() * tensor.element_size() * (size - 1) // size  # what leaves this rank
    return exchange(output, tensor, *args, **kwargs)


sequence_layer.dist.all_to_all_single = counting_all_to_all
pairs = [TokenizedPair(i, tuple(range(3, 3 + p)), tuple(range(10, 10 + c)) + (2,), tuple(range(20, 20 + r)) + (2,))
         for i, (p, c, r) in enumerate([(9, 14, 7), (12, 5, 20), (6, 11, 11)])]
row = build_row(pairs)
mb = prepare_micro_batch(row, nll_on_prompt=False, shard=Shard(sp.index, size, 0))
loss, _ = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=0.1, global_nll_tokens=30,
                           global_pairs=3, sum_sequences=sp.sum_sequences)
loss.backward()
sequence_layer.dist.all_to_all_single = exchange
row_tokens = len(row.input_ids)
with open(f"{out}/rank{rank}.json", "w") as record:  # one file per rank: their prints would interleave
    json.dump({"sent": sent, "row_tokens": row_tokens, "local_tokens": mb.model_inputs()["input_ids"].numel()},
              record)
dist_lib.shutdown()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
"""


@pytest.mark.parametrize("case", list(CASES))
def test_ulysses_traffic_equals_what_the_all_to_alls_send(case, tmp_path):
    kv_heads, checkpointing, trainable_layers = CASES[case]
    script = tmp_path / "count.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(SIZE),
                           "--master-port", str(free_port()), str(script),
                           json.dumps([kv_heads, checkpointing, trainable_layers, str(tmp_path)])],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=240,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(SIZE)]
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=kv_heads)
    shape = model_shape(config, trainable_layers)
    # The row as Ulysses exchanges it: padded so that each rank holds the same number of tokens.
    padded = SIZE * records[0]["local_tokens"]
    planned = ulysses_bytes_per_step(shape, SIZE, padded, 4, checkpointing=checkpointing)
    assert all(r["sent"] > 0 for r in records)
    assert [r["sent"] for r in records] == [planned] * SIZE, (records, planned)
