"""Per-rank activation memory, and the longest pair a rank can train under a memory cap, with sequence
parallelism against without it, on 2 CPU ranks (issue #36).

    python benchmarks/bench_sequence_parallel.py                    # ~10 min on 2 cores
    python benchmarks/bench_sequence_parallel.py --tokens 2048      # a quick look

Each rank runs one training micro-batch (forward, the ORPO loss, backward) of the policy over a tiny random
Llama (8 query heads, 2 KV heads) on one packed pair whose two responses have ``--tokens`` tokens each, and
the profiler measures the peak of the tensors it allocates (tests/helpers/memory.py; the weights'
gradients are allocated before, so the figure is the activations and the step's transients):

* SP=1: data parallelism, each of the 2 ranks holds a whole row;
* SP=2: the 2 ranks hold one row, half each (DeepSpeed Ulysses over the segmented attention).

Then the longest pair: the SP=1 peak at ``--tokens`` is the cap, and SP=2 runs pairs of 1.0 to 2.2 times
that length; the longest whose peak stays under the cap is reported. One launch per layout; ratios, not
absolute figures, are the result (the CPU's figures are not a GPU's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROWTH = (1.0, 1.4, 1.8, 1.9, 1.95, 2.0, 2.2)  # the SP=2 pair lengths tried under the cap, times --tokens


def worker(size: int, lengths: list[int], prompt: int, checkpointing: bool) -> None:
    """One rank: the peak tensor bytes of one micro-batch per pair length, printed as a JSON line."""
    sys.path.insert(0, str(REPO))
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from orpo_ds import distributed as dist_lib
    from orpo_ds.attention import SEGMENTED_SDPA
    from orpo_ds.batch import Shard, micro_batch_loss, prepare_micro_batch
    from orpo_ds.data import TokenizedPair
    from orpo_ds.model import PolicyWithChunkedHead
    from orpo_ds.packing import build_row
    from tests.helpers.memory import measure_peak

    deepspeed.init_distributed("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 17,
                         attn_implementation=SEGMENTED_SDPA)
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sp = dist_lib.enable_sequence_parallel(size, model)
    policy = PolicyWithChunkedHead(model)
    for p in policy.parameters():  # gradients exist before the measured step: it measures activations
        p.grad = torch.zeros_like(p)
    shard = Shard(sp.index, size, 0) if size > 1 else None

    def one_step(length: int) -> None:
        generator = torch.Generator().manual_seed(length)
        pair = [tuple(torch.randint(3, 2048, (n,), generator=generator).tolist()) for n in (prompt, length, length)]
        mb = prepare_micro_batch(build_row([TokenizedPair(0, *pair)]), nll_on_prompt=False, shard=shard)
        output = policy(**mb.model_inputs())
        loss, _ = micro_batch_loss(output.token_logps, mb, beta=0.1, global_nll_tokens=length, global_pairs=1,
                                   sum_sequences=sp.sum_sequences if size > 1 else None)
        loss.backward()

    peaks = {}
    for length in lengths:
        peaks[length] = measure_peak(lambda n=length: one_step(n)).tensors
        dist.barrier()
    line = "PEAKS " + json.dumps({"rank": rank, "size": size, "peaks": peaks}) + "\n"
    os.write(1, line.encode())  # one write: the two ranks share the pipe, and print() would interleave them
    dist_lib.shutdown()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)


def launch(size: int, lengths: list[int], prompt: int, checkpointing: bool) -> dict[int, int]:
    """The larger of the two ranks' peaks per pair length, for sequence-parallel ``size``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__, "--worker",
               "--size", str(size), "--lengths", ",".join(map(str, lengths)), "--prompt", str(prompt)]
    command += ["--checkpointing"] if checkpointing else []
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the {size=} launch failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads(line.split("PEAKS ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("PEAKS ")]
    if len(ranks) != 2:
        sys.exit(f"the {size=} launch printed no figures:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {length: max(int(r["peaks"][str(length)]) for r in ranks) for length in lengths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of each response of the pair")
    parser.add_argument("--prompt", type=int, default=256, help="tokens of the pair's prompt")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.size, [int(n) for n in args.lengths.split(",")], args.prompt, args.checkpointing)
        return
    base = args.tokens
    whole = launch(1, [base], args.prompt, args.checkpointing)[base]
    tried = sorted({int(base * g) for g in GROWTH})
    split = launch(2, tried, args.prompt, args.checkpointing)
    under_cap = [n for n in tried if split[n] <= whole]
    mib = 2**20
    print(f"pair: prompt {args.prompt} + 2 x {base} tokens; checkpointing {'on' if args.checkpointing else 'off'}; "
          f"peak tensor bytes per rank (the larger rank)")
    print(f"  SP=1 (each rank a whole row): {whole / mib:8.1f} MiB")
    print(f"  SP=2 (half a row per rank):   {split[base] / mib:8.1f} MiB   ratio {split[base] / whole:.3f} "
          f"(target <= 0.55)")
    for n in tried:
        print(f"  SP=2 at 2 x {n:6d} tokens:    {split[n] / mib:8.1f} MiB   {'under' if split[n] <= whole else 'over'} "
              f"the SP=1 cap")
    longest = max(under_cap, default=None)
    print(f"longest pair under the cap: SP=1 {base}, SP=2 {longest} tokens per response: "
          f"{(longest or 0) / base:.2f}x (target >= 1.8; tried up to {max(GROWTH)}x)")


if __name__ == "__main__":
    main()
