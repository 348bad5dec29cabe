"""Resumes that used to change the training silently (issue 32 items 5, 6 and 10): a changed learning rate
or schedule was ignored, an extended run trained at lr 0, and changed optimizer, ZeRO stage, trainable
layers or model were tracebacks or went unseen. Each test failed on the code before the fix."""

from __future__ import annotations

import shutil

import pytest
import torch

from orpo_ds import checkpoint as ckpt
from orpo_ds.config import TrainConfig
from orpo_ds.engine import adopt_schedule, make_lr_schedule
from orpo_ds.model_files import model_fingerprint
from tests.helpers.models import save_tiny_llama
from tests.helpers.tokenizers import make_tiny_tokenizer


def _run(t: TrainConfig, total_steps: int, steps: int, state=None) -> tuple[list[float], dict]:
    """Rates of ``steps`` updates of an AdamW over one parameter with ``t``'s schedule, stepped as DeepSpeed
    does; ``state`` (optimizer, schedule) loaded first, as Engine.load does, then adopted."""
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    sched = make_lr_schedule(opt, t, total_steps)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        adopt_schedule(sched, t)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        opt.step()
        sched.step()
    return rates, {"optimizer": opt.state_dict(), "schedule": sched.state_dict(), "group": opt.param_groups[0]}


