"""The ORPO training run, top to bottom: start-up -> steps -> final eval, checkpoint and export.

:func:`start_run` builds what the loop needs, in an order that refuses bad input before expensive work;
:func:`run_training` is the loop, which delegates each concern to its owner: one optimizer step to
:mod:`orpo_ds.step`, held-out evaluation to :class:`orpo_ds.evaluate.Evaluator`, checkpoints and
preemption to :class:`orpo_ds.checkpoint.CheckpointSaver`, the step's record to
:class:`orpo_ds.step.StepMetrics`, non-finite losses to :class:`orpo_ds.step.NonFiniteGuard`.
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orpo_ds import checkpoint as ckpt_lib
from orpo_ds import distributed as dist_lib
from orpo_ds import ds_config as ds_lib
from orpo_ds import engine as eng_lib
from orpo_ds import tracking
from orpo_ds.attention import SEGMENTED_SDPA, resolve_attn_implementation
from orpo_ds.batch import MicroBatch, Shard, micro_batches
from orpo_ds.compare import compare_snapshots, comparison_report, seen_sample
from orpo_ds.config import Config, ConfigError
from orpo_ds.data import FIELDS, DataError, TokenizedPairs, as_tokenized_pairs, duplicate_pairs, tokenize_data_section
from orpo_ds.evaluate import Evaluator
from orpo_ds.export import export_trained
from orpo_ds.flops import peak_flops
from orpo_ds.metrics import MetricsLog, progress_bar
from orpo_ds.model import PolicyWithChunkedHead, build_policy
from orpo_ds.model_files import (
    check_max_length,
    load_tokenizer,
    model_fingerprint,
    pad_token_id,
    read_model_config,
)
from orpo_ds.packing import ScheduledStep, layout_for, schedule_run
from orpo_ds.preemption import PreemptionSignal
from orpo_ds.report import before_after_table, plot_metrics, run_line
from orpo_ds.safe_files import FolderLock, UnsafeOutputError, atomic_write, check_export_target, claim_output_dir
from orpo_ds.samples import PRINTED_CHARS, greedy_answers, sample_pairs, samples_markdown
from orpo_ds.step import NonFiniteGuard, StepMetrics, train_step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lock_output_dir(out_dir: Path, info) -> FolderLock:
    """Rank 0 claims ``out_dir`` for the run (:func:`claim_output_dir`: new, empty or an earlier run's)
    and holds ``<output_dir>/.lock``: a folder of other files, or a second run into the same folder,
    exits 2 before any work."""
    lock, error = FolderLock(out_dir), None
    if info.is_main:
        try:
            claim_output_dir(out_dir)
            lock.acquire()
        except UnsafeOutputError as exc:
            error = exc
    dist_lib.raise_if_any_rank_failed(error, UnsafeOutputError(f"{out_dir} is in use by another run (see rank 0)"))
    return lock


def data_turn(info) -> int:
    """When a rank loads the data (:func:`load_pairs`): 0 for the job's first rank, 1 for the first rank of
    every other node, 2 for the rest."""
    return 0 if info.is_main else 1 if info.local_rank == 0 else 2


def load_pairs(source: str, tokenizer, cfg: Config, info) -> TokenizedPairs:
    """Tokenize once per job, or at worst once per node: rank 0 tokenizes first (parallel, cached), then
    the first rank of each other node reads the cache (a hit on a shared filesystem; on a node-local cache
    folder, that node's one tokenization), then every other rank reads its node's cache. The pairs are
    memory-mapped from the cache folder, so a node's ranks share one copy.

    A failure in one turn is shared with the other ranks before they wait on it, so a bad file ends the
    whole job with rank 0's message instead of leaving the others blocked in a barrier.
    """
    d = cfg.data
    pairs, error = None, None
    for turn in range(3):
        if turn == data_turn(info):
            try:
                pairs, report = tokenize_data_section(source, tokenizer, d, progress=info.is_main)
                if info.is_main:
                    print(f"[data] {source}: {report.summary()}", flush=True)
            except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
                error = exc
        dist_lib.raise_if_any_rank_failed(error, DataError(f"data: {source} failed to load on another rank (see "
                                                           f"rank 0's error)"))
    if not pairs:
        raise DataError(f"data: no usable pairs in {source}")
    return pairs


def check_token_ids(pairs: TokenizedPairs | list, source: str, tokenizer, vocab_size: int | None) -> None:
    """Refuse a token id the model's embedding lacks, naming the pair, before training: on a GPU such an
    id is a device-side assert deep in the first forward pass, and the head checks its labels on the device
    only (:func:`orpo_ds.logps.chunked_token_logps`). A tokenizer no larger than the embedding cannot make
    one, so the data is read only when the tokenizer is larger (added tokens without a resized model), one
    pass over each column of ids. ``vocab_size`` None: the config does not say it at its top level (a
    multimodal one); nothing checked."""
    if vocab_size is None or len(tokenizer) <= vocab_size:
        return
    pairs = as_tokenized_pairs(pairs)
    offending = np.zeros(len(pairs), dtype=bool)  # [N]: pairs with an id beyond the embedding, any field
    for name in FIELDS:
        column = pairs.columns[name]
        beyond = np.flatnonzero(column.used_values() >= vocab_size)  # positions within the column's values
        offending[np.searchsorted(column.offsets, column.offsets[0] + beyond, side="right") - 1] = True
    if offending.any():
        first = int(np.argmax(offending))
        top = max(int(pairs.columns[name].ids(first).max(initial=0)) for name in FIELDS)
        others = int(offending.sum()) - 1
        raise DataError(f"data: {source}: pair {int(pairs.pair_id[first])}"
                        f"{f' (and {others} other pair(s))' if others else ''} holds token id {top}, beyond the "
                        f"model's embedding of {vocab_size} tokens (the tokenizer has {len(tokenizer)}). Resize "
                        f"the model's embeddings to the tokenizer and save it, or train with the model's own "
                        f"tokenizer")


def warn_about_the_run(cfg: Config, steps: list[ScheduledStep], train_pairs: TokenizedPairs) -> None:
    """Settings that run but are likely mistakes, printed once at start-up (rank 0)."""
    warnings = []
    if cfg.train.warmup_steps > len(steps):
        warnings.append(f"train.warmup_steps={cfg.train.warmup_steps} exceeds the run's {len(steps)} steps: the "
                        f"learning rate never reaches train.lr={cfg.train.lr}")
    if cfg.data.eval and Path(cfg.data.eval).expanduser().resolve() == Path(cfg.data.train).expanduser().resolve():
        warnings.append(f"data.eval is data.train ({cfg.data.train}): the held-out figures are of pairs the run "
                        f"trains on")
    repeats = duplicate_pairs(train_pairs)
    if repeats:
        shown = ", ".join(map(str, repeats[:5])) + (", ..." if len(repeats) > 5 else "")
        warnings.append(f"{len(repeats)} training pair(s) repeat an earlier pair exactly (rows {shown}); each "
                        f"repeat is trained on again")
    for line in warnings:
        print(f"[warning] {line}", flush=True)


def open_trackers(cfg: Config, info, resume_step: int) -> tracking.Trackers:
    """Collective: rank 0 opens ``train.report_to``'s trackers; a failure there ends every rank."""
    trackers, error = None, None
    try:
        trackers = tracking.Trackers(cfg, resume_step=resume_step, enabled=info.is_main)
    except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
        error = exc
    dist_lib.raise_if_any_rank_failed(error, ConfigError("train.report_to: a tracker failed to start on rank 0 (see "
                                                         "its error)"))
    return trackers


@dataclass
class Run:
    """What the loop works with, built by :func:`start_run`."""

    cfg: Config
    info: dist_lib.DistInfo
    steps: list[ScheduledStep]
    train_pairs: TokenizedPairs
    pad_token_id: int
    tokenizer: Any
    policy: PolicyWithChunkedHead
    engine: eng_lib.Engine
    saver: ckpt_lib.CheckpointSaver
    evaluator: Evaluator
    recorder: StepMetrics
    log: MetricsLog
    start: ckpt_lib.TrainerState  # step 0, or the state of the checkpoint resumed from
    lock: FolderLock
    keepalive: Any  # ZeRO-3's HfDeepSpeedConfig (orpo_ds.engine.load_pretrained): held for the run
    sp: dist_lib.SequenceParallel  # this rank's data-parallel replica and shard of each row

    def micro_batches(self, plan: ScheduledStep) -> list[MicroBatch]:
        """This rank's micro-batches of ``plan``: its replica's rows, and under sequence parallelism its
        shard of each."""
        shard = Shard(self.sp.index, self.sp.size, self.pad_token_id) if self.sp.size > 1 else None
        return micro_batches(plan.rows[self.sp.replica], self.train_pairs, nll_on_prompt=self.cfg.loss.nll_on_prompt,
                             pad_token_id=self.pad_token_id, device=self.info.device,
                             layout=layout_for(self.cfg.train.share_prompt), shard=shard)

    def sum_sequences(self):
        """What sums a row's sequence log-probs over its ranks (None without sequence parallelism)."""
        return self.sp.sum_sequences if self.sp.size > 1 else None


def start_run(cfg: Config) -> Run:
    """Join the process group and build the run: the folder lock and the export target are checked
    first, then the config, tokenizer and data, then the output folder's resume state, and only then
    are the model and engine built and a checkpoint loaded."""
    t, info = cfg.train, dist_lib.init_distributed(cfg.train.collective_timeout_s)
    seed_everything(t.seed)
    out_dir = Path(t.output_dir)
    lock = lock_output_dir(out_dir, info)
    if t.export:  # refuse now rather than after hours of training
        check_export_target(out_dir / "final", protected=[])
    dtype = eng_lib.resolve_dtype(t, info)
    ds_config = ds_lib.build_ds_config(ds_lib.read_ds_config(cfg.deepspeed.config), t, info.world_size, dtype)
    ds_lib.validate_ds_config(ds_config)
    tracking.check_installed(cfg)
    declared_config = read_model_config(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    check_max_length(cfg.data.max_length, declared_config, "data.max_length")
    resolve_attn_implementation(cfg.model.attn_implementation, share_prompt=t.share_prompt, dtype=dtype)  # early
    dist_lib.check_sequence_parallel(t.sequence_parallel_size, info.world_size, declared_config)
    if t.sequence_parallel_size > 1 and cfg.model.attn_implementation not in ("auto", SEGMENTED_SDPA):
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation}: sequence parallelism "
                          f"(train.sequence_parallel_size={t.sequence_parallel_size}) runs {SEGMENTED_SDPA} "
                          f"inside DeepSpeed's Ulysses; use auto or {SEGMENTED_SDPA}")
    replicas = info.world_size // t.sequence_parallel_size  # data-parallel: each trains its own rows
    tokenizer = load_tokenizer(cfg)
    pad_id = pad_token_id(tokenizer)
    train_pairs = load_pairs(cfg.data.train, tokenizer, cfg, info)
    eval_pairs = load_pairs(cfg.data.eval, tokenizer, cfg, info) if cfg.data.eval else []
    for source, pairs in ((cfg.data.train, train_pairs), (cfg.data.eval, eval_pairs)):
        check_token_ids(pairs, source, tokenizer, getattr(declared_config, "vocab_size", None))
    layout = layout_for(t.share_prompt)
    steps = schedule_run(train_pairs, t.micro_batch_tokens, replicas, t.grad_accum, seed=t.seed, epochs=t.epochs,
                         max_steps=t.max_steps, layout=layout)
    if info.is_main:
        warn_about_the_run(cfg, steps, train_pairs)
    identity = ckpt_lib.run_identity(cfg, info.world_size, train_pairs, tokenizer,
                                     zero_stage=ds_lib.zero_stage(ds_config),
                                     model_fingerprint=model_fingerprint(cfg.model.name_or_path))
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=info.is_main)
    start = ckpt_lib.resolve_run_start(cfg, info, identity, log, ds_lib.zero_stage(ds_config), steps, train_pairs)
    log.trackers = open_trackers(cfg, info, start.done_steps)
    steps, ds_config = start.steps, start.engine_config(ds_config)
    # A shared prompt and sequence parallelism both need the segmented backend.
    policy, keepalive = build_policy(cfg.model, ds_config, dtype, chunk_size=cfg.loss.chunk_size,
                                     share_prompt=t.share_prompt or t.sequence_parallel_size > 1,
                                     router_aux_loss_coef=cfg.loss.router_aux_loss_coef)
    if policy.router is not None:  # also a family whose config names its experts otherwise (DBRX's ffn_config)
        dist_lib.refuse_experts(t.sequence_parallel_size, policy.router.num_experts, policy.router.top_k)
    sp = dist_lib.enable_sequence_parallel(t.sequence_parallel_size, policy.causal_lm)
    model_config = policy.causal_lm.config
    # MFU against the bf16 table only in bf16: an fp32 run on a GPU needs train.peak_tflops to get one.
    device_name = torch.cuda.get_device_name(info.device) if info.on_gpu and dtype == torch.bfloat16 else None
    peak = peak_flops(device_name, t.peak_tflops)
    if info.is_main:
        print(f"[model] attention: {model_config._attn_implementation} (model.attn_implementation="
              f"{cfg.model.attn_implementation}); {dtype}; mfu: "
              f"{f'peak {peak / 1e12:.0f} TFLOP/s per device' if peak else 'off (no known peak)'}; liger: "
              f"{policy.liger}", flush=True)
        if policy.router is not None:
            print(f"[model] {policy.router.describe()}", flush=True)
        if sp.size > 1:
            print(f"[parallel] {info.world_size} ranks = data-parallel {sp.replicas} x sequence-parallel {sp.size} "
                  f"(DeepSpeed Ulysses over {SEGMENTED_SDPA}: each rank holds 1/{sp.size} of every row)", flush=True)
    engine = eng_lib.Engine(policy, t, ds_config, total_steps=len(steps))
    if info.is_main:
        print(f"[engine] {engine.describe()}", flush=True)
    saver = ckpt_lib.CheckpointSaver(engine, policy, tokenizer, t, info)
    evaluator = Evaluator(engine, eval_pairs, every=t.eval_steps, total_steps=len(steps),
                          micro_batch_tokens=t.micro_batch_tokens, beta=cfg.loss.beta,
                          nll_on_prompt=cfg.loss.nll_on_prompt, pad_token_id=pad_id, rank=info.rank,
                          world_size=info.world_size, device=info.device, layout=layout,
                          seen=seen_sample(train_pairs, t.compare_train_pairs) if t.eval_before else [],
                          samples=sample_pairs(eval_pairs, t.sample_prompts) if t.eval_before else [],
                          answer=functools.partial(greedy_answers, policy.causal_lm, tokenizer,
                                                   new_tokens=t.sample_new_tokens, synced=info.world_size > 1,
                                                   device=info.device))
    recorder = StepMetrics(beta=cfg.loss.beta, micro_batch_tokens=t.micro_batch_tokens, pairs=train_pairs,
                            nll_on_prompt=cfg.loss.nll_on_prompt, model_config=model_config, peak_flops=peak,
                            world_size=info.world_size)
    state = saver.resume(start.checkpoint, log, identity, start.universal) if start.checkpoint else identity
    return Run(cfg=cfg, info=info, steps=steps, train_pairs=train_pairs, pad_token_id=pad_id, tokenizer=tokenizer,
               policy=policy, engine=engine, saver=saver, evaluator=evaluator, recorder=recorder, log=log,
               start=state, lock=lock, keepalive=keepalive, sp=sp)


