"""Helpers of launch/smoke_1gpu.sh.

``run``: run a python module in this process (like ``python -m MODULE ARGS``) and write its peak memory
to a JSON report: ``torch.cuda.max_memory_allocated()`` when CUDA was used, and the peak RSS of the process
(``ru_maxrss``) always. Exits with the module's exit code.

    python launch/smoke_check.py run --report OUT/memory.json -- orpo_ds train --config ... key=value ...

``verify``: check a finished run and print one last line, ``PASS`` (exit 0) or ``FAIL: reason`` (exit 1):
  * the loss fell: mean of the first 3 logged training steps' ``loss`` > mean of the last 3;
  * throughput: mean ``tokens_per_s`` over the steps (the first one, which warms up, left out);
  * peak memory, from the ``run`` report;
  * ``<run>/final`` reloads with ``AutoModelForCausalLM.from_pretrained`` and gives finite logits.

    python launch/smoke_check.py verify --run OUT --report OUT/memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import runpy
import sys
from pathlib import Path


def cmd_run(report: Path, module: str, args: list[str]) -> int:
    sys.argv = [module, *args]
    code: int | str | None = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    finally:
        mem = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            mem["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
            mem["cuda_max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(mem, indent=2))
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _train_steps(metrics_path: Path) -> list[dict]:
    """Training records of metrics.jsonl (eval-only records carry no ``loss``), last write of each step."""
    by_step: dict[int, dict] = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def verify(run: Path, report: Path | None) -> str | None:
    """Print the run's numbers; return a failure reason, or None when everything holds."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return f"{metrics} was not written"
    steps = _train_steps(metrics)
    if len(steps) < 6:
        return f"only {len(steps)} training steps logged in {metrics}; need >= 6 to compare first and last 3"
    losses = [r["loss"] for r in steps]
    if any(v is None or not math.isfinite(v) for v in losses):
        return f"non-finite loss in {metrics}: {losses}"
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"steps: {len(steps)}  loss: first-3 mean {first:.4f} -> last-3 mean {last:.4f}")
    rates = [r["tokens_per_s"] for r in steps[1:] if r.get("tokens_per_s")]
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    overall = summary.get("tokens_per_s")
    print(f"throughput: {sum(rates) / max(len(rates), 1):.1f} tokens/s per step (mean, step 1 left out)"
          + (f"; {overall:.1f} tokens/s over the run" if isinstance(overall, (int, float)) else ""))
    mem = json.loads(report.read_text()) if report and report.is_file() else {}
    if "cuda_max_memory_allocated_bytes" in mem:
        print(f"peak memory: {_gib(mem['cuda_max_memory_allocated_bytes'])} "
              f"(torch.cuda.max_memory_allocated; reserved {_gib(mem['cuda_max_memory_reserved_bytes'])}); "
              f"host peak RSS {_gib(mem['peak_rss_bytes'])}")
    elif "peak_rss_bytes" in mem:
        print(f"peak memory: {_gib(mem['peak_rss_bytes'])} (peak RSS of the training process, CPU run)")
    else:
        print("peak memory: unknown (no memory report)")
    if not last < first:
        return f"loss did not fall: first-3 mean {first:.4f}, last-3 mean {last:.4f}"
    final = run / "final"
    try:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(final)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
        if not torch.isfinite(logits).all():
            return f"{final} reloads but gives non-finite logits"
    except Exception as exc:  # noqa: BLE001 - any failure to reload is the finding
        return f"{final} does not reload with AutoModelForCausalLM.from_pretrained: {type(exc).__name__}: {exc}"
    print(f"export: {final} reloads with AutoModelForCausalLM.from_pretrained "
          f"({sum(p.numel() for p in model.parameters())} parameters)")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="helpers of launch/smoke_1gpu.sh")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a module in-process and report its peak memory")
    r.add_argument("--report", type=Path, required=True)
    r.add_argument("module")
    r.add_argument("args", nargs=argparse.REMAINDER)
    v = sub.add_parser("verify", help="check a finished smoke run; print PASS or FAIL: reason")
    v.add_argument("--run", type=Path, required=True, help="the run's output_dir")
    v.add_argument("--report", type=Path, help="memory report written by `run`")
    args = p.parse_args(argv)
    if args.command == "run":
        rest = args.args[1:] if args.args[:1] == ["--"] else args.args
        return cmd_run(args.report, args.module, rest)
    reason = verify(args.run, args.report)
    print("PASS" if reason is None else f"FAIL: {reason}", flush=True)
    return 0 if reason is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
