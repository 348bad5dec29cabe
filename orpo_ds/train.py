"""The ORPO training loop, top to bottom: data -> packing plan -> model -> engine -> steps -> export.

A global optimizer step is ``train.grad_accum`` micro-batches on each rank; one micro-batch is one packed
row of at most ``train.micro_batch_tokens`` tokens. The loss is normalised by the step's global NLL-token
and pair counts, all-reduced before the first forward pass of the step (DESIGN.md section 2).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orpo_ds import checkpoint as ckpt_lib
from orpo_ds import engine as eng_lib
from orpo_ds.batch import MicroBatch, dummy_micro_batch, micro_batch_loss, prepare_micro_batch
from orpo_ds.config import Config, ConfigError, dump_config
from orpo_ds.data import DataError, load_records, tokenize_pairs
from orpo_ds.evaluate import evaluate_pairs
from orpo_ds.flops import peak_flops, step_flops
from orpo_ds.loss import STAT_KEYS, orpo_metrics
from orpo_ds.metrics import MetricsLog, progress_bar
from orpo_ds.model import build_policy
from orpo_ds.packing import DEFAULT_LAYOUT, TokenizedPair, build_row, pack_pairs, plan_steps
from orpo_ds.preemption import EXIT_INTERRUPTED, Preempted, PreemptionSignal
from orpo_ds.report import before_after_table, plot_metrics
from orpo_ds.export import export_trained
from orpo_ds.safe_files import OutputDirLock, UnsafeOutputError, check_export_target

LAYOUT = DEFAULT_LAYOUT


@dataclass(frozen=True)
class StepPlan:
    """The micro-batches of one optimizer step: ``rows[rank]`` lists grad_accum entries, each a list of
    pair indices (one packed row) or None (a dummy micro-batch)."""

    epoch: int
    rows: list[list[list[int] | None]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_epoch(pairs: list[TokenizedPair], micro_batch_tokens: int, world_size: int, grad_accum: int,
               seed: int, epoch: int) -> list[StepPlan]:
    """Pack the epoch's pairs into rows and deal the rows out to ranks, identically on every rank."""
    lengths = [LAYOUT.num_tokens(p) for p in pairs]
    bins = pack_pairs(lengths, micro_batch_tokens, seed=seed, epoch=epoch, pair_ids=[p.pair_id for p in pairs])
    bin_tokens = [sum(lengths[i] for i in b) for b in bins]
    return [StepPlan(epoch, [[bins[b] if b is not None else None for b in rank_slots] for rank_slots in step])
            for step in plan_steps(bin_tokens, world_size, grad_accum)]


def plan_run(pairs: list[TokenizedPair], cfg: Config, world_size: int) -> list[StepPlan]:
    t = cfg.train
    steps: list[StepPlan] = []
    for epoch in range(t.epochs):
        steps += plan_epoch(pairs, t.micro_batch_tokens, world_size, t.grad_accum, t.seed, epoch)
        if t.max_steps and len(steps) >= t.max_steps:
            break
    return steps[: t.max_steps] if t.max_steps else steps


def step_shape(plan: StepPlan, pairs: list[TokenizedPair], nll_on_prompt: bool) -> tuple[list[int], int]:
    """Sequence lengths of the whole step (every rank) and the positions that reach the head, from the
    plan on the host: what :func:`orpo_ds.flops.step_flops` needs, with no collective."""
    lengths, head_positions = [], 0
    for rank_rows in plan.rows:
        for row in rank_rows:
            for p in (pairs[i] for i in row or ()):
                prompt = len(p.prompt_ids)
                lengths += [prompt + len(p.chosen_ids), prompt + len(p.rejected_ids)]
                head_positions += len(p.chosen_ids) + len(p.rejected_ids) + (prompt if nll_on_prompt else 0)
    return lengths, head_positions


def micro_batches_for(plan: StepPlan, rank: int, pairs: list[TokenizedPair], nll_on_prompt: bool,
                      pad_token_id: int, device: torch.device) -> list[MicroBatch]:
    return [dummy_micro_batch(pad_token_id, device) if row is None else
            prepare_micro_batch(build_row([pairs[i] for i in row], LAYOUT), nll_on_prompt=nll_on_prompt,
                                device=device)
            for row in plan.rows[rank]]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


