"""The trainer end to end on real DeepSpeed (CPU accelerator, gloo): 2-rank ZeRO-3 runs against
single-process runs and against a naive padded reference written in the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo_ds.config import load_config
from orpo_ds.data import load_records, tokenize_pairs
from orpo_ds.metrics import read_metrics
from orpo_ds.packing import layout_for, schedule_run
from tests.distributed.conftest import REPO, base_overrides, launch, run_env
from tests.helpers.reference import reference_step_loss, reference_train
from tests.helpers.synthetic import write_pairs

METRIC_KEYS = ["step", "loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
               "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "lr", "pairs",
               "tokens", "tokens_per_s", "packing_efficiency"]
TRL_KEYS = ["loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]


def train_steps(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if "loss" in m]


# ------------------------------------------------------------------ a learnable task, 2 ranks, ZeRO-3


@pytest.fixture(scope="module")
def learnable_run(tiny_model, synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("learn") / "run"
    proc = launch(["train", *base_overrides(tiny_model, synthetic_data, out, **{
        "data.eval": synthetic_data["eval"], "train.epochs": 4, "train.lr": 3e-3, "train.warmup_steps": 2,
        "train.eval_steps": 10, "loss.beta": 0.5})], ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_two_rank_zero3_run_writes_every_metric(learnable_run):
    out, proc = learnable_run
    steps = train_steps(read_metrics(out / "metrics.jsonl"))
    assert len(steps) >= 20
    for m in steps:
        missing = [k for k in METRIC_KEYS if k not in m]
        assert not missing, f"step {m.get('step')} lacks {missing}"
        assert all(m[k] is not None for k in METRIC_KEYS), m
    assert [m["step"] for m in steps] == list(range(1, len(steps) + 1))
    assert all(0 < m["packing_efficiency"] <= 1 for m in steps)
    assert "kept 96/96 pairs" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    print(f"2-rank ZeRO-3 CPU tiny model: {summary['tokens_per_s']:.0f} tokens/s over {len(steps)} steps")
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None


def test_learnable_task_loss_falls_and_accuracy_rises(learnable_run):
    out, _ = learnable_run
    metrics = read_metrics(out / "metrics.jsonl")
    steps = train_steps(metrics)
    first, last = steps[:3], steps[-3:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.5
    evals = [m for m in metrics if "eval/rewards/accuracies" in m]
    assert evals[0]["eval/rewards/accuracies"] <= 0.75  # an untrained model is near chance
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9
    assert evals[-1]["eval/log_odds_chosen"] > evals[0]["eval/log_odds_chosen"] + 1.0


# --------------------------------------------------------------- parity with the naive padded reference


def _plan(pairs, cfg):
    """The trainer's step schedule for 2 ranks."""
    t = cfg.train
    return schedule_run(pairs, t.micro_batch_tokens, 2, t.grad_accum, seed=t.seed, epochs=t.epochs,
                        max_steps=t.max_steps, layout=layout_for(t.share_prompt))


def _reference_setup(tiny_model, data_file, out, extra):
    overrides = base_overrides(tiny_model, {"train": data_file}, out, **extra)
    cfg = load_config(None, overrides)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs, _ = tokenize_pairs(load_records(str(data_file)), tokenizer, max_length=cfg.data.max_length, progress=False)
    return overrides, cfg, tokenizer, pairs


def _step_pairs(plan, pairs):
    return [[pairs[i] for rank_rows in step.rows for row in rank_rows if row is not None for i in row] for step in plan]


