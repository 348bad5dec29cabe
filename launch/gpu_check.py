"""Helpers of launch/gpu_check.sh (the one prepared GPU check).

    python launch/gpu_check.py prepare --wheels DIR     # here, with a registry: fill the wheel folder
    python launch/gpu_check.py check --wheels DIR       # every wheel present once, sizes under the limit
    python launch/gpu_check.py install-list --wheels DIR  # the wheels this machine needs, one path a line
    python launch/gpu_check.py describe-model           # the ~0.5B model's shape and size (no torch)
    python launch/gpu_check.py make-model --model DIR --pairs FILE --num-pairs N
    python launch/gpu_check.py run-part --name NAME --limit S --log FILE --parts TSV -- COMMAND...
    python launch/gpu_check.py summarize --parts TSV --work DIR --out FILE [...]

The GPU machine has torch, triton, transformers, pyarrow, pandas and most of what orpo-ds needs, but no
deepspeed, liger-kernel or datasets and no network (/work/.library/device/KINDS.md in this workplace):
those travel as wheels, at the versions of the interpreter that runs ``prepare`` (the project's venv).
Standalone on purpose, like make_tiny_model.py: launch/ must not import from tests/.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
CARRY_LIMIT_BYTES = 64 * MiB  # what the device tool moves per call: working tree + carried paths

# Distributions the GPU machine lacks: deepspeed and its missing needs (hjson, pydantic and pydantic's),
# liger-kernel, datasets and its missing needs. pyarrow is there, but maybe older than datasets' floor.
NEEDED = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "liger-kernel", "datasets", "dill", "multiprocess", "pyarrow")
BUILT_HERE = ("deepspeed",)  # only a source archive on PyPI: `pip wheel` makes a pure-Python wheel of it
ONLY_IF_OLDER = {"pyarrow": 24}  # installed there only when its own major version is below this
# The GPU machine: CPython 3.12 on x86-64 (manylinux).
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]

# The throughput model: Llama-shaped, about 0.5B parameters, made there from this config (no download).
BIG = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
           num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=8192)


def _norm(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427): runs of -_. become _, lower case."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheels_by_name(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        found.setdefault(_norm(path.name.split("-")[0]), []).append(path)
    return found


def _tree_bytes() -> int | None:
    """Bytes of what travels besides the carried paths: tracked and untracked-not-ignored files. None
    outside a git checkout (the GPU machine's copy of the tree, which has travelled already)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(p.stat().st_size for p in (REPO / n for n in out.decode().split("\0") if n) if p.is_file())


def check(folder: Path) -> int:
    """Print each needed wheel with its size; exit 1 naming what is missing, doubled, built for another
    Python or platform, or over the carry limit."""
    found, problems = _wheels_by_name(folder), []
    total = 0
    for name in NEEDED:
        paths = found.get(_norm(name), [])
        if not paths:
            problems.append(f"missing: {name} (no {_norm(name)}-*.whl in {folder})")
            continue
        if len(paths) > 1:  # pip stops the whole install on two versions of one distribution
            problems.append(f"more than one {name} wheel: {', '.join(p.name for p in paths)}")
        tags = paths[0].name[:-len(".whl")].split("-")[-3:]
        if tags[2] != "any" and not ("cp312" in tags[0] and "x86_64" in tags[2]):
            problems.append(f"{paths[0].name} is not for CPython 3.12 on x86-64")
        total += paths[0].stat().st_size
        print(f"  wheel {paths[0].name}: {paths[0].stat().st_size / MiB:.2f} MiB")
    tree = _tree_bytes()
    if tree is None:
        print(f"  carry: wheels {total / MiB:.1f} MiB (not a git checkout: the working tree is not measured)")
    else:
        print(f"  carry: wheels {total / MiB:.1f} MiB + working tree {tree / MiB:.1f} MiB = "
              f"{(total + tree) / MiB:.1f} MiB of {CARRY_LIMIT_BYTES / MiB:.0f} MiB")
    if tree is not None and total + tree > CARRY_LIMIT_BYTES:
        problems.append(f"wheels + working tree are {(total + tree) / MiB:.1f} MiB, over the device tool's "
                        f"{CARRY_LIMIT_BYTES / MiB:.0f} MiB")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if problems:
        print(f"make the wheel folder with: launch/gpu_check.sh --prepare (GPU_WHEELS={folder})", file=sys.stderr)
    return 1 if problems else 0


def prepare(folder: Path) -> int:
    """Fill ``folder`` with the wheels of :data:`NEEDED` at this interpreter's versions, then :func:`check`."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in NEEDED]
    pip = [sys.executable, "-m", "pip"]
    for stale in (p for n in NEEDED for p in _wheels_by_name(folder).get(_norm(n), [])):
        stale.unlink()  # one version of each
    built = [p for p in pins if p.split("==")[0] in BUILT_HERE]
    # No build isolation: setup.py imports torch, and an isolated build would fetch a multi-GB CUDA torch.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), *built], check=True)
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *TARGET, "-d", str(folder),
                    *(p for p in pins if p not in built)], check=True)
    return check(folder)


def install_list(folder: Path) -> int:
    """Print the wheels this interpreter's machine needs: all of them, but pyarrow only where the
    machine's own is older than datasets' floor (or missing)."""
    for name in NEEDED:
        wheel = _wheels_by_name(folder)[_norm(name)][0]
        floor = ONLY_IF_OLDER.get(name)
        if floor is not None:
            try:
                have = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                have = None
            # Said in the log: where the machine's own suffices, later checks need not carry the wheel.
            keep = have is not None and int(have.split(".")[0]) >= floor
            print(f"[gpu-check] {name} here: {have or 'none'}; "
                  f"{'kept' if keep else f'installing {wheel.name}'} (needed: >= {floor})", file=sys.stderr)
            if keep:
                continue
        print(wheel)
    return 0


def big_model_parameters() -> int:
    """Parameters of the :data:`BIG` Llama (untied embeddings and head, no biases)."""
    h, i, v, n = BIG["hidden_size"], BIG["intermediate_size"], BIG["vocab_size"], BIG["num_hidden_layers"]
    kv = h // BIG["num_attention_heads"] * BIG["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * v * h + n * per_layer + h


def describe_model() -> int:
    print(f"Llama hidden {BIG['hidden_size']}, {BIG['num_hidden_layers']} layers, heads "
          f"{BIG['num_attention_heads']}/{BIG['num_key_value_heads']} kv, MLP {BIG['intermediate_size']}, vocab "
          f"{BIG['vocab_size']}: {big_model_parameters() / 1e9:.2f}B parameters")
    return 0


def make_model(model_dir: Path, pairs: Path, num_pairs: int, seed: int = 0) -> int:
    """Write the :data:`BIG` random Llama in bf16 with the byte tokenizer, and long preference pairs.

    The tokenizer has 260 tokens and the model 32000: labels never exceed 260, but the head runs over the
    whole vocabulary, as a real one would. Prompts of 200-900 and responses of 100-500 bytes (one token
    each) give pairs of about 1700 tokens (the prompt is in both sequences), two to a 4096-token row.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from make_tiny_model import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(**BIG, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    # Initialised on the GPU (seconds, where 0.5B normal_ draws on the CPU take a minute), saved in bf16.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(f"model: {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters)")

    rng = random.Random(seed)
    first, second = "abcdefghijklm", "nopqrstuvwxyz"

    def text(alphabet: str, lo: int, hi: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))

    rows = [{"prompt": text(first + second + " ", 200, 900) + "?", "chosen": text(first + " ", 100, 500),
             "rejected": text(second + " ", 100, 500)} for _ in range(num_pairs)]
    pairs.parent.mkdir(parents=True, exist_ok=True)
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"pairs: {pairs} ({num_pairs})")
    return 0


