"""The capacity table of docs/planning.md: `orpo-ds plan` for Llama-3-8B, Llama-3-70B and Qwen2.5-72B shapes on
8-512 GPUs of 80 GB, next to DeepSpeed's own ZeRO-3 estimator.

    python benchmarks/plan_table.py                  # markdown table on stdout
    python benchmarks/plan_table.py --gpus 8 16 --row-tokens 16384

Every layer trains, bf16, ZeRO-3 (ds_configs/zero3.json), activation checkpointing on, rows of
``--row-tokens`` tokens of ``--max-length``-token sequences, half of them response tokens (the
planner's no-data assumption). Nothing is downloaded: the shapes are the planner's presets.
"""

from __future__ import annotations

import argparse

from orpo_ds.config import load_config
from orpo_ds.plan import Cluster, make_plan
from orpo_ds.plan.planner import GIB


def deepspeed_estimate(plan) -> int:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    c, s = plan.cluster, plan.planner.shape
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(s.total_params, s.largest_module_params,
                                                            num_gpus_per_node=c.gpus_per_node, num_nodes=c.nodes,
                                                            cpu_offload=False, cpu_offload_params=False)
    return gpu_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64, 512])
    p.add_argument("--row-tokens", type=int, default=8192)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--config", default="configs/demo.yaml", help="base config; model and row settings replaced")
    args = p.parse_args()
    rows = []
    for name in ("llama-3-8b", "llama-3-70b", "qwen2.5-72b"):
        for gpus in args.gpus:
            cfg = load_config(args.config, [f"model.name_or_path={name}", "model.trainable_layers=null",
                                            "model.gradient_checkpointing=true", f"data.max_length={args.max_length}",
                                            f"train.micro_batch_tokens={args.row_tokens}",
                                            "data.train=/nonexistent/no-data.jsonl"])
            plan = make_plan(cfg, Cluster.of("H100", nodes=max(1, gpus // 8), gpus_per_node=min(8, gpus)))
            states, ds = plan.budget.states.total, deepspeed_estimate(plan)
            rows.append(f"| {name} | {gpus} | {states / GIB:.1f} GiB | {ds / GIB:.1f} GiB ({states / ds:.2f}x) | "
                        f"{plan.budget.peak / GIB:.1f} GiB | {'yes' if plan.fits else 'no'} | "
                        f"{plan.largest_row_tokens or 'none'} | {plan.step.total_s:.1f} s | "
                        f"{plan.step.communication_s / plan.step.total_s:.0%} |")
    # Printed after planning, so that DeepSpeed's start-up log lines (on stdout) stay above the table.
    print("| model | GPUs | model states / GPU | DeepSpeed estimator | peak / GPU (row) | fits 80 GB | "
          "largest row | step | ZeRO-3 traffic share |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    print("\n".join(rows))

if __name__ == "__main__":
    main()
