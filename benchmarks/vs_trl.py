"""orpo-ds against TRL's ORPOTrainer on the same model, data, beta, learning rate and max_length.

    pip install -e ".[bench]"                      # TRL, for the side by side
    python benchmarks/vs_trl.py                    # both workloads, every variant, one run each
    python benchmarks/vs_trl.py --workload synthetic --variants trl,orpo-ds --repeats 2
    python benchmarks/vs_trl.py --workload synthetic --variants trl,orpo-ds --vocab 128256 --max-length 1024 \
        --synthetic-pairs 16                       # the memory case

Workloads:

* ``demo``: the main job. orpo-ds runs ``configs/demo.yaml`` exactly as ``make train`` runs it (``make
  train`` itself, into a temporary output folder); TRL trains on the same SmolLM2-135M-Instruct, the same
  train pairs (the first ``--trl-pairs``, in conversational form, so its chat template renders them) at
  the same max_length, beta and learning rate, batch 2, ``OMP_NUM_THREADS`` threads, with the config's
  ``model.trainable_layers`` frozen by the same function (``orpo_ds.model.train_top_layers_only``). TRL
  gets only the pairs whose prompt leaves room for a response (:func:`trl_prompt_tokens` says why).
* ``synthetic``: 64 pairs (``--synthetic-pairs``) of random words (prompts U[32, 384], responses
  U[16, 256] words), a word-level tokenizer (one token per word, so both systems see the same tokens) and
  a random 4-layer Llama (hidden 256, vocab ``--vocab``), ~4 pairs a step for both (TRL batch 4).

Each variant runs as its own process (whole process timed, peak RSS = the largest sum of the resident
memory of the process and all its children, sampled every 0.2 s), and variants alternate within each
repeat, so a noisy neighbour hits them alike. Train tokens/s is the real (unpadded) tokens of both
sequences of every trained pair over the training loop's time: orpo-ds's ``step_s`` from metrics.jsonl,
TRL's ``train_runtime``, with TRL's tokens counted from the attention masks of the batches it trained on.
Both run in fp32 (``ORPOConfig`` would default to bf16 autocast) and both write the trained model.

Variants: ``trl``; ``orpo-ds`` (the ``make train`` layout of this machine: on a CPU one rank with
``ds_configs/zero0.json``, see the Makefile); ``orpo-ds:share-prompt``
(the same with ``train.share_prompt=true``: each prompt encoded once for both responses); the ablations
``orpo-ds:dense-mask`` (``model.attn_implementation=sdpa``: transformers' dense ``[T, T]`` block mask
instead of segmented attention), ``orpo-ds:zero3`` (the same one process with ZeRO-3, the config's own
engine settings, as a one-GPU check of a cluster config runs: with one rank ZeRO-3 partitions nothing and
only adds its gathers and copies) and
``orpo-ds:2x1-zero3`` (2 CPU ranks of one thread, ZeRO-3, half the row budget each: the layout before
this benchmark). The packing and labelled-head shares are measured by
``benchmarks/bench_packing.py``. With ``--append``, the table, the command and the machine are appended
to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN = ROOT / "assets/data/dpo_en_demo.train.jsonl"
DEMO_MODEL = ROOT / "assets/smollm2-135m-instruct"
DEMO = {"beta": 3.0, "lr": 1.0e-4, "max_length": 384, "trl_batch": 2}  # configs/demo.yaml's figures
SYNTHETIC = {"beta": 0.1, "lr": 1.0e-4, "trl_batch": 4}
VARIANTS = ("trl", "orpo-ds", "orpo-ds:share-prompt", "orpo-ds:dense-mask", "orpo-ds:zero3", "orpo-ds:2x1-zero3")


# ---------------------------------------------------------------------------------------- measuring

def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` to completion; (wall seconds, peak MB of the process tree's summed RSS). Raises on failure."""
    import psutil

    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass  # a child exited between listing and reading
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}; see {log}")
    return wall, peak / 2**20