def _train_records(metrics: Path) -> list[dict]:
    by_step = {}
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _model_line(log: Path) -> str | None:
    """The trainer's start-up ``[model] ...`` line (attention backend, dtype, mfu peak, liger)."""
    if not log.is_file():
        return None
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("[model]")]
    return lines[-1] if lines else None


def big_run_figures(run: Path, report: Path, warmup_steps: int) -> tuple[dict, list[str]]:
    """tokens/s, MFU and peak GPU memory of the throughput run, and what is missing or wrong."""
    records = _train_records(run / "metrics.jsonl")
    timed = records[warmup_steps:]
    problems = []
    if not timed:
        return {"steps_logged": len(records)}, [f"{run}/metrics.jsonl holds {len(records)} training steps, "
                                                f"none after the {warmup_steps} warm-up steps"]
    losses = [r["loss"] for r in records]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
        problems.append(f"non-finite loss in {run}/metrics.jsonl")
    figures = {"steps_logged": len(records), "steps_timed": len(timed), "warmup_steps": warmup_steps,
               "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in timed),
               "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in timed),
               "tokens_per_step": statistics.fmean(r["tokens"] for r in timed),
               "step_s_median": statistics.median(r["step_s"] for r in timed)}
    if all("mfu" in r for r in timed):
        figures["mfu_median"] = statistics.median(r["mfu"] for r in timed)
        figures["mfu_target_0.40_met"] = figures["mfu_median"] >= 0.40
    else:
        problems.append("no mfu in metrics.jsonl (an unknown GPU, or not bf16: see the [model] line)")
    memory = json.loads(report.read_text()) if report.is_file() else {}
    if "cuda_max_memory_allocated_bytes" in memory:
        figures["peak_gpu_memory_gib"] = memory["cuda_max_memory_allocated_bytes"] / 2**30
        figures["peak_gpu_memory_reserved_gib"] = memory["cuda_max_memory_reserved_bytes"] / 2**30
    else:
        problems.append(f"no CUDA peak memory in {report}")
    return figures, problems


