"""ORPO forward+backward: padded TRL-style batches vs orpo-ds packing, with and without the LM head
restricted to labelled tokens. CPU, one run, side by side.

    python benchmarks/bench_packing.py                     # the default workload: ~7 CPU-min, 1 thread
    python benchmarks/bench_packing.py --budgets 4096 --variants padded,packed_full,packed_logits   # naive head
    python benchmarks/bench_packing.py --pairs 16 --budgets 2048 --variants padded,packed_labelled   # quick

Workload (the design notes' benchmark): prompts U[32, 384] tokens, chosen and rejected responses U[16, 256]
tokens each (the last one EOS), vocabulary 32000, a small random Llama (fp32, sdpa, ``use_cache=False``).
Every variant computes the full ORPO loss (``orpo_ds.loss.orpo_loss``, NLL on the chosen responses,
normalised by the global counts of all the pairs, beta 0.1) and its backward, over the SAME pairs; the
script asserts that the summed losses and the gradient norms agree.

Variants:

* ``padded``: what TRL's ORPOTrainer does. Micro-batches of ``--pairs-per-batch`` consecutive pairs,
  chosen rows then rejected rows, right-padded to the longest of the micro-batch ``[2P, T]`` with an
  attention mask; ``model(...).logits`` ``[2P, T, V]``, ``log_softmax``, ``gather``, masks. (TRL computes a
  second ``log_softmax`` over the chosen half for its NLL term; this baseline reuses the first, so it is
  slightly faster than TRL.)
* ``packed_full``: orpo-ds packing (``pack_pairs`` + ``build_row``, budget ``--budgets``) and
  ``PolicyWithChunkedHead``, but with the head applied at EVERY position that has a next token (prompts of
  both sequences included): what packing alone buys.
* ``packed_logits`` (optional): packed rows through ``model(...).logits`` on the whole row + ``log_softmax``
  + ``gather``: packing alone, with the padded variant's naive head instead of the chunked one.
* ``packed_labelled``: the orpo-ds training path, ``prepare_micro_batch(row, nll_on_prompt=False)``,
  ``PolicyWithChunkedHead(model)(**mb.model_inputs()).token_logps``, ``micro_batch_loss``: the head only sees the
  response tokens.
* ``seqwise_labelled``: as ``packed_labelled``, but the decoder body runs each sequence of the row on its
  own (batch 1, no mask, causal sdpa). It does the attention work flash-attn varlen does on a GPU (the
  causal triangle of each sequence, ``~sum L_i^2 / 2``) instead of the ``T^2`` of the dense block-diagonal
  ``[1, 1, T, T]`` bool mask transformers hands sdpa for a packed row (with ``is_causal=False``), so the gap
  between it and ``packed_labelled`` is what the quadratic mask costs here. Same loss, same gradients.

The "attn cells" column counts the query-key pairs attention evaluates per layer and head if it computes
every cell of its mask: ``sum 2P * T^2`` (padded), ``sum T_row^2`` (packed), ``sum L_i^2`` (seqwise; the
causal kernel skips about half of these).

Each (variant, budget, repeat) runs in a fresh subprocess: the child builds the model (same seed) and the
micro-batches, warms up on one small pair, records its ``ru_maxrss`` ("base"), then times forward and
backward over all the micro-batches (data preparation excluded: it is the data loader's job). "extra peak" =
``ru_maxrss`` after the run minus base. Times are medians over repeats; CPU time is the child's user+sys
time, which with ``--threads 1`` measures the work done and is far less sensitive to other tenants than wall
time (on a shared box it still moves by ~10-15% from run to run: compare several runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ALL_VARIANTS = ("padded", "packed_full", "packed_logits", "packed_labelled", "seqwise_labelled")
PACKED = {"packed_full", "packed_logits", "packed_labelled", "seqwise_labelled"}
PAD_ID, EOS_ID = 0, 2


# ------------------------------------------------------------------------------------------------- data


def make_pairs(args):
    """``args.pairs`` random pairs (fixed seed), lengths uniform in the given ranges (inclusive)."""
    from orpo_ds.data import TokenizedPair

    rng = np.random.default_rng(args.seed)
    p_lo, p_hi = args.prompt_len
    r_lo, r_hi = args.response_len

    def tokens(n):
        return tuple(int(t) for t in rng.integers(3, args.vocab, n))

    pairs = []
    for i in range(args.pairs):
        prompt = tokens(rng.integers(p_lo, p_hi + 1))
        chosen = tokens(rng.integers(r_lo, r_hi + 1) - 1) + (EOS_ID,)
        rejected = tokens(rng.integers(r_lo, r_hi + 1) - 1) + (EOS_ID,)
        pairs.append(TokenizedPair(pair_id=i, prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected))
    return pairs


def padded_batches(pairs, per_batch):
    """TRL-style micro-batches: ``[2P, T]`` ids, attention mask, labels (-100 on prompt and padding)."""
    import torch

    batches = []
    for start in range(0, len(pairs), per_batch):
        group = pairs[start:start + per_batch]
        seqs, labels = [], []
        for part in ("chosen_ids", "rejected_ids"):
            for p in group:
                resp = list(getattr(p, part))
                seqs.append(list(p.prompt_ids) + resp)
                labels.append([-100] * len(p.prompt_ids) + resp)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [PAD_ID] * (width - len(s)) for s in seqs])
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        lab = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
        batches.append(dict(input_ids=ids, attention_mask=attn, labels=lab, num_pairs=len(group)))
    return batches


def packed_rows(pairs, budget, seed):
    from orpo_ds.packing import DEFAULT_LAYOUT, build_row, pack_pairs

    sizes = [DEFAULT_LAYOUT.num_tokens(p) for p in pairs]
    bins = pack_pairs(sizes, budget, seed=seed, epoch=0)
    return [build_row([pairs[i] for i in b]) for b in bins]


def full_head(mb, row):
    """``mb`` with the head at every position that has a label (prompts of both sequences too). The loss
    weights are unchanged (prompt positions get weight 0), so the loss is the same as ``mb``'s."""
    import torch

    seq_id = torch.from_numpy(row.seq_id)
    response = torch.from_numpy(row.response_mask)
    nll = response & torch.from_numpy(row.seq_is_chosen)[seq_id]
    labels = torch.from_numpy(row.labels)
    head_mask = labels != -100
    return dataclasses.replace(mb, head_positions=head_mask.nonzero().squeeze(1), head_labels=labels[head_mask],
                               head_seq_id=seq_id[head_mask], head_is_response=response[head_mask],
                               head_is_nll=nll[head_mask])