def orpo_ds_variant(variant: str, config: Path, out_dir: Path, extra: list[str], threads: int) -> tuple[list, dict]:
    """The ``make train`` command line and environment of an orpo-ds variant."""
    overrides = [f"train.output_dir={out_dir}", *extra]
    make_vars = []
    if variant == "orpo-ds:share-prompt":
        overrides.append("train.share_prompt=true")
    elif variant == "orpo-ds:dense-mask":
        overrides.append("model.attn_implementation=sdpa")
    elif variant == "orpo-ds:zero3":
        make_vars = ["DS_CONFIG="]  # the config's own engine settings: ds_configs/zero3.json
    elif variant == "orpo-ds:2x1-zero3":
        # The same tokens a step: two rows of half the budget, one per rank.
        import yaml

        budget = yaml.safe_load(config.read_text())["train"]["micro_batch_tokens"]
        make_vars = ["RANKS=2", "OMP_NUM_THREADS=1"]
        overrides += ["deepspeed.config=ds_configs/zero3.json", f"train.micro_batch_tokens={budget // 2}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return ["make", "-s", "train", f"CONFIG={config}", f"OVERRIDES={' '.join(overrides)}", *make_vars], env


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def orpo_ds_result(out_dir: Path) -> dict:
    steps = [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "step_s" in r]
    train_s = sum(r["step_s"] for r in steps)
    tokens = sum(r["sequence_tokens"] for r in steps)  # both sequences of a pair, as TRL counts them
    return {"train_s": train_s, "tokens": tokens, "pairs": sum(r["pairs"] for r in steps),
            "final_loss": steps[-1]["loss"]}


# ----------------------------------------------------------------------------------------- TRL side

def trl_worker(args: argparse.Namespace) -> None:
    """One TRL ORPOTrainer run in this process; writes its figures to ``args.result``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainable = [row for row in rows if trl_prompt_tokens(tokenizer, row["prompt"]) < args.max_length - 1]
    skipped = len(rows) - len(trainable)
    rows = trainable[: args.pairs]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    if args.trainable_layers:  # the same freeze tuning as the orpo-ds config, by the same function
        from orpo_ds.model import train_top_layers_only

        train_top_layers_only(model, args.trainable_layers)
    steps = -(-len(rows) // args.batch)
    config = ORPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=args.batch,
                        learning_rate=args.lr, beta=args.beta, max_length=args.max_length, max_steps=steps,
                        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, logging_steps=1,
                        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                        disable_tqdm=True, bf16=False, fp16=False)  # ORPOConfig defaults to bf16 autocast
    trainer = ORPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    collate, counted = trainer.data_collator, {"tokens": 0, "pairs": 0}

    def counting_collator(features):
        batch = collate(features)
        counted["tokens"] += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        counted["pairs"] += len(features)
        return batch

    trainer.data_collator = counting_collator
    output = trainer.train()
    trainer.save_model()  # orpo-ds's process writes its trained model too
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(args.result).write_text(json.dumps({"train_s": output.metrics["train_runtime"], **counted,
                                             "final_loss": losses[-1], "trl_skipped_long_prompts": skipped}))


def trl_prompt_tokens(tokenizer, prompt) -> int:
    """Tokens of a prompt as TRL's ORPOTrainer renders it (chat template with the generation prompt).

    TRL 1.16's ORPO truncation cuts only the response, never the prompt: a prompt of ``max_length`` tokens
    or more leaves an empty response, whose mean log-prob is 0/0. That NaN reaches the gradient and, on
    the next step, every weight (seen on the demo data at max_length 384). The worker therefore trains
    TRL only on pairs whose prompt leaves room for a response; orpo-ds cuts such prompts from the left.
    """
    if isinstance(prompt, str):
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def trl_command(model: Path, data: Path, result: Path, *, pairs: int, batch: int, beta: float, lr: float,
                max_length: int, threads: int, trainable_layers: int | None) -> list[str]:
    return [sys.executable, __file__, "--trl-worker", "--model", str(model), "--data", str(data),
            "--result", str(result), "--pairs", str(pairs), "--batch", str(batch), "--beta", str(beta),
            "--lr", str(lr), "--max-length", str(max_length), "--threads", str(threads),
            "--trainable-layers", str(trainable_layers or 0)]


# ---------------------------------------------------------------------------------------- workloads

def demo_trainable_layers(config: Path) -> int | None:
    """``model.trainable_layers`` of the demo config: TRL's run freezes the same layers."""
    import yaml

    return yaml.safe_load(config.read_text())["model"].get("trainable_layers")


def demo_trl_data(path: Path) -> None:
    """The demo's ShareGPT pairs in TRL's conversational form (prompt messages, one assistant reply each)."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    with path.open("w") as out:
        for line in DEMO_TRAIN.read_text().splitlines():
            row = json.loads(line)
            prompt = [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]
            reply = lambda r: [{"role": "assistant", "content": r["value"]}]  # noqa: E731
            out.write(json.dumps({"prompt": prompt, "chosen": reply(row["chosen"]),
                                  "rejected": reply(row["rejected"])}) + "\n")


def make_synthetic(folder: Path, *, vocab: int, num_pairs: int, max_length: int, seed: int = 0) -> tuple[Path, Path]:
    """A word-level tokenizer, a random Llama on it and ``num_pairs`` random-word pairs; (model dir, data)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    model_dir = folder / "model"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         max_position_embeddings=max(2048, max_length), pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(f"w{rng.randrange(2, vocab)}" for _ in range(rng.randint(lo, hi)))  # noqa: E731
    data = folder / "pairs.jsonl"
    with data.open("w") as out:
        for _ in range(num_pairs):
            out.write(json.dumps({"prompt": text(32, 384), "chosen": text(16, 256), "rejected": text(16, 256)}) + "\n")
    return model_dir, data


def synthetic_config(folder: Path, model_dir: Path, data: Path, max_length: int) -> Path:
    """orpo-ds config of the synthetic workload: one epoch, ~4 pairs (~2,750 tokens) a step."""
    config = folder / "orpo.yaml"
    config.write_text(
        f"model: {{name_or_path: {model_dir}}}\n"
        f"data: {{train: {data}, format: standard, max_length: {max_length}, num_proc: 1}}\n"
        f"loss: {{beta: {SYNTHETIC['beta']}}}\n"
        f"train: {{lr: {SYNTHETIC['lr']}, epochs: 1, max_steps: 0, micro_batch_tokens: 2816, save_steps: 0}}\n"
        "deepspeed: {config: ds_configs/zero3.json}\n")
    return config


# -------------------------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["demo", "synthetic", "both"], default="both")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--trl-pairs", type=int, default=0, help="demo: pairs TRL trains on (0: as many as orpo-ds)")
    ap.add_argument("--vocab", type=int, default=32000, help="synthetic: vocabulary size")
    ap.add_argument("--synthetic-pairs", type=int, default=64, help="synthetic: number of pairs")
    ap.add_argument("--max-length", type=int, default=640,
                    help="synthetic: max_length (640 holds the longest sequence: no truncation)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    # The TRL worker process (internal).
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--model", "--data", "--result"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    for flag, kind in (("--pairs", int), ("--batch", int), ("--beta", float), ("--lr", float),
                       ("--trainable-layers", int)):
        ap.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"vs_trl.py: unknown variants {sorted(unknown)}; pick from {', '.join(VARIANTS)}")
    workloads = ["demo", "synthetic"] if args.workload == "both" else [args.workload]
    # `make train` fetches and converts the demo assets the first time (~50 s here): done once, untimed, so
    # that no variant's whole-process time includes it; each run still verifies them, as `make train` does.
    subprocess.run(["make", "-s", "assets"], cwd=ROOT, check=True)
    work = Path(tempfile.mkdtemp(prefix="vs_trl-"))
    rows = []
    for workload in workloads:
        if workload == "demo":
            config, extra = ROOT / "configs/demo.yaml", []
            trl_data = work / "demo_trl.jsonl"
            demo_trl_data(trl_data)
            trl_model, figures, max_length = DEMO_MODEL, DEMO, DEMO["max_length"]
            trainable_layers = demo_trainable_layers(config)
        else:
            folder = work / "synthetic"
            folder.mkdir()
            trl_model, trl_data = make_synthetic(folder, vocab=args.vocab, num_pairs=args.synthetic_pairs,
                                                 max_length=args.max_length)
            config, extra = synthetic_config(folder, trl_model, trl_data, args.max_length), []
            figures, max_length, trainable_layers = SYNTHETIC, args.max_length, None
        results: dict[str, list[dict]] = {v: [] for v in variants}
        # orpo-ds first in each repeat: on the demo, TRL trains on as many pairs as orpo-ds did.
        order = sorted(variants, key=lambda v: v == "trl")
        for repeat in range(args.repeats):
            for variant in order:
                tag = f"{workload}-{variant.replace(':', '-')}-{repeat}"
                log = work / f"{tag}.log"
                if variant == "trl":
                    trl_pairs = args.trl_pairs or (results["orpo-ds"][0]["pairs"] if results.get("orpo-ds")
                                                    else args.synthetic_pairs)
                    result_file = work / f"{tag}.json"
                    cmd = trl_command(trl_model, trl_data, result_file, pairs=trl_pairs, batch=figures["trl_batch"],
                                      beta=figures["beta"], lr=figures["lr"], max_length=max_length,
                                      threads=args.threads, trainable_layers=trainable_layers)
                    env, read = os.environ.copy(), functools.partial(read_json, result_file)
                else:
                    out_dir = work / tag
                    cmd, env = orpo_ds_variant(variant, config, out_dir, extra, args.threads)
                    read = functools.partial(orpo_ds_result, out_dir)
                try:
                    wall, peak = run_measured(cmd, env, log)
                except RuntimeError as exc:  # one failed variant must not lose the others' measurements
                    print(f"[{tag}] FAILED: {exc}", flush=True)
                    continue
                result = read()
                result.update(wall_s=wall, peak_mb=peak)
                results[variant].append(result)
                print(f"[{tag}] {json.dumps(result)}", flush=True)
        rows += summarize(workload, results)
    table = format_table(rows)
    print(table)
    if args.append:
        append_results(table, sys.argv)


