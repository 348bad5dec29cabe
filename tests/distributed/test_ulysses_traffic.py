"""One training micro-batch of one packed row under Ulysses on 2 CPU ranks, against the same row unsplit in
one process: the loss and every parameter's gradient (summed over the ranks, as the engine sums them) to
1e-5, and the planner's all-to-all traffic (orpo_ds.plan.timing.ulysses_bytes_per_step) against the bytes
DeepSpeed's all-to-alls actually send.

Each rank counts what every ``all_to_all_single`` of DeepSpeed's sequence layer hands to the other rank:
``(N - 1) / N`` of its input. Cases: all layers trained, with and without activation checkpointing (the
recomputed forward sends again), the top layer only (backward stops below it; checkpointed, only it is
recomputed), and a model with one KV
head, which Ulysses replicates to N before the exchange.

Mutation checks: with the sum of the sequences' log-probs over the row's ranks removed, or made an
all-reduce in backward too (each rank's part of the gradient counted N times), the comparison must fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds.attention import SEGMENTED_SDPA
from orpo_ds.batch import micro_batch_loss, prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.model import PolicyWithChunkedHead, enable_activation_checkpointing, train_top_layers_only
from orpo_ds.packing import build_row
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

PAIRS = [TokenizedPair(i, tuple(range(3, 3 + p)), tuple(range(10, 10 + c)) + (2,), tuple(range(20, 20 + r)) + (2,))
         for i, (p, c, r) in enumerate([(9, 14, 7), (12, 5, 20), (6, 11, 11)])]
NLL_TOKENS = 30


def tiny_llama(kv_heads: int, checkpointing: bool, trainable_layers: int | None):
    """The same weights in every process (seed 0): 3 layers, 4 query heads over ``kv_heads``."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=kv_heads,
                                         attn_implementation=SEGMENTED_SDPA))
    if trainable_layers is not None:
        train_top_layers_only(model, trainable_layers)
    if checkpointing:
        enable_activation_checkpointing(model)  # the trainer's own
    return model


def unsplit_step(kv_heads: int, checkpointing: bool, trainable_layers: int | None):
    """The step's figures (loss, NLL, odds ratio, ...) and the gradients of the row in one process, without
    sequence parallelism."""
    model = tiny_llama(kv_heads, checkpointing, trainable_layers)
    mb = prepare_micro_batch(build_row(PAIRS), nll_on_prompt=False)
    loss, stats = micro_batch_loss(PolicyWithChunkedHead(model)(**mb.model_inputs()).token_logps, mb, beta=0.1,
                                   global_nll_tokens=NLL_TOKENS, global_pairs=len(PAIRS))
    loss.backward()
    figures = {key: value.detach().double() for key, value in stats.items()}
    return figures, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


SCRIPT = """
import json
import sys

import deepspeed
import deepspeed.sequence.layer as sequence_layer
import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce

from orpo_ds import distributed as dist_lib
from orpo_ds.batch import Shard, micro_batch_loss, prepare_micro_batch
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row
from tests.distributed.test_ulysses_traffic import NLL_TOKENS, PAIRS, tiny_llama

kv_heads, checkpointing, trainable_layers, out, mutation = json.loads(sys.argv[1])
deepspeed.init_distributed("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
model = tiny_llama(kv_heads, checkpointing, trainable_layers)
sp = dist_lib.enable_sequence_parallel(size, model)
policy = PolicyWithChunkedHead(model)
sent = 0
exchange = sequence_layer.dist.all_to_all_single


def counting_all_to_all(output, tensor, *args, **kwargs):
    global sent
    sent += tensor.numel() * tensor.element_size() * (size - 1) // size  # what leaves this rank
    return exchange(output, tensor, *args, **kwargs)


sequence_layer.dist.all_to_all_single = counting_all_to_all
sum_sequences = {None: sp.sum_sequences, "no-sum": lambda t: t,
                 "sum-in-backward": all_reduce}[mutation]
row = build_row(PAIRS)
mb = prepare_micro_batch(row, nll_on_prompt=False, shard=Shard(sp.index, size, 0))
loss, stats = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=0.1, global_nll_tokens=NLL_TOKENS,
                               global_pairs=len(PAIRS), sum_sequences=sum_sequences)
loss.backward()
sequence_layer.dist.all_to_all_single = exchange
# The step's figures are its statistics summed over the ranks (a shard's pair statistics are zero but
# on the row's first): each rank's loss tensor carries the whole odds-ratio term and its own NLL part.
figures = {key: value.detach().double() for key, value in stats.items()}
for value in figures.values():
    dist.all_reduce(value)
grads = {}
for name, param in model.named_parameters():  # summed over the ranks, as the engine sums them
    if param.grad is not None:
        dist.all_reduce(param.grad)
        grads[name] = param.grad
if rank == 0:
    torch.save({"figures": figures, "grads": grads}, f"{out}/step.pt")
row_tokens = len(row.input_ids)
with open(f"{out}/rank{rank}.json", "w") as record:  # one file per rank: their prints would interleave
    json.dump({"sent": sent, "row_tokens": row_tokens, "local_tokens": mb.model_inputs()["input_ids"].numel()},
              record)
dist_lib.shutdown()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
"""