def gpu_test_counts(junit: Path) -> tuple[dict, list[str]]:
    """Counts of pytest's JUnit report; a skipped GPU test is a problem here (this machine has the GPU)."""
    if not junit.is_file():
        return {}, [f"no pytest report {junit}"]
    root = ET.parse(junit).getroot()
    suites = list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    skipped = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase") if c.find("skipped") is not None]
    problems = [f"GPU test skipped on the GPU machine: {name}" for name in skipped]
    if not counts["tests"]:
        problems.append("pytest collected no GPU test")
    return counts, problems


EXIT_TIMED_OUT = 124  # what coreutils' timeout reports, and what summarize reads as "its time limit"


def run_part(name: str, limit_s: int, command: list[str], log: Path, parts_tsv: Path) -> int:
    """Run one part's ``command`` for at most ``limit_s`` seconds, its output both printed and written to
    ``log``, and append ``name, exit code, seconds, limit`` to ``parts_tsv``. Returns the exit code.

    The part runs in a process group of its own. One that outlives its limit is killed with all its
    processes at once (SIGKILL), and its exit code is :data:`EXIT_TIMED_OUT`: a SIGTERM would reach the
    trainer as a preemption, which saves a checkpoint and exits 75 (requeue), spending the window on a
    save and reading as a clean stop. A timeout is a failure of the part, and the line says so by name.
    """
    start = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

        def copy_output() -> None:
            for line in proc.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                sink.write(line)

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, timed_out = EXIT_TIMED_OUT, True
        reader.join(timeout=10)  # a killed group closes the pipe; a stray process outside it must not hang us
    seconds = round(time.monotonic() - start)
    if timed_out:
        print(f"=== [{name}] FAILED: timed out at its {limit_s} s limit; killed with all its processes (a "
              f"timeout is a failure of this part, not a preemption)", flush=True)
    else:
        print(f"=== [{name}] exit {code} after {seconds} s", flush=True)
    with parts_tsv.open("a") as f:
        f.write(f"{name}\t{code}\t{seconds}\t{limit_s}\n")
    return code