def _freeze_all_but_last_layer_by_hand(model) -> None:
    """The naive form of ``model.trainable_layers=1`` on the 2-layer tiny Llama."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.layers.1.") or name == "model.norm.weight")


# ZeRO-0 too: there DeepSpeed clips with a norm it does not report, so the engine measures grad_norm itself.
# Freeze tuning under ZeRO-3: frozen partitioned weights must stay out of the gradient norm and the update.
# A shared prompt under ZeRO-3: the same numbers as the naive reference, which runs every prompt twice.
# ZeRO-3 with parameters and optimizer offloaded: DeepSpeedCPUAdam (JIT-built) takes the steps, and its
# updates match torch's AdamW in the reference.
# LoRA under ZeRO-3: the reference is peft's own model, its adapters drawn from the same seed; with
# model.lora.train_head the head's partitioned weight trains beside them and the adapter folder carries it.
@pytest.mark.parametrize("ds_config, trainable_layers, share_prompt, lora",
                         [(None, None, False, False), ("ds_configs/zero0.json", None, False, False),
                          (None, 1, False, False), (None, None, True, False), (None, None, False, True),
                          (None, None, False, "train_head"), ("ds_configs/zero3_offload.json", None, False, False)],
                         ids=["zero3", "zero0", "zero3-last-layer-only", "zero3-share-prompt", "zero3-lora",
                              "zero3-lora-train-head", "zero3-offload"])
def test_two_ranks_match_single_process_reference_over_five_steps(tiny_model, synthetic_data, tmp_path, ds_config,
                                                                   trainable_layers, share_prompt, lora):
    extra = {"train.max_steps": 5, "train.lr_schedule": "constant", "train.lr": 2e-3, "train.max_grad_norm": 1.0,
             "train.share_prompt": share_prompt}
    if ds_config:
        extra["deepspeed.config"] = REPO / ds_config
    if trainable_layers:
        extra["model.trainable_layers"] = trainable_layers
    if lora:
        extra.update({"model.lora.r": 4, "model.lora.alpha": 8, "train.lr": 2e-2,
                      "model.lora.train_head": lora == "train_head"})
    overrides, cfg, tokenizer, pairs = _reference_setup(tiny_model, synthetic_data["train"], tmp_path / "run", extra)
    proc = launch(["train", *overrides], ranks=2)
    assert proc.returncode == 0
    optimizer = "DeepSpeedCPUAdam" if ds_config == "ds_configs/zero3_offload.json" else "AdamW"
    assert f"optimizer {optimizer}," in proc.stdout
    got = train_steps(read_metrics(tmp_path / "run" / "metrics.jsonl"))

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    if trainable_layers:
        _freeze_all_but_last_layer_by_hand(model)
    if lora:
        model = lora_reference_model(model, cfg)
    steps = _step_pairs(_plan(pairs, cfg), pairs)
    ref = reference_train(model, steps, beta=cfg.loss.beta, nll_on_prompt=False, pad_id=tokenizer.pad_token_id,
                          lr=cfg.train.lr, max_grad_norm=1.0, total_steps=5, schedule_factor=lambda s: 1.0)
    assert len(got) == 5
    for g, r in zip(got, ref, strict=True):
        assert g["pairs"] == len(steps[g["step"] - 1])
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-4), (g["step"], g["loss"], r["loss"])
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3)
    assert got[-1]["loss"] != pytest.approx(got[0]["loss"], rel=1e-3)  # the curve moved: updates happened
    if trainable_layers:
        _assert_export_matches_reference_weights(tmp_path / "run", model, tmp_path / "exported")
    # A trained head adds 5 AdamW steps at lr 2e-2 on every head weight, where the two runs' different
    # reduction orders grow to ~2e-5 in the logits; with the head left out of the folder they were 2.7.
    atol = 1e-4 if lora == "train_head" else 1e-5
    if lora:
        _assert_adapter_export_matches_reference(tmp_path / "run" / "final", tiny_model, model, atol)
    if lora == "train_head":  # the export rebuilt from the checkpoint carries the trained head too
        proc = subprocess.run([sys.executable, "-m", "orpo_ds", "export", "--checkpoint", str(tmp_path / "run"),
                               "--out", str(tmp_path / "exported")], cwd=REPO, env=run_env(), capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert any("lm_head" in k for k in load_file(tmp_path / "exported" / "adapter_model.safetensors"))
        _assert_adapter_export_matches_reference(tmp_path / "exported", tiny_model, model, atol)


def lora_reference_model(model, cfg):
    """peft's LoRA model of ``model`` as the trainer builds it: adapters drawn right after seeding, and
    with ``model.lora.train_head`` the head's own weight unfrozen by hand."""
    from orpo_ds.lora import peft_config

    torch.manual_seed(cfg.train.seed)
    model = get_peft_model(model, peft_config(cfg.model.lora, str(cfg.model.name_or_path)))
    if cfg.model.lora.train_head:
        model.base_model.model.lm_head.weight.requires_grad_(True)
    return model


def _assert_adapter_export_matches_reference(adapter_dir, base_dir, reference_model, atol=1e-5):
    """The adapter folder a ZeRO-3 run exported (gathered from its partitions) is peft's format, and the
    base plus it scores a fixed batch as the trained reference does."""
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference_model(ids).logits, rtol=1e-4, atol=atol)