def stats_of(pairs, args):
    """Token counts of every layout (what the table reports), cheap: no model needed."""
    from orpo_ds.packing import DEFAULT_LAYOUT, pack_pairs, packing_efficiency

    real = sum(DEFAULT_LAYOUT.num_tokens(p) for p in pairs)
    resp = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    out = {"real_tokens": real, "response_tokens": resp}
    pb = padded_batches(pairs, args.pairs_per_batch)
    out["padded"] = dict(rows=len(pb), body_tokens=sum(b["input_ids"].numel() for b in pb),
                         head_tokens=sum(b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1) for b in pb),
                         attn_cells=sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in pb))
    for budget in args.budgets:
        rows = packed_rows(pairs, budget, args.seed)
        sizes = [DEFAULT_LAYOUT.num_tokens(p) for p in pairs]
        bins = pack_pairs(sizes, budget, seed=args.seed, epoch=0)
        out[budget] = dict(rows=len(rows), body_tokens=sum(r.num_tokens for r in rows),
                           full_head_tokens=sum(int((r.labels != -100).sum()) for r in rows),
                           attn_cells=sum(r.num_tokens ** 2 for r in rows),
                           seq_attn_cells=sum(int((r.seq_lengths ** 2).sum()) for r in rows),
                           efficiency=packing_efficiency(bins, sizes, budget))
    return out


# ------------------------------------------------------------------------------------------------ child