def run_training(cfg: Config) -> dict[str, Any]:
    """Train, evaluate, checkpoint and export as ``cfg`` says; returns the run's summary (also written
    to ``<output_dir>/summary.json``). Rerunning the same command resumes the run."""
    try:
        return _train(cfg)
    finally:
        # Also when start-up or a step raises (a strict data error, say): gloo's threads still alive at
        # interpreter exit can abort the process with SIGABRT instead of its documented exit code.
        dist_lib.shutdown()


def _train(cfg: Config) -> dict[str, Any]:
    preemption = PreemptionSignal()  # first: a signal during start-up must not kill the rank
    run = start_run(cfg)
    t, state, last_step = cfg.train, run.start, len(run.steps)
    if run.evaluator.compares and t.eval_before and state.step == 0:
        record, snapshot = run.evaluator.snapshot(0)
        state = replace(state, compare_before=snapshot,
                        eval_before=run.log.write(record) if run.evaluator.enabled else None)
    guard = NonFiniteGuard(t.max_nonfinite_steps, run.info.rank)
    bar = progress_bar(last_step, enabled=run.info.is_main, initial=state.step)
    summary: dict[str, Any] = {"resumed_from_step": state.step}
    run.engine.train()
    run_start, total_tokens = time.perf_counter(), 0.0
    # The steps since the last read of the device's figures, and the host time they took (train_step's and
    # the read's, so evaluation and checkpoints stay out): tokens/s and MFU are measured over them.
    interval, interval_s = [], 0.0
    for step, plan in enumerate(run.steps, start=1):
        if step <= state.step:
            continue
        lr, start = run.engine.lr, time.perf_counter()  # the rate this step's update uses
        outcome = train_step(run.engine, run.micro_batches(plan), beta=cfg.loss.beta, router=run.policy.router,
                             sum_sequences=run.sum_sequences())
        interval.append((plan, outcome.tokens))
        total_tokens += outcome.tokens
        logged = step % t.log_steps == 0 or step == last_step or not outcome.applied
        if logged or run.evaluator.due(step):  # else no host read: the device runs on ahead
            stats = outcome.read()
            interval_s += time.perf_counter() - start
            record = run.recorder(step, plan, stats, lr=lr, grad_norm=run.engine.grad_norm(), interval=interval,
                                  seconds=interval_s)
            interval, interval_s = [], 0.0
            record.update(guard.observe(step, stats))
            if run.evaluator.due(step):
                record.update(run.evaluator())
            if logged or stats.troubled:
                run.log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            summary["last"] = record
        else:
            interval_s += time.perf_counter() - start
            guard.clean(step)
        bar.update(1)
        guard.raise_if_exhausted()
        state = replace(state, step=step, epoch=plan.epoch)
        run.saver.maybe_save(state, last_step=last_step, preemption=preemption)
    bar.close()
    wall = time.perf_counter() - run_start
    summary.update(train_wall_s=wall, tokens_per_s=total_tokens / wall if wall > 0 else 0.0)
    return finish_run(run, state, summary)


