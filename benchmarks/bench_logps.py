"""Peak memory and time of chunked vs naive per-token log-probs (forward + backward), on the CPU.

    python benchmarks/bench_logps.py                       # N=8192 V=128256 H=1024 fp32, needs ~14 GiB free
    python benchmarks/bench_logps.py --n 1024 --v 32000    # quick

Every (variant, repeat) runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is clean; the number
reported is that peak minus the child's own ``ru_maxrss`` right after it allocated the inputs, i.e. the
EXTRA memory forward+backward needed (gradients included). Repeats are interleaved (naive, chunked, naive,
chunked, ...) so a noisy neighbour on the shared machine hits all variants alike; times are medians.
Results are reported as ratios to naive because absolute numbers on a shared 2-core box are noisy.
Besides wall time, the child's CPU time (user+sys, all threads) is reported: with ``--threads 1`` it
measures the work done and is nearly immune to other people's load on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def naive_token_logps(hidden, weight, labels):
    """What HF + a DPO/ORPO trainer does: full [N, V] logits -> log_softmax -> gather."""
    import torch

    logits = (hidden @ weight.T).float()
    logp = logits.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(labels != -100, logp, torch.zeros_like(logp))


def child(args) -> None:
    import torch

    from orpo_ds.logps import chunked_token_logps

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[args.dtype]
    if args.variant == "naive":
        fn = naive_token_logps
    else:
        fn = lambda h, w, y: chunked_token_logps(h, w, y, chunk_size=args.chunk_size)  # noqa: E731

    def inputs(n, v, h):
        g = torch.Generator().manual_seed(0)
        # Generated in the target dtype and scaled in place: a transient copy of the weight would raise
        # ru_maxrss before the baseline is taken and hide part of the extra memory.
        hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
        weight = torch.randn(v, h, generator=g, dtype=dtype).div_(h**0.5).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.rand(n, generator=g) < args.ignore_frac] = -100
        return hidden, weight, labels, torch.randn(n, generator=g)

    # Warm-up on a small problem: MKL / OpenMP initialisation is not what we measure.
    h_, w_, y_, up_ = inputs(64, 1000, args.h)
    (fn(h_, w_, y_) * up_).sum().backward()
    del h_, w_, y_, up_

    hidden, weight, labels, up = inputs(args.n, args.v, args.h)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    with open("/proc/self/statm") as f:  # current RSS: should equal base, else a transient inflated base
        rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(hidden, weight, labels)
    t1 = time.perf_counter()
    (out * up).sum().backward()
    t2, c2 = time.perf_counter(), time.process_time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # A checksum so variants can be compared for agreement, and so nothing is optimised away.
    check = [float(out.detach().double().sum()), float(hidden.grad.double().norm()), float(weight.grad.double().norm())]
    print(json.dumps(dict(fwd_s=t1 - t0, bwd_s=t2 - t1, total_s=t2 - t0, cpu_s=c2 - c0, extra_bytes=peak - base,
                          base_bytes=base, base_rss_now=rss_now, check=check)))


def run_child(variant: str, chunk_size: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--n", str(args.n), "--v", str(args.v),
           "--h", str(args.h), "--chunk-size", str(chunk_size), "--dtype", args.dtype,
           "--threads", str(args.threads), "--ignore-frac", str(args.ignore_frac)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{variant} (chunk {chunk_size}) failed with {res.returncode}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192, help="tokens")
    p.add_argument("--v", type=int, default=128256, help="vocabulary size")
    p.add_argument("--h", type=int, default=1024, help="hidden size")
    p.add_argument("--chunk-size", default="1024", help="chunk size, or a comma list to sweep")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ignore-frac", type=float, default=0.0,
                   help="fraction of labels set to -100 (chunked skips those tokens; naive cannot)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive variant (it needs ~N*V*16 bytes)")
    p.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.variant, args.chunk_size = args.child, int(args.chunk_size)
        return child(args)

    chunks = [int(c) for c in args.chunk_size.split(",")]
    variants = ([] if args.no_naive else [("naive", 0)]) + [("chunked", c) for c in chunks]
    runs = {v: [] for v in variants}
    for rep in range(args.repeats):
        for variant, c in variants:
            r = run_child(variant, c, args)
            runs[(variant, c)].append(r)
            print(f"# rep {rep} {variant:7s} chunk={c:5d} total={r['total_s']:.2f}s (fwd {r['fwd_s']:.2f} "
                  f"bwd {r['bwd_s']:.2f}) cpu={r['cpu_s']:.2f}s extra={r['extra_bytes'] / 2**30:.3f} GiB "
                  f"check={r['check']}",
                  file=sys.stderr, flush=True)

    metrics = ("fwd_s", "bwd_s", "total_s", "cpu_s", "extra_bytes")
    med = {k: {m: statistics.median(r[m] for r in rs) for m in metrics} for k, rs in runs.items()}
    ref = med.get(("naive", 0))
    gib = 2**30
    print(f"\n`{' '.join(['python', 'benchmarks/bench_logps.py'] + sys.argv[1:])}`  ")
    print(f"N={args.n} V={args.v} H={args.h} {args.dtype}, ignore_frac={args.ignore_frac}, "
          f"{args.repeats} repeats (median), torch threads={args.threads or 'default'}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today().isoformat()}\n")
    print("| variant | chunk | fwd s | bwd s | fwd+bwd s | CPU s | extra peak GiB | time / naive | CPU / naive "
          "| extra mem / naive |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (variant, c), m in med.items():
        t_ratio = f"{m['total_s'] / ref['total_s']:.3f}" if ref else "-"
        c_ratio = f"{m['cpu_s'] / ref['cpu_s']:.3f}" if ref else "-"
        m_ratio = f"{m['extra_bytes'] / ref['extra_bytes']:.3f}" if ref else "-"
        print(f"| {variant} | {c or '-'} | {m['fwd_s']:.2f} | {m['bwd_s']:.2f} | {m['total_s']:.2f} | "
              f"{m['cpu_s']:.2f} | {m['extra_bytes'] / gib:.3f} | {t_ratio} | {c_ratio} | {m_ratio} |")


if __name__ == "__main__":
    main()