def _expected(t: TrainConfig, total_steps: int, first: int, last: int) -> list[float]:
    """The rate of updates ``first`` .. ``last`` (1-based) on ``t``'s schedule of ``total_steps``."""
    rates, _ = _run(t, total_steps, last)
    return rates[first - 1:]


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_a_changed_lr_applies_from_the_next_update(kind):
    old = TrainConfig(lr=1e-3, lr_schedule=kind, warmup_steps=2)
    new = TrainConfig(lr=1e-2, lr_schedule=kind, warmup_steps=2)
    _, state = _run(old, 10, 4)
    rates, _ = _run(new, 10, 6, state)
    assert rates == pytest.approx(_expected(new, 10, 5, 10), rel=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_extending_a_finished_run_continues_on_the_schedule_of_its_new_length(kind):
    """Every new step's rate is that of a run planned with the new length from the start; none is 0."""
    t = TrainConfig(lr=1e-3, lr_schedule=kind)
    finished, state = _run(t, 6, 6)
    assert finished[-1] > 0 and state["group"]["lr"] == 0.0  # what the old code's first new update used
    rates, _ = _run(t, 10, 4, state)
    assert rates == pytest.approx(_expected(t, 10, 7, 10), rel=1e-12)
    assert all(r > 0 for r in rates)


def test_weight_decay_and_betas_changes_apply_too():
    _, state = _run(TrainConfig(weight_decay=0.0, adam_betas=(0.9, 0.95)), 10, 2)
    _, after = _run(TrainConfig(weight_decay=0.1, adam_betas=(0.8, 0.9)), 10, 1, state)
    assert after["group"]["weight_decay"] == 0.1 and after["group"]["betas"] == (0.8, 0.9)


def test_config_changes_lists_every_changed_key_as_json():
    old = {"train": {"lr": 1e-3, "adam_betas": (0.9, 0.95)}, "loss": {"beta": 0.1}, "model": {"lora": None}}
    new = {"train": {"lr": 1e-2, "adam_betas": [0.9, 0.95]}, "loss": {"beta": 0.2}, "model": {"lora": None}}
    assert ckpt.config_changes(old, new) == {"loss.beta": [0.1, 0.2], "train.lr": [0.001, 0.01]}


def _config(optimizer, trainable_layers):
    return {"train": {"optimizer": optimizer}, "model": {"trainable_layers": trainable_layers}}


def _state(**fields):
    base = dict(step=3, epoch=0, world_size=1, grad_accum=1, micro_batch_tokens=256, seed=0, num_pairs=10,
                model="m", config=_config("adamw", None),
                data_fingerprint="d", max_length=64, truncation="prompt_left", tokenizer_sha256="t",
                zero_stage=3, model_fingerprint="f")
    base.update(fields)
    return ckpt.TrainerState(**base)


@pytest.mark.parametrize("change, words", [
    ({"config": _config("sgd", None)}, "train.optimizer 'adamw' -> 'sgd'"),
    ({"config": _config("adamw", 2)}, "model.trainable_layers None -> 2"),
    ({"zero_stage": 0}, "ZeRO stage 3 -> 0"),
    ({"model_fingerprint": "other"}, "its config or weights differ"),
])
def test_resume_refuses_a_changed_optimizer_stage_layers_or_model(change, words):
    with pytest.raises(ckpt.ResumeError, match=words.replace("(", r"\(")):
        ckpt.check_compatible(_state(), _state(**change), ckpt=None)


def test_the_model_is_compared_by_content_not_by_its_path(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = save_tiny_llama(tmp_path / "model", tokenizer, seed=0)
    before = model_fingerprint(str(model))
    assert model_fingerprint(f"{model}/") == before  # a trailing slash is the same model
    ckpt.check_compatible(_state(model=str(model), model_fingerprint=before),
                          _state(model=f"{model}/", model_fingerprint=model_fingerprint(f"{model}/")), ckpt=None)
    shutil.rmtree(model)
    save_tiny_llama(model, tokenizer, seed=0, hidden_size=64)  # another architecture at the same path
    assert model_fingerprint(str(model)) != before
    shutil.rmtree(model)
    save_tiny_llama(model, tokenizer, seed=1)  # same shapes, other weights
    assert model_fingerprint(str(model)) != before


# ------------------------------------------------------------------ damaged checkpoints: clear errors


def _checkpoint(root, step=2):
    from orpo_ds.safe_files import claim_output_dir

    claim_output_dir(root)
    tmp = ckpt.begin_save(root, step)
    (tmp / "ds" / "state").mkdir(parents=True)
    (tmp / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    return ckpt.commit_save(tmp, _state(step=step), keep=2)


@pytest.mark.parametrize("text, words", [
    ("", "JSONDecodeError"), ('{"step": 3, "epo', "JSONDecodeError"), ("[1, 2]", "not a JSON object"),
    ('{"step": 3, "extra": 1}', "unknown fields")])
def test_a_torn_empty_or_foreign_trainer_state_is_a_resume_error_naming_it(tmp_path, text, words):
    found = _checkpoint(tmp_path / "run")
    (found / ckpt.STATE_FILE).write_text(text)
    with pytest.raises(ckpt.ResumeError, match=f"{ckpt.STATE_FILE}.*{words}"):
        ckpt.read_state(found)


def test_a_missing_or_truncated_shard_is_a_resume_error_naming_it(tmp_path):
    found = _checkpoint(tmp_path / "run")
    ckpt.verify_files(found)
    shard = found / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    shard.write_bytes(b"x" * 10)
    with pytest.raises(ckpt.ResumeError, match="model_states.pt holds 10 bytes, not the 100 written"):
        ckpt.verify_files(found)
    shard.unlink()
    with pytest.raises(ckpt.ResumeError, match="model_states.pt is missing"):
        ckpt.verify_files(found)


def test_export_refuses_a_bad_shard_size_and_a_damaged_checkpoint_before_any_work(tmp_path):
    import os
    import subprocess
    import sys

    found = _checkpoint(tmp_path / "run")

    def export(*extra):
        return subprocess.run([sys.executable, "-m", "orpo_ds", "export", "--checkpoint", str(found), "--out",
                               str(tmp_path / "out"), *extra], capture_output=True, text=True,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})

    lots = export("--max-shard-size", "lots")
    assert lots.returncode == 2 and "--max-shard-size 'lots'" in lots.stderr and "Traceback" not in lots.stderr
    (found / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    missing = export()
    assert missing.returncode == 3 and "model_states.pt is missing" in missing.stderr, missing.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no export, no staging folder


# ----------------------------------------------------------------------------- 12. a full disk


class _FullDiskEngine:
    """Writes part of its state, then fails as torch.save does on a full disk."""

    def save(self, directory):
        directory.mkdir(parents=True)
        (directory / "partial.pt").write_bytes(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                           "No space left on device")


def test_a_full_disk_during_a_save_removes_the_partial_checkpoint_and_names_the_folder(tmp_path):
    from types import SimpleNamespace

    from orpo_ds.safe_files import DiskFullError

    run = tmp_path / "run"
    kept = _checkpoint(run, step=2)
    (ckpt.checkpoints_dir(run) / ckpt.LATEST).write_text(kept.name)
    saver = ckpt.CheckpointSaver(_FullDiskEngine(), policy=None, tokenizer=None,
                                 t=TrainConfig(output_dir=str(run)), info=SimpleNamespace(is_main=True, rank=0))
    with pytest.raises(DiskFullError, match=f"no space left on device in {ckpt.checkpoints_dir(run)}.*step 4.*"
                                            f"{kept.name} is intact"):
        saver.save(_state(step=4))
    root = ckpt.checkpoints_dir(run)
    assert sorted(p.name for p in root.iterdir()) == [ckpt.LATEST, kept.name]  # no .tmp-step-000004 left
    assert ckpt.latest_checkpoint(run) == kept


def test_a_full_disk_anywhere_else_exits_3_with_a_message_not_a_traceback(capsys):
    from orpo_ds.cli import EXIT_RUN_ERROR, _exit_code_for

    error = OSError(28, "No space left on device", "/scratch/run/metrics.jsonl")
    assert _exit_code_for(error) == EXIT_RUN_ERROR
    assert "no space left on device writing /scratch/run/metrics.jsonl" in capsys.readouterr().err
