"""Time of one AdamW step on the CPU: torch's default per-tensor loop vs its fused kernel (what the engine uses).

    python benchmarks/bench_optimizer.py              # SmolLM2-135M shapes, 1 thread, 5 interleaved repeats
    python benchmarks/bench_optimizer.py --threads 2

Two layouts of SmolLM2-135M's 134.5M parameters: the 272 separate tensors a ZeRO-0 rank steps, and the
one flat fp32 partition (half the parameters) a ZeRO-3 rank of a 2-rank run steps. Repeats alternate the
variants so a noisy neighbour hits both alike; the median is reported, and the ratio is what to read.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def smollm2_135m_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of SmolLM2-135M (Llama: hidden 576, MLP 1536, 30 layers, 9/3 heads, tied 49152 vocab)."""
    hidden, mlp, kv = 576, 1536, 192
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q, k, v, o
             (mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]  # gate, up, down, 2 norms
    return [(49152, hidden)] + layer * 30 + [(hidden,)]


def step_time(params: list[torch.nn.Parameter], fused: bool, repeats: int) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused, foreach=False if not fused else None)
    optimizer.step()  # allocates the moments outside the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = smollm2_135m_shapes()
    total = sum(torch.Size(s).numel() for s in shapes)
    layouts = {"ZeRO-0 rank: 272 tensors": shapes, "ZeRO-3 rank of 2: one flat partition": [(total // 2,)]}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {total / 1e6:.1f}M parameters")
    print("| layout | per-tensor loop s | fused s | fused / loop |")
    print("|---|---|---|---|")
    for name, layout in layouts.items():
        params = [torch.nn.Parameter(torch.randn(s)) for s in layout]
        for p in params:
            p.grad = torch.randn_like(p)
        loop, fused = [], []
        for _ in range(args.repeats):  # alternate: loop, fused, loop, fused, ...
            loop += step_time(params, fused=False, repeats=1)
            fused += step_time(params, fused=True, repeats=1)
        a, b = statistics.median(loop), statistics.median(fused)
        print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