def child(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orpo_ds.batch import micro_batch_loss, prepare_micro_batch
    from orpo_ds.logps import chunked_token_logps
    from orpo_ds.loss import orpo_loss
    from orpo_ds.model import PolicyWithChunkedHead

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=1,
                         attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(config).float().train()
    policy = PolicyWithChunkedHead(model, chunk_size=args.chunk_size)
    variant = args.variant
    pairs = make_pairs(args)
    g_pairs = len(pairs)
    g_nll = sum(len(p.chosen_ids) for p in pairs)  # NLL on the chosen responses (EOS included)

    # ---- the micro-batches (untimed: the data loader builds them)
    def prepare(row):
        mb = prepare_micro_batch(row, nll_on_prompt=False)
        return full_head(mb, row) if variant in ("packed_full", "packed_logits") else mb

    if variant == "padded":
        batches = padded_batches(pairs, args.pairs_per_batch)
    else:
        rows = packed_rows(pairs, args.budget, args.seed)
        batches = [(prepare(r), r.seq_lengths.tolist()) for r in rows]
        assert sum(mb.num_nll_tokens for mb, _ in batches) == g_nll

    # ---- one micro-batch's loss (forward); the caller times it and its backward
    def loss_padded(b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1]  # [2P, T-1, V]
        labels = b["labels"][:, 1:]
        mask = labels != -100
        logp = logits.log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2) * mask
        avg = logp.sum(-1) / mask.sum(-1)
        n = b["num_pairs"]
        nll_sum = -logp[:n].sum()
        loss, _ = orpo_loss(avg[:n], avg[n:], nll_sum, int(mask[:n].sum()), beta=args.beta,
                            global_nll_tokens=g_nll, global_pairs=g_pairs)
        return loss

    def loss_packed(item):
        mb, seq_lengths = item
        if variant in ("packed_full", "packed_labelled"):
            token_logps = policy(**mb.model_inputs()).token_logps
        elif variant == "packed_logits":
            logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits[0]
            logp = logits.log_softmax(-1)[mb.head_positions]
            token_logps = logp.gather(1, mb.head_labels.unsqueeze(1)).squeeze(1)
        else:  # seqwise_labelled: the body per sequence (what varlen attention computes), then the same head
            body = model.get_decoder()
            hidden = torch.cat([
                body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
                for ids, pos in zip(mb.input_ids.split(seq_lengths, 1), mb.position_ids.split(seq_lengths, 1),
                                    strict=True)])
            head = model.get_output_embeddings()
            token_logps = chunked_token_logps(hidden[mb.head_positions], head.weight, mb.head_labels,
                                              chunk_size=args.chunk_size)
        loss, _ = micro_batch_loss(token_logps, mb, beta=args.beta, global_nll_tokens=g_nll, global_pairs=g_pairs)
        return loss

    step = loss_padded if variant == "padded" else loss_packed

    # ---- warm-up on the first pair alone (allocator, MKL/OpenMP init), then zero the grads in place
    if variant == "padded":
        warm = padded_batches(pairs[:1], 1)[0]
    else:
        row = packed_rows(pairs[:1], args.budget, args.seed)[0]
        warm = (prepare(row), row.seq_lengths.tolist())
    step(warm).backward()
    for p in model.parameters():
        p.grad.zero_()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fwd = bwd = 0.0
    total = 0.0
    c0 = time.process_time()
    for b in batches:
        t0 = time.perf_counter()
        loss = step(b)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd += t1 - t0
        bwd += t2 - t1
        total += loss.item()
    cpu = time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    print(json.dumps(dict(fwd_s=fwd, bwd_s=bwd, total_s=fwd + bwd, cpu_s=cpu, extra_bytes=peak - base,
                          base_bytes=base, loss=total, grad_norm=grad_norm, micro_batches=len(batches))))


# ----------------------------------------------------------------------------------------------- parent


def child_cmd(variant, budget, args):
    return [sys.executable, os.path.abspath(__file__), "--child", variant, "--budget", str(budget),
            "--pairs", str(args.pairs), "--pairs-per-batch", str(args.pairs_per_batch), "--seed", str(args.seed),
            "--prompt-len", ",".join(map(str, args.prompt_len)),
            "--response-len", ",".join(map(str, args.response_len)), "--vocab", str(args.vocab),
            "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
            "--intermediate", str(args.intermediate), "--chunk-size", str(args.chunk_size),
            "--beta", str(args.beta), "--threads", str(args.threads)]


