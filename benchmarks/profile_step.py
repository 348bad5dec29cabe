"""Where one training step's time goes on the main job, in one process, without DeepSpeed.

    python benchmarks/profile_step.py                        # demo assets, 1536-token rows, 1 thread
    python benchmarks/profile_step.py --tokens 3072 --threads 2 --attn segmented_sdpa,sdpa

SmolLM2-135M-Instruct and the demo pairs from ``assets/`` (``make assets``), packed as the trainer packs
them. Per attention backend it runs ``--rows`` packed rows, each a full step (forward, backward, fused
AdamW), and times the phases: decoder body forward, head forward (chunked log-probs of the labelled
positions) plus the loss, backward, optimizer. One more row runs under torch.profiler, whose self-CPU
time is grouped into matmuls, attention and the rest. Backends alternate row by row, so a noisy
neighbour hits them alike. The difference between these single-process figures and a real step's
``step_s`` (metrics.jsonl) is the engine's cost: ZeRO-3 gathers, reduce-scatters and gloo.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from orpo_ds.batch import micro_batch_loss, micro_batches
from orpo_ds.data import load_records, tokenize_pairs
from orpo_ds.logps import chunked_token_logps
from orpo_ds.packing import schedule_epoch

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def op_group(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if "attention" in name or "flash" in name or "sdpa" in name:
        return "attention"
    return "other"


def load(model_dir: str, data: str, attn: str, max_length: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import orpo_ds.attention  # noqa: F401  (registers segmented_sdpa)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = tokenize_pairs(load_records(data), tokenizer, max_length=max_length, fmt="sharegpt", progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    return pairs, model.train()


def run_step(model, optimizer, mb, beta: float, times: dict[str, list[float]]):
    from orpo_ds.attention import backend_kwargs

    body, head = model.get_decoder(), model.get_output_embeddings()
    extra = backend_kwargs(model.config._attn_implementation, mb.segments, mb.cu_seqlens, mb.max_seqlen)
    t0 = time.perf_counter()
    hidden = body(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, **extra).last_hidden_state
    t1 = time.perf_counter()
    logps = chunked_token_logps(hidden[0][mb.head_positions], head.weight, mb.head_labels)
    loss, _ = micro_batch_loss(logps, mb, beta=beta, global_nll_tokens=mb.num_nll_tokens, global_pairs=mb.num_pairs)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    for phase, seconds in (("body fwd", t1 - t0), ("head fwd + loss", t2 - t1), ("backward", t3 - t2),
                           ("optimizer", t4 - t3), ("step", t4 - t0)):
        times[phase].append(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/smollm2-135m-instruct")
    ap.add_argument("--data", default="assets/data/dpo_en_demo.train.jsonl")
    ap.add_argument("--tokens", type=int, default=1536, help="row budget (train.micro_batch_tokens)")
    ap.add_argument("--rows", type=int, default=3, help="timed rows per backend (after one warm-up row)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attn", default="segmented_sdpa,sdpa")
    ap.add_argument("--max-length", type=int, default=384)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backends = args.attn.split(",")
    setups = {}
    for attn in backends:
        pairs, model = load(args.model, args.data, attn, args.max_length)
        setups[attn] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True))
    plans = schedule_epoch(pairs, args.tokens, 1, 1, seed=0, epoch=0)
    rows = [micro_batches(plan.rows[0], pairs, nll_on_prompt=False, pad_token_id=0)[0] for plan in plans]
    rows = [mb for mb in rows if not mb.is_dummy][: args.rows + 2]
    times = {attn: defaultdict(list) for attn in backends}
    for i, mb in enumerate(rows[:-1]):
        for attn in backends:
            model, optimizer = setups[attn]
            run_step(model, optimizer, mb, 3.0, times[attn] if i else defaultdict(list))  # row 0: warm-up
    mean_tokens = statistics.mean(mb.num_tokens for mb in rows)
    print(f"# {len(rows) - 2} rows of <= {args.tokens} tokens (mean {mean_tokens:.0f}), {args.threads} thread(s), "
          f"torch {torch.__version__}; medians in seconds")
    phases = ["body fwd", "head fwd + loss", "backward", "optimizer", "step"]
    print("| backend | " + " | ".join(phases) + " | tokens/s |")
    print("|---|" + "---:|" * (len(phases) + 1))
    for attn in backends:
        med = {p: statistics.median(times[attn][p]) for p in phases}
        tokens = statistics.mean(mb.num_tokens for mb in rows[1:-1])
        print(f"| {attn} | " + " | ".join(f"{med[p]:.2f}" for p in phases) + f" | {tokens / med['step']:.0f} |")
    print("\nprofiled row, self CPU time by group (s):")
    for attn in backends:
        model, optimizer = setups[attn]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run_step(model, optimizer, rows[-1], 3.0, defaultdict(list))
        groups, top = defaultdict(float), []
        for evt in prof.key_averages():
            groups[op_group(evt.key)] += evt.self_cpu_time_total / 1e6
            top.append((evt.self_cpu_time_total / 1e6, evt.key, evt.count))
        total = sum(groups.values())
        shares = ", ".join(f"{g} {s:.2f} ({s / total:.0%})" for g, s in sorted(groups.items()))
        print(f"{attn}: total {total:.2f}; {shares}")
        for seconds, key, count in sorted(top, reverse=True)[:8]:
            print(f"    {seconds:7.2f}  {key} x{count}")


if __name__ == "__main__":
    main()
