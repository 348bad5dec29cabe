"""Nothing lost: exact resume after SIGKILL, a kill while a checkpoint is written, SIGUSR1 preemption,
export from a checkpoint, and the non-finite step guard. 2 ranks, ZeRO-3, CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from orpo_ds.cli import EXIT_PREEMPTED
from orpo_ds.metrics import read_metrics
from tests.distributed.conftest import REPO, base_overrides, launch, launch_command, run_env, wait_for_logged_steps
from tests.helpers.synthetic import write_pairs
from tests.helpers.tokenizers import byte_ids

COMPARED = ["loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "lr", "pairs",
            "tokens"]


def _train_records(out):
    return {m["step"]: m for m in read_metrics(out / "metrics.jsonl") if "loss" in m}


def _overrides(model, data, out, **extra):
    return ["train", *base_overrides(model, data, out, **{"train.max_steps": 10, "train.save_steps": 5, **extra})]


@pytest.fixture(scope="module")
def reference_run(tiny_model, synthetic_data, tmp_path_factory):
    """An uninterrupted 10-step run."""
    out = tmp_path_factory.mktemp("ckpt") / "straight"
    assert launch(_overrides(tiny_model, synthetic_data, out), ranks=2).returncode == 0
    return out


def test_sigkill_after_checkpoint_then_resume_is_bit_exact(tiny_model, synthetic_data, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = _overrides(tiny_model, synthetic_data, out)
    killed = launch(args, ranks=2, env={"ORPO_DS_FAULT": "kill_after_step:7"})  # SIGKILL, steps 6-7 lost
    assert killed.returncode != 0
    assert (out / "checkpoints" / "latest").read_text() == "step-000005"
    resumed = launch(args, ranks=2)
    assert resumed.returncode == 0
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout
    got, want = _train_records(out), _train_records(reference_run)
    assert sorted(got) == list(range(1, 11))
    for step in range(6, 11):
        for key in COMPARED:
            assert got[step][key] == want[step][key], (step, key)  # fp32 on the CPU: bit-identical
    a, b = load_file(out / "final" / "model.safetensors"), load_file(reference_run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_model, synthetic_data, reference_run, tmp_path):
    out = tmp_path / "torn"
    args = _overrides(tiny_model, synthetic_data, out, **{"train.save_steps": 3})
    torn = launch(args, ranks=2, env={"ORPO_DS_FAULT": "kill_before_commit:6"})
    assert torn.returncode != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-000003"
    assert (ckpts / ".tmp-step-000006").is_dir() and not (ckpts / "step-000006").exists()
    resumed = launch(args, ranks=2)
    assert resumed.returncode == 0 and "at step 3" in resumed.stdout
    assert not (ckpts / ".tmp-step-000006").exists()
    a, b = load_file(out / "final" / "model.safetensors"), load_file(reference_run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # keep_checkpoints=2: only the newest two complete checkpoints remain
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000009", "step-000010"]


def test_requeue_of_a_finished_run_reports_without_training_or_logging_again(tiny_model, synthetic_data, tmp_path):
    out = tmp_path / "done"
    args = _overrides(tiny_model, synthetic_data, out, **{"train.max_steps": 3, "data.eval": synthetic_data["eval"]})
    assert launch(args, ranks=2).returncode == 0
    logged = (out / "metrics.jsonl").read_text()
    (out / "final").rename(out / "final-first")
    again = launch(args, ranks=2)
    assert again.returncode == 0 and "at step 3" in again.stdout
    assert (out / "metrics.jsonl").read_text() == logged  # no step re-run, no eval logged twice
    summary = json.loads((out / "summary.json").read_text())
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert summary["eval_before"] == evals[0] and summary["eval_after"] == evals[1]
    assert "preference accuracy" in again.stdout  # the before/after table is printed from the logged figures
    a, b = load_file(out / "final" / "model.safetensors"), load_file(out / "final-first" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # re-exported from the checkpoint


def test_sigusr1_checkpoints_exits_75_and_restart_continues(tiny_model, synthetic_data, tmp_path):
    out = tmp_path / "preempted"
    args = _overrides(tiny_model, synthetic_data, out,
                      **{"train.max_steps": 0, "train.epochs": 20, "train.save_steps": 0})
    proc = subprocess.Popen(launch_command(args, 2), cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_logged_steps(out, 3)
        # The training ranks, not the launcher processes above them (they get --local_rank=N).
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if any(a.startswith("--local_rank=") for a in p.cmdline())]
        assert len(workers) == 2
        for w in workers:
            w.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    stopped_at = max(_train_records(out))
    total = 20 * 15  # 96 pairs pack into 30 rows: 15 steps an epoch on 2 ranks
    assert stopped_at < total
    assert (out / "checkpoints" / "latest").read_text() == f"step-{stopped_at:06d}"
    resumed = launch(args, ranks=2)
    assert resumed.returncode == 0
    assert f"at step {stopped_at}" in resumed.stdout
    assert sorted(_train_records(out)) == list(range(1, total + 1))  # continuous: no gap, no duplicate


def test_export_from_checkpoint_matches_the_trained_model(reference_run, tmp_path):
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "orpo_ds", "export",
                           "--checkpoint", str(reference_run), "--out", str(out)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = AutoModelForCausalLM.from_pretrained(reference_run / "final").eval()  # gathered from the live engine
    ids = torch.tensor([byte_ids("a fixed batch of text!")])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


@pytest.mark.parametrize("ds_config", ["zero3", "zero0"])
def test_non_finite_batch_is_skipped_logged_and_training_goes_on(tiny_model, synthetic_data, tmp_path, ds_config):
    """DeepSpeed's ZeRO-3 skips a non-finite gradient itself; fp32 ZeRO-0 is a plain torch optimizer, which
    the engine's guard keeps the gradients from."""
    # A model whose embedding of "~" is NaN: any sequence containing "~" gives a NaN loss.
    poisoned = tmp_path / "poisoned-model"
    poisoned.mkdir()
    for f in tiny_model.iterdir():
        (poisoned / f.name).write_bytes(f.read_bytes())
    weights = load_file(tiny_model / "model.safetensors")
    weights["model.embed_tokens.weight"][byte_ids("~")[0]] = float("nan")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    data = write_pairs(tmp_path / "pairs.jsonl", 40, seed=3)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[17]["chosen"] += "~"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "run"
    extra = {"train.max_steps": 0}
    if ds_config != "zero3":
        extra["deepspeed.config"] = REPO / "ds_configs" / "zero0.json"
    proc = launch(["train", *base_overrides(poisoned, {"train": data}, out, **extra)], ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _train_records(out)
    skipped = [m for m in records.values() if m.get("skipped")]
    assert len(skipped) == 1
    assert 17 in skipped[0]["nonfinite_pair_ids"] or "pair ids [17" in proc.stderr
    assert "non-finite loss, update skipped" in proc.stderr
    assert max(records) > skipped[0]["step"]  # training went on
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.isfinite(v).all() for k, v in final.items() if k != "model.embed_tokens.weight")