def finish_run(run: Run, state: ckpt_lib.TrainerState, summary: dict[str, Any]) -> dict[str, Any]:
    """After the last step: the held-out eval, the final checkpoint, the export, the report; then DeepSpeed
    is released (:func:`run_training` takes the process group down after it)."""
    last = len(run.steps)
    if run.evaluator.compares and (state.compare_after or {}).get("step") != last:  # none yet, or a shorter run's
        record, snapshot = run.evaluator.snapshot(last)
        state = replace(state, compare_after=snapshot)
        if run.evaluator.enabled and (state.eval_after or {}).get("step") != last:  # logged by an older version?
            state = replace(state, eval_after=run.log.write(record))
    if run.steps and state != run.start:  # a requeued finished run: its checkpoint already holds this state
        run.saver.save(state)
    summary.update({k: v for k, v in (("eval_before", state.eval_before), ("eval_after", state.eval_after)) if v})
    comparison = comparison_report(state.compare_before or {}, state.compare_after or {})
    summary["comparison"] = {name: {figure: {**asdict(c), "change": c.change} for figure, c in changes.items()}
                             for name, changes in compare_snapshots(state.compare_before or {},
                                                                    state.compare_after or {}).items()}
    summary["rank0_state_bytes"] = run.engine.state_bytes()  # what ZeRO's partitioning leaves each rank
    out_dir = Path(run.cfg.train.output_dir)
    if run.cfg.train.export:
        summary["export_dir"] = str(export_trained(run.engine, run.policy, run.tokenizer, out_dir / "final", run.info))
    if run.info.is_main:
        summary["plot"] = str(plot_metrics(out_dir / "metrics.jsonl", out_dir / "curves.png"))
        answers = [(state.compare_before or {}).get("answers"), (state.compare_after or {}).get("answers")]
        samples = dict(pairs=run.evaluator.samples, before=answers[0], after=answers[1], tokenizer=run.tokenizer,
                       new_tokens=run.cfg.train.sample_new_tokens)
        if all(answers):
            summary["samples"] = str(atomic_write(out_dir / "samples.md", samples_markdown(**samples)))
        atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        held = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in summary["rank0_state_bytes"].items())
        answers = f"\n{samples_markdown(**samples, limit=PRINTED_CHARS)}" if all(answers) else ""
        print(f"\n{comparison or before_after_table(summary)}\n{answers}\n{run_line(summary)}\n"
              f"curves: {summary['plot']}\n[engine] rank 0 holds {held}", flush=True)
    dist_lib.barrier()
    run.engine.close()
    run.log.trackers.close()
    run.lock.release()
    return summary