def _assert_export_matches_reference_weights(run_dir, reference_model, export_dir):
    """The live export and the one rebuilt from the ZeRO checkpoint (which stores frozen weights apart
    from the optimizer's) both equal the reference's weights: frozen ones untouched, trained ones moved."""
    proc = subprocess.run([sys.executable, "-m", "orpo_ds", "export", "--checkpoint", str(run_dir),
                           "--out", str(export_dir)], cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    original = AutoModelForCausalLM.from_pretrained(reference_model.name_or_path).state_dict()
    reference = reference_model.state_dict()
    for folder in (run_dir / "final", export_dir):
        exported = load_file(folder / "model.safetensors")
        for name, param in reference_model.named_parameters():
            torch.testing.assert_close(exported[name], reference[name], rtol=1e-4, atol=1e-5, msg=f"{folder}: {name}")
            assert torch.equal(exported[name], original[name]) is not param.requires_grad, name


def test_nll_on_prompt_step_metrics_equal_naive_reference(tiny_model, synthetic_data, tmp_path):
    extra = {"train.max_steps": 1, "loss.nll_on_prompt": "true", "loss.beta": 0.2}
    overrides, cfg, tokenizer, pairs = _reference_setup(tiny_model, synthetic_data["train"], tmp_path / "run", extra)
    proc = launch(["train", *overrides], ranks=2)
    assert proc.returncode == 0
    got = train_steps(read_metrics(tmp_path / "run" / "metrics.jsonl"))[0]
    step_pairs = _step_pairs(_plan(pairs, cfg), pairs)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        _, ref = reference_step_loss(model, step_pairs, beta=0.2, nll_on_prompt=True, pad_id=tokenizer.pad_token_id)
    for key in TRL_KEYS:
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


# --------------------------------------------------------------------------- gradient invariance


def _equal_length_pairs(path, n=6):
    """Pairs of identical token counts, so a budget of k pair-lengths packs exactly k pairs per row."""
    import random

    rng = random.Random(5)
    word = lambda k: "".join(rng.choice("abcdefghij") for _ in range(k))  # noqa: E731
    rows = [{"prompt": word(8), "chosen": word(5), "rejected": word(5)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("ranks, grad_accum, pairs_per_row", [(1, 3, 2), (2, 2, 2)])
def test_update_does_not_depend_on_ranks_or_micro_batches(tiny_model, tmp_path, ranks, grad_accum, pairs_per_row):
    data = _equal_length_pairs(tmp_path / "pairs.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs, _ = tokenize_pairs(load_records(str(data)), tokenizer, max_length=64, progress=False)
    pair_tokens = {2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs}
    assert len(pair_tokens) == 1
    (size,) = pair_tokens
    common = {"data.max_length": size // 2, "train.optimizer": "sgd", "train.lr": 0.5, "train.max_grad_norm": 0,
              "train.max_steps": 1, "train.lr_schedule": "constant"}

    def update(name, n_ranks, accum, budget):
        out = tmp_path / name
        proc = launch(["train", *base_overrides(tiny_model, {"train": data}, out, **common, **{
            "train.grad_accum": accum, "train.micro_batch_tokens": budget})], ranks=n_ranks)
        assert proc.returncode == 0
        step = train_steps(read_metrics(out / "metrics.jsonl"))
        assert len(step) == 1 and step[0]["pairs"] == 6  # all pairs in the one step
        before = load_file(tiny_model / "model.safetensors")
        after = load_file(out / "final" / "model.safetensors")
        return {k: after[k] - before[k] for k in before}

    whole = update("1x1", 1, 1, 6 * size)  # 1 rank x 1 micro-batch holding all pairs
    split = update(f"{ranks}x{grad_accum}", ranks, grad_accum, pairs_per_row * size)
    moved = sum(float(d.abs().sum()) for d in whole.values())
    assert moved > 0
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-5, atol=1e-7, msg=key)


# ------------------------------------------------------------------------------- malformed rows


def test_malformed_rows_are_reported_not_fatal_and_fatal_in_strict_mode(tiny_model, tmp_path):
    good = write_pairs(tmp_path / "good.jsonl", 8).read_text()
    bad = "\n".join([json.dumps({"prompt": "p", "chosen": "", "rejected": "x"}),
                     json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
                     json.dumps({"prompt": "p", "chosen": 3, "rejected": "x"}),
                     json.dumps({"prompt": "p", "rejected": "x"})])
    data = tmp_path / "mixed.jsonl"
    data.write_text(good + bad + "\n")
    out = tmp_path / "run"
    proc = launch(["train", *base_overrides(tiny_model, {"train": data}, out, **{"train.max_steps": 1})], ranks=1)
    assert proc.returncode == 0
    log = proc.stdout + proc.stderr
    assert "kept 8/12 pairs; dropped 4" in log and "Traceback" not in log
    strict = launch(["train", *base_overrides(tiny_model, {"train": data}, tmp_path / "strict",
                                              **{"data.strict": "true"})], ranks=1)
    assert strict.returncode == 2
    assert "row 8" in strict.stderr and "Traceback" not in strict.stderr


def test_eval_command_agrees_with_the_trainers_final_eval(learnable_run, synthetic_data, tmp_path):
    out, _ = learnable_run
    final_eval = [m for m in read_metrics(out / "metrics.jsonl") if "eval/loss" in m][-1]
    report = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "orpo_ds", "eval", "--model", str(out / "final"), "--data",
                           str(synthetic_data["eval"]), "--max-length", "64", "--beta", "0.5", "--json", str(report)],
                          capture_output=True, text=True, env=run_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preference accuracy" in proc.stdout
    got = json.loads(report.read_text())
    for key in TRL_KEYS:
        assert got[key] == pytest.approx(final_eval[f"eval/{key}"], rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------------ host resources


def _shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this host")
def test_a_cpu_run_leaves_no_shared_memory_buffers_behind(tiny_model, synthetic_data, tmp_path):
    """DeepSpeed's CPU collectives create a 69 MB /dev/shm buffer per rank and never unlink it; the
    engine does, so repeated runs do not eat the host's RAM."""
    before = _shm_buffers()
    proc = launch(["train", *base_overrides(tiny_model, synthetic_data, tmp_path / "run", **{"train.max_steps": 2})],
                  ranks=2)
    assert proc.returncode == 0
    assert "loss" in read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]  # it trained
    assert _shm_buffers() - before == set()


# ------------------------------------------------------------------ ZeRO-3's per-rank memory, from the engine


def test_zero3_on_two_ranks_holds_about_half_of_one_ranks_state(tiny_model, synthetic_data, tmp_path):
    """Parameters, gradients and AdamW state each rank holds, as the engine reports them (summary.json's
    ``rank0_state_bytes``): 2 ranks hold at most 0.55x what 1 rank does (the issue's bar; an even split is
    0.5x plus partition padding)."""
    held = {}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        proc = launch(["train", *base_overrides(tiny_model, synthetic_data, out, **{"train.max_steps": 1})],
                      ranks=ranks)
        assert proc.returncode == 0
        held[ranks] = json.loads((out / "summary.json").read_text())["rank0_state_bytes"]
    for kind in ("parameters", "gradients", "optimizer"):
        assert held[1][kind] > 0, (kind, held)
        assert held[2][kind] <= 0.55 * held[1][kind], (kind, held)
    # `orpo-ds plan`'s model-state figures (fp32 on the CPU: 4 + 4 + 12 B per parameter over the ranks)
    # against what the engine holds; the rest is partition padding and AdamW's step counters.
    from transformers import AutoConfig

    from orpo_ds.ds_config import ZeroSetup
    from orpo_ds.plan.memory import model_states
    from orpo_ds.plan.shapes import model_shape

    shape = model_shape(AutoConfig.from_pretrained(tiny_model))
    zero = ZeroSetup.from_ds_config(json.loads((Path(__file__).parent / "zero3_tiny.json").read_text()))
    for ranks in (1, 2):
        planned = model_states(shape, zero, ranks, dtype_bytes=4)
        for kind in ("parameters", "gradients", "optimizer"):
            assert held[ranks][kind] == pytest.approx(getattr(planned, kind), rel=0.02), (ranks, kind, held, planned)


def test_log_steps_reads_and_logs_every_nth_step_and_the_last(tiny_model, synthetic_data, tmp_path):
    # Between logged steps the host does not read the device (issue #34): the records still come, every
    # third step and the last, with throughput over the steps since the previous record.
    out = tmp_path / "run"
    proc = launch(["train", *base_overrides(tiny_model, synthetic_data, out, **{
        "train.max_steps": 7, "train.log_steps": 3, "train.eval_before": "false", "train.export": "false"})],
        ranks=1)
    assert proc.returncode == 0
    records = train_steps(read_metrics(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [3, 6, 7]
    for r in records:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["pairs"] > 0 and r["loss"] == r["loss"]