def split_step(case: str, tmp_path, mutation: str | None = None):
    """The row's micro-batch on 2 ranks under Ulysses; the finished process and each rank's record."""
    kv_heads, checkpointing, trainable_layers = CASES[case]
    script = tmp_path / "count.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(SIZE),
                           "--master-port", str(free_port()), str(script),
                           json.dumps([kv_heads, checkpointing, trainable_layers, str(tmp_path), mutation])],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=240,
                          start_new_session=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(SIZE)] if proc.returncode == 0 \
        else None
    return proc, records


def split_equals_unsplit(case: str, tmp_path) -> bool:
    """Whether the split run's loss and every gradient equal the unsplit row's, to 1e-5."""
    split = torch.load(tmp_path / "step.pt")
    figures, grads = unsplit_step(*CASES[case])
    return (split["figures"].keys() == figures.keys() and split["grads"].keys() == grads.keys()
            and all(torch.allclose(split["figures"][k], v, rtol=1e-5, atol=1e-6) for k, v in figures.items())
            and all(torch.allclose(split["grads"][n], g, rtol=1e-5, atol=1e-6) for n, g in grads.items()))


@pytest.mark.parametrize("case", list(CASES))
def test_a_split_row_gives_the_unsplit_gradients_and_the_planned_traffic(case, tmp_path):
    proc, records = split_step(case, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = torch.load(tmp_path / "step.pt")
    figures, grads = unsplit_step(*CASES[case])
    assert split["figures"].keys() == figures.keys() and {"nll_sum", "log_odds_ratio_sum"} <= figures.keys()
    for key, value in figures.items():
        torch.testing.assert_close(split["figures"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert split["grads"].keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(split["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert split_equals_unsplit(case, tmp_path)  # the mutation test's judge agrees where the run is right

    kv_heads, checkpointing, trainable_layers = CASES[case]
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=kv_heads)
    shape = model_shape(config, trainable_layers)
    # The row as Ulysses exchanges it: padded so that each rank holds the same number of tokens.
    padded = SIZE * records[0]["local_tokens"]
    planned = ulysses_bytes_per_step(shape, SIZE, padded, 4, checkpointing=checkpointing)
    assert all(r["sent"] > 0 for r in records)
    assert [r["sent"] for r in records] == [planned] * SIZE, (records, planned)


@pytest.mark.parametrize("mutation", ["no-sum", "sum-in-backward"])
def test_breaking_the_sum_of_the_sequences_over_the_ranks_breaks_the_comparison(mutation, tmp_path):
    """Without the sum, a sequence whose scored tokens all lie on the other shard has none here, and the
    device-side check of the log-prob means stops the run; summed in backward too, the odds-ratio term's
    gradient counts twice (gradients up to 8% off here)."""
    proc, _ = split_step("all-layers", tmp_path, mutation)
    assert proc.returncode != 0 or not split_equals_unsplit("all-layers", tmp_path)