def run_child(variant, budget, args) -> dict:
    res = subprocess.run(child_cmd(variant, budget, args), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{variant} (budget {budget}) failed with {res.returncode}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def int_pair(text):
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--pairs-per-batch", type=int, default=4, help="pairs per padded micro-batch (2x rows)")
    p.add_argument("--budgets", default="2048,4096", help="packed row token budgets (comma list)")
    p.add_argument("--variants", default="padded,packed_full,packed_labelled,seqwise_labelled",
                   help=f"comma list of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--prompt-len", type=int_pair, default=(32, 384), help="lo,hi (inclusive, uniform)")
    p.add_argument("--response-len", type=int_pair, default=(16, 256), help="lo,hi (inclusive, uniform)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    p.add_argument("--loss-rtol", type=float, default=1e-4)
    p.add_argument("--child", choices=ALL_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.variant = args.child
        return child(args)

    budgets = [int(b) for b in args.budgets.split(",")]
    args.budgets = budgets
    variants = args.variants.split(",")
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}")
    runs_of = [(v, 0) for v in variants if v == "padded"]
    runs_of += [(v, b) for b in budgets for v in variants if v in PACKED]

    pairs = make_pairs(args)
    st = stats_of(pairs, args)
    pad = st["padded"]
    print(f"# {args.pairs} pairs: {st['real_tokens']} real tokens ({st['response_tokens']} response); padded: "
          f"{pad['rows']} micro-batches, {pad['body_tokens']} tokens (mean {pad['body_tokens'] / pad['rows']:.0f}"
          f"/batch, {st['real_tokens'] / pad['body_tokens']:.1%} real)", file=sys.stderr)
    for b in budgets:
        s = st[b]
        print(f"# budget {b}: {s['rows']} rows, packing efficiency {s['efficiency']:.1%}", file=sys.stderr)

    results = {k: [] for k in runs_of}
    for rep in range(args.repeats):
        for variant, budget in runs_of:
            r = run_child(variant, budget, args)
            results[(variant, budget)].append(r)
            print(f"# rep {rep} {variant:16s} budget={budget or '-':>5} total={r['total_s']:.1f}s "
                  f"(fwd {r['fwd_s']:.1f} bwd {r['bwd_s']:.1f}) cpu={r['cpu_s']:.1f}s "
                  f"extra={r['extra_bytes'] / 2**30:.3f} GiB loss={r['loss']:.8f} grad_norm={r['grad_norm']:.8f}",
                  file=sys.stderr, flush=True)

    # Same loss and gradients, whatever the layout.
    ref_loss = next(iter(results.values()))[0]["loss"]
    ref_grad = next(iter(results.values()))[0]["grad_norm"]
    for key, rs in results.items():
        for r in rs:
            assert math.isclose(r["loss"], ref_loss, rel_tol=args.loss_rtol), (key, r["loss"], ref_loss)
            assert math.isclose(r["grad_norm"], ref_grad, rel_tol=1e-3), (key, r["grad_norm"], ref_grad)
    losses = [r["loss"] for rs in results.values() for r in rs]
    grads = [r["grad_norm"] for rs in results.values() for r in rs]

    metrics = ("fwd_s", "bwd_s", "total_s", "cpu_s", "extra_bytes")
    med = {k: {m: statistics.median(r[m] for r in rs) for m in metrics} for k, rs in results.items()}
    ref = med.get(("padded", 0))

    def tokens(variant, budget):
        if variant == "padded":
            return pad["body_tokens"], pad["head_tokens"], pad["attn_cells"]
        s = st[budget]
        head = {"packed_full": s["full_head_tokens"], "packed_logits": s["body_tokens"]}.get(
            variant, st["response_tokens"])
        cells = s["seq_attn_cells"] if variant == "seqwise_labelled" else s["attn_cells"]
        return s["body_tokens"], head, cells

    print(f"\n`{' '.join(['python', 'benchmarks/bench_packing.py'] + sys.argv[1:])}`  ")
    print(f"{args.pairs} pairs (seed {args.seed}), prompts U{list(args.prompt_len)}, responses "
          f"U{list(args.response_len)}; Llama V={args.vocab} H={args.hidden} L={args.layers} heads={args.heads} "
          f"I={args.intermediate} fp32 sdpa; padded micro-batch {args.pairs_per_batch} pairs; head chunk "
          f"{args.chunk_size}; {args.repeats} repeat(s) (median); torch threads={args.threads}; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"{datetime.date.today().isoformat()}  ")
    print(f"real tokens {st['real_tokens']}, response tokens {st['response_tokens']}; padded: "
          f"{pad['rows']} micro-batches, {pad['body_tokens']} tokens (mean {pad['body_tokens'] / pad['rows']:.0f} "
          f"per micro-batch, {st['real_tokens'] / pad['body_tokens']:.1%} real); "
          + "; ".join(f"budget {b}: {st[b]['rows']} rows, packing efficiency {st[b]['efficiency']:.1%}"
                      for b in budgets))
    print(f"loss {min(losses):.8f}..{max(losses):.8f}, grad norm {min(grads):.8f}..{max(grads):.8f} "
          f"(all variants agree)\n")
    print("| variant | budget | micro-batches | body tokens | head tokens | attn cells (M) | fwd s | bwd s | "
          "fwd+bwd s | CPU s | extra peak GiB | speedup (wall) | speedup (CPU) | mem / padded |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (variant, budget), m in med.items():
        body, head, cells = tokens(variant, budget)
        nmb = results[(variant, budget)][0]["micro_batches"]
        sw = f"{ref['total_s'] / m['total_s']:.2f}x" if ref else "-"
        sc = f"{ref['cpu_s'] / m['cpu_s']:.2f}x" if ref else "-"
        mr = f"{m['extra_bytes'] / ref['extra_bytes']:.3f}" if ref else "-"
        print(f"| {variant} | {budget or '-'} | {nmb} | {body} | {head} | {cells / 1e6:.1f} | {m['fwd_s']:.1f} | "
              f"{m['bwd_s']:.1f} | {m['total_s']:.1f} | {m['cpu_s']:.1f} | {m['extra_bytes'] / 2**30:.3f} | "
              f"{sw} | {sc} | {mr} |")


if __name__ == "__main__":
    main()