def run_micro_batches(engine, mbs: list[MicroBatch], cfg: Config, world_size: int) -> dict[str, float]:
    """Forward, backward and step over this rank's micro-batches of one optimizer step.

    The host reads twice per step, never per micro-batch: the global pair and NLL-token counts before
    the first forward (the loss divides by them), and the step's stats, stacked on the device and
    reduced once, after the update. A non-finite loss therefore does not stop the step: its gradients
    are kept out of the update by the engine's guard (:meth:`Engine.step` returns False).

    Returns the step's stats summed over all ranks, plus ``tokens``, ``nonfinite_losses`` (micro-batches
    whose loss was not finite, all ranks), ``skipped`` (1.0 when the update was not applied, the same on
    every rank) and this rank's ``nonfinite_pair_ids``.
    """
    counts = torch.tensor([sum(mb.num_pairs for mb in mbs), sum(mb.num_nll_tokens for mb in mbs)], dtype=torch.float64)
    global_pairs, global_nll_tokens = (max(int(v), 1) for v in eng_lib.reduce_to_host(counts))
    # DeepSpeed divides each backward by grad_accum and averages gradients over ranks; undo both so the
    # step's gradient is exactly the gradient of the globally normalised loss.
    backward_scale = world_size * cfg.train.grad_accum
    device = mbs[0].input_ids.device
    sums = torch.zeros(len(STAT_KEYS) + 2, dtype=torch.float64, device=device)  # stats, tokens, non-finite
    finite_flags, applied = [], False
    for mb in mbs:
        token_logps = engine(**mb.model_inputs())
        loss, stats = micro_batch_loss(token_logps, mb, beta=cfg.loss.beta, global_pairs=global_pairs,
                                       global_nll_tokens=global_nll_tokens)
        finite = torch.isfinite(loss.detach())
        finite_flags.append(finite)
        engine.backward(loss * backward_scale)
        applied = engine.step()
        if stats:
            sums[: len(STAT_KEYS)] += torch.stack([stats[k] for k in STAT_KEYS]).double()
        sums[-2] += mb.num_tokens
        sums[-1] += (~finite).double()
    totals = eng_lib.reduce_to_host(sums)
    out = dict(zip(STAT_KEYS, totals[: len(STAT_KEYS)]))
    out["tokens"], out["nonfinite_losses"] = totals[-2], totals[-1]
    out["skipped"] = float(not applied)
    bad_pairs = []
    if out["nonfinite_losses"]:  # rare: a host read per micro-batch only to name the pairs
        bad_pairs = [i for mb, ok in zip(mbs, eng_lib.host_values(torch.stack(finite_flags))) if not ok
                     for i in mb.pair_ids.tolist()]
    out["nonfinite_pair_ids"] = bad_pairs
    return out


def evaluate(engine, pairs: list[TokenizedPair], cfg: Config, info, pad_token_id: int) -> dict[str, float]:
    """Held-out metrics under ``eval/`` names, through the engine, no gradients."""
    engine.eval()
    metrics = evaluate_pairs(engine, pairs, micro_batch_tokens=cfg.train.micro_batch_tokens, beta=cfg.loss.beta,
                             nll_on_prompt=cfg.loss.nll_on_prompt, pad_token_id=pad_token_id, rank=info.rank,
                             world_size=info.world_size, device=info.device)
    engine.release_gathered()
    engine.train()
    return {f"eval/{k}": v for k, v in metrics.items()}


def raise_if_any_rank_failed(error: Exception | None, elsewhere: Exception) -> None:
    """Collective: re-raise ``error`` on the rank that hit it and ``elsewhere`` on every other rank, so a
    failure on one rank ends the job with its message instead of leaving the others blocked."""
    (failed,) = eng_lib.reduce_to_host(torch.tensor([float(error is not None)]))
    if failed:
        raise error or elsewhere


def lock_output_dir(out_dir: Path, info) -> OutputDirLock:
    """Rank 0 holds ``<output_dir>/.lock`` for the run: a second run into the same folder exits 2."""
    lock, error = OutputDirLock(out_dir), None
    if info.is_main:
        try:
            lock.acquire()
        except UnsafeOutputError as exc:
            error = exc
    raise_if_any_rank_failed(error, UnsafeOutputError(f"{out_dir} is in use by another run (see rank 0)"))
    return lock


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as exc:  # a missing folder, or a hub name this machine cannot reach
        raise ConfigError(f"model.name_or_path: cannot load {cfg.model.name_or_path!r}: not found, or not a "
                          f"model folder ({str(exc).splitlines()[0]})") from exc