def summarize(parts_tsv: Path, work: Path, out: Path, gpu: str, warmup_steps: int, problems: list[str],
              junit: Path) -> int:
    """Write the JSON summary; exit 1 on any of ``problems`` (found before the parts ran), a part that
    failed, or missing figures of the throughput run."""
    parts = {}
    for name, rc, seconds, limit in csv.reader(parts_tsv.open(), delimiter="\t") if parts_tsv.is_file() else []:
        parts[name] = {"exit_code": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                       "ok": rc == "0", "timed_out": rc in ("124", "137")}
        line = _model_line(work / f"{name}.log")
        if line:
            parts[name]["model_line"] = line
    problems = [*problems, *(f"part {n} exited {p['exit_code']}" + (" (its time limit)" if p["timed_out"] else "")
                             for n, p in parts.items() if not p["ok"])]
    summary = {"gpu": gpu, "parts": parts}
    if "gpu-tests" in parts:
        summary["gpu_tests"], missing = gpu_test_counts(junit)
        problems += missing
    if parts.get("zero3-0.5b", {}).get("ok"):
        figures, missing = big_run_figures(work / "big-run", work / "big-memory.json", warmup_steps)
        summary["zero3_0.5b"] = {"model": BIG, "parameters": big_model_parameters(), **figures}
        problems += missing
        if not missing:
            print(f"[gpu-check] 0.5B ZeRO-3, 4096-token rows: {figures['tokens_per_s_median']:.0f} tokens/s, "
                  f"MFU {100 * figures['mfu_median']:.1f}%, peak GPU memory {figures['peak_gpu_memory_gib']:.1f} "
                  f"GiB (medians of {figures['steps_timed']} steps after {warmup_steps} warm-up steps)")
    summary["problems"] = problems
    summary["ok"] = not problems and bool(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for p in problems:
        print(f"[gpu-check] FAIL: {p}")
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("prepare", "check", "install-list"):
        sub.add_parser(name).add_argument("--wheels", type=Path, required=True)
    sub.add_parser("describe-model")
    m = sub.add_parser("make-model")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--pairs", type=Path, required=True)
    m.add_argument("--num-pairs", type=int, required=True)
    r = sub.add_parser("run-part")
    r.add_argument("--name", required=True)
    r.add_argument("--limit", type=int, required=True, help="seconds")
    r.add_argument("--log", type=Path, required=True)
    r.add_argument("--parts", type=Path, required=True, help="the TSV summarize reads")
    r.add_argument("part_command", nargs="+", metavar="COMMAND")
    s = sub.add_parser("summarize")
    s.add_argument("--parts", type=Path, required=True, help="name, exit code, seconds, limit per line (TSV)")
    s.add_argument("--work", type=Path, required=True, help="the parts' logs and the throughput run")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--gpu", default="unknown")
    s.add_argument("--warmup-steps", type=int, default=5)
    s.add_argument("--problem", action="append", default=[], help="a failure found before the parts ran")
    s.add_argument("--junit", type=Path, required=True, help="pytest's report of the GPU tests")
    args = p.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.wheels)
    if args.command == "check":
        return check(args.wheels)
    if args.command == "install-list":
        return install_list(args.wheels)
    if args.command == "describe-model":
        return describe_model()
    if args.command == "make-model":
        return make_model(args.model, args.pairs, args.num_pairs)
    if args.command == "run-part":
        return run_part(args.name, args.limit, args.part_command, args.log, args.parts)
    return summarize(args.parts, args.work, args.out, args.gpu, args.warmup_steps, args.problem, args.junit)


if __name__ == "__main__":
    raise SystemExit(main())