def summarize(workload: str, results: dict[str, list[dict]]) -> list[dict]:
    def med(variant, key):
        return statistics.median(r[key] for r in results[variant])

    rows = []
    for variant, runs in results.items():
        if not runs:
            continue
        row = {"workload": workload, "variant": variant, "runs": len(runs),
               **{k: med(variant, k) for k in ("wall_s", "train_s", "tokens", "pairs", "peak_mb", "final_loss")}}
        row["tokens_per_s"] = statistics.median(r["tokens"] / r["train_s"] for r in runs)
        row["pairs_per_s"] = statistics.median(r["pairs"] / r["train_s"] for r in runs)
        rows.append(row)
    trl = next((r for r in rows if r["variant"] == "trl"), None)
    for row in rows:
        if trl:
            row["speed_vs_trl"] = row["tokens_per_s"] / trl["tokens_per_s"]
            row["wall_vs_trl"] = trl["wall_s"] / row["wall_s"] * (row["pairs"] / trl["pairs"])
            row["mem_vs_trl"] = row["peak_mb"] / trl["peak_mb"]
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| workload | variant | pairs | tokens | train s | tokens/s | pairs/s | whole process s | peak RSS MB "
            "| final loss | tokens/s vs TRL | whole process vs TRL | memory vs TRL |")
    lines = [head, "|---|---|" + "---:|" * 11]
    for r in rows:
        ratio = functools.partial(lambda row, key: f"{row[key]:.2f}x" if key in row else "-", r)
        lines.append(f"| {r['workload']} | {r['variant']} | {r['pairs']:.0f} | {r['tokens']:.0f} | {r['train_s']:.1f} "
                     f"| {r['tokens_per_s']:.1f} | {r['pairs_per_s']:.3f} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} "
                     f"| {r['final_loss']:.4f} | {ratio('speed_vs_trl')} | {ratio('wall_vs_trl')} "
                     f"| {ratio('mem_vs_trl')} |")
    return "\n".join(lines)


def append_results(table: str, argv: list[str]) -> None:
    import torch
    import transformers

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"transformers {transformers.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with (ROOT / "benchmarks/RESULTS.md").open("a") as out:
        out.write(f"\n### vs_trl.py run\n\n`python benchmarks/{' '.join([Path(argv[0]).name, *argv[1:]])}` "
                  f"({machine})\n\n{table}\n")


if __name__ == "__main__":
    main()
