"""Time of one training step (forward, backward, AdamW) with every layer trained vs freeze tuning.

    python benchmarks/bench_freeze.py                         # SmolLM2-135M shapes, 2048 tokens, 2 threads
    python benchmarks/bench_freeze.py --tokens 1024 --trainable-layers 4 10

The model is a randomly initialised Llama with SmolLM2-135M's shapes (30 layers, hidden 576, vocab
49152, tied embeddings): timing does not depend on the weights, so nothing is downloaded. One packed row
of ``--tokens`` tokens goes through the trainer's own policy (decoder + chunked head on every position).
Variants alternate within each repeat so a noisy neighbour hits them alike; medians and the ratio to
full fine-tuning are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def smollm2_135m_shaped(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def make_step(trainable_layers: int | None, tokens: int):
    """A closure running one full optimizer step; the model is built once per variant."""
    from orpo_ds.model import PolicyWithChunkedHead, train_top_layers_only

    model = smollm2_135m_shaped()
    if trainable_layers is not None:
        train_top_layers_only(model, trainable_layers)
    policy = PolicyWithChunkedHead(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 49152, (1, tokens), generator=generator)
    position_ids = torch.arange(tokens)[None] % 512  # packed sequences of 512 tokens
    labels = torch.randint(0, 49152, (tokens,), generator=generator)
    head_positions = torch.arange(tokens)

    def step() -> float:
        start = time.perf_counter()
        loss = -policy(input_ids=input_ids, position_ids=position_ids, head_positions=head_positions,
                       head_labels=labels).token_logps.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up: allocates gradients and optimizer state
    trained = sum(p.numel() for p in params)
    return step, trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--trainable-layers", type=int, nargs="+", default=[10])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"all 30 layers": None, **{f"last {n} layers": n for n in args.trainable_layers}}
    steps = {name: make_step(n, args.tokens) for name, n in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (step, _) in steps.items():
            times[name].append(step())
    print(f"torch {torch.__version__}, {args.threads} thread(s), one row of {args.tokens} tokens, "
          f"{args.repeats} repeats (medians)")
    print("| trained | parameters with gradients | s per step | vs all layers |")
    print("|---|---|---|---|")
    base = statistics.median(times["all 30 layers"])
    for name, (_, trained) in steps.items():
        t = statistics.median(times[name])
        print(f"| {name} | {trained / 1e6:.1f}M | {t:.2f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