def load_pairs(source: str, tokenizer, cfg: Config, info) -> list[TokenizedPair]:
    """Tokenize on rank 0 first (parallel, cached); the other ranks then read the cache.

    A failure on rank 0 is shared with the other ranks before they wait on it, so a bad file ends the
    whole job with rank 0's message instead of leaving the others blocked in a barrier.
    """
    d = cfg.data
    pairs, error = None, None
    for turn in ("main", "others"):
        if (turn == "main") == info.is_main:
            try:
                records = load_records(source)
                pairs, report = tokenize_pairs(records, tokenizer, max_length=d.max_length, fmt=d.format,
                                               truncation=d.truncation, num_proc=d.num_proc,
                                               special_tokens_in_content=d.special_tokens_in_content,
                                               cache_dir=d.cache_dir, strict=d.strict, progress=info.is_main)
                if info.is_main:
                    print(f"[data] {source}: {report.summary()}", flush=True)
            except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
                error = exc
        raise_if_any_rank_failed(error, DataError(f"data: {source} failed to load on another rank (see rank 0's error)"))
    if not pairs:
        raise DataError(f"data: no usable pairs in {source}")
    return pairs


def prepare_output_dir(cfg: Config, info, identity: ckpt_lib.TrainerState, log: MetricsLog) -> Path | None:
    """Decide fresh start or resume, refusing what would mix two runs, then record the config.

    Returns the checkpoint to resume from (None: a fresh start). config.json is written only once the
    resume is accepted, so a refused rerun leaves the folder as it was.
    """
    out_dir = Path(cfg.train.output_dir)
    resume_from = ckpt_lib.resolve_resume(cfg.train.resume, out_dir, overwrite=cfg.train.overwrite)
    if resume_from is not None:
        ckpt_lib.check_compatible(ckpt_lib.read_state(resume_from), identity, resume_from)
    if info.is_main:
        if resume_from is None:
            if cfg.train.overwrite:
                ckpt_lib.clear_run_state(out_dir)
            log.start_fresh()
        (out_dir / "config.json").write_text(dump_config(cfg))
    eng_lib.barrier()
    return resume_from


def run_training(cfg: Config) -> dict[str, float]:
    preemption = PreemptionSignal()  # first: a signal during start-up must not kill the rank
    info = eng_lib.init_distributed()
    seed_everything(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    _lock = lock_output_dir(out_dir, info)  # held until the process exits
    if cfg.train.export:  # refuse now rather than after hours of training
        check_export_target(out_dir / "final", protected=[])
    dtype = eng_lib.resolve_dtype(cfg.train, info)
    ds_config = eng_lib.build_ds_config(eng_lib.read_ds_config(cfg.deepspeed.config), cfg.train, info.world_size, dtype)
    tokenizer = load_tokenizer(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_pairs = load_pairs(cfg.data.train, tokenizer, cfg, info)
    eval_pairs = load_pairs(cfg.data.eval, tokenizer, cfg, info) if cfg.data.eval else []
    steps = plan_run(train_pairs, cfg, info.world_size)
    identity = ckpt_lib.run_identity(cfg, info.world_size, train_pairs, tokenizer)
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=info.is_main)
    resume_from = prepare_output_dir(cfg, info, identity, log)

    policy, _keepalive = build_policy(cfg.model, ds_config, dtype, chunk_size=cfg.loss.chunk_size)
    model_config = policy.causal_lm.config
    # MFU against the bf16 table only in bf16: an fp32 run on a GPU needs train.peak_tflops to get one.
    device_name = torch.cuda.get_device_name(info.device) if info.on_gpu and dtype == torch.bfloat16 else None
    peak = peak_flops(device_name, cfg.train.peak_tflops)
    if info.is_main:
        print(f"[model] attention: {model_config._attn_implementation} (model.attn_implementation="
              f"{cfg.model.attn_implementation}); {dtype}; mfu: "
              f"{f'peak {peak / 1e12:.0f} TFLOP/s per device' if peak else 'off (no known peak)'}", flush=True)
    engine = eng_lib.Engine(policy, cfg.train, ds_config, total_steps=len(steps))
    saver = ckpt_lib.CheckpointSaver(engine, policy, tokenizer, cfg, info, identity)
    done_steps = saver.resume(resume_from, log) if resume_from else 0
    # A requeued job whose last checkpoint is the final step already evaluated after training (the eval
    # precedes that checkpoint): it reports the logged figures and re-exports, without logging them twice.
    finished = bool(steps) and done_steps == len(steps)
    summary: dict = {"resumed_from_step": done_steps}
    if eval_pairs and cfg.train.eval_before:
        summary["eval_before"] = (log.write({"step": 0, **evaluate(engine, eval_pairs, cfg, info, pad_id)})
                                  if done_steps == 0 else log.logged_eval(0))

    engine.train()
    bar = progress_bar(len(steps), enabled=info.is_main, initial=done_steps)
    run_start, total_tokens, nonfinite_streak = time.perf_counter(), 0.0, 0
    for step_index, plan in enumerate(steps, start=1):
        if step_index <= done_steps:
            continue
        start = time.perf_counter()
        lr = engine.lr  # the rate this step's update uses; the schedule advances inside the step
        mbs = micro_batches_for(plan, info.rank, train_pairs, cfg.loss.nll_on_prompt, pad_id, info.device)
        stats = run_micro_batches(engine, mbs, cfg, info.world_size)
        seconds = time.perf_counter() - start
        total_tokens += stats["tokens"]
        real_rows = sum(row is not None for rank_rows in plan.rows for row in rank_rows)
        record = {"step": step_index, "epoch": plan.epoch, **orpo_metrics(stats, cfg.loss.beta),
                  "grad_norm": engine.grad_norm(), "lr": lr, "pairs": int(stats["pairs"]),
                  "tokens": int(stats["tokens"]), "tokens_per_s": stats["tokens"] / seconds,
                  "packing_efficiency": stats["tokens"] / (real_rows * cfg.train.micro_batch_tokens),
                  "step_s": seconds}
        if peak:
            lengths, head_positions = step_shape(plan, train_pairs, cfg.loss.nll_on_prompt)
            record["mfu"] = step_flops(model_config, lengths, head_positions) / seconds / (peak * info.world_size)
        troubled = bool(stats["skipped"] or stats["nonfinite_losses"])
        nonfinite_streak = nonfinite_streak + 1 if troubled else 0
        if troubled:
            record.update(skipped=bool(stats["skipped"]), nonfinite_pair_ids=stats["nonfinite_pair_ids"])
            if stats["nonfinite_pair_ids"]:
                outcome = "update skipped" if stats["skipped"] else "its gradients were finite: update applied"
                print(f"[rank {info.rank}] step {step_index}: non-finite loss, {outcome}; pair ids "
                      f"{stats['nonfinite_pair_ids']}", file=sys.stderr, flush=True)
        if eval_pairs and cfg.train.eval_steps and step_index % cfg.train.eval_steps == 0 and step_index < len(steps):
            record.update(evaluate(engine, eval_pairs, cfg, info, pad_id))
        if step_index % cfg.train.log_steps == 0 or step_index == len(steps) or troubled:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        summary["last"] = record
        if nonfinite_streak >= cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(f"{nonfinite_streak} consecutive steps (up to step {step_index}) had a "
                                     f"non-finite loss; see the pair ids in metrics.jsonl. Check the data and "
                                     f"the learning rate, or raise train.max_nonfinite_steps")
        ckpt_lib.fault_point("kill_after_step", step_index)
        stop_code = preemption.requested()
        if stop_code is not None:
            saver.save(step_index, plan.epoch)
            why = "interrupted" if stop_code == EXIT_INTERRUPTED else "preempted"
            raise Preempted(f"{why}: checkpoint saved at step {step_index}; rerun the same command to resume",
                            exit_code=stop_code)
        if cfg.train.save_steps and step_index % cfg.train.save_steps == 0 and step_index < len(steps):
            saver.save(step_index, plan.epoch)
    bar.close()
    wall = time.perf_counter() - run_start
    if eval_pairs:
        summary["eval_after"] = (log.logged_eval(len(steps)) if finished else
                                 log.write({"step": len(steps), **evaluate(engine, eval_pairs, cfg, info, pad_id)}))
    if steps and not finished:
        saver.save(len(steps), steps[-1].epoch)
    summary["train_wall_s"] = wall
    summary["tokens_per_s"] = total_tokens / wall if wall > 0 else 0.0
    if cfg.train.export:
        summary["export_dir"] = str(export_trained(engine, policy, tokenizer, out_dir / "final", info))
    if info.is_main:
        summary["plot"] = str(plot_metrics(out_dir / "metrics.jsonl", out_dir / "curves.png"))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"\n{before_after_table(summary)}\ncurves: {summary['plot']}", flush=True)
    eng_lib.barrier()
    return summary
