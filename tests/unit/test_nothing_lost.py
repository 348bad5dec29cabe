"""Nothing lost (issue 12): export targets, atomic replacement, pruning, re-saves, the output_dir lock,
RNG files that cannot run code, torn metrics lines, resume identity, and the config errors that used to
be tracebacks. Each test here failed on the code before the fix."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orpo_ds import checkpoint as ckpt
from orpo_ds.checkpoint import RUN_CONFIG
from orpo_ds.config import ConfigError, load_config
from orpo_ds.data import TokenizedPair
from orpo_ds.ds_config import build_ds_config, read_ds_config
from orpo_ds.metrics import MetricsLog, read_metrics
from orpo_ds.safe_files import (
    EXPORT_MARKER,
    FolderLock,
    UnsafeOutputError,
    aside_paths,
    check_export_target,
    replace_dir,
    staging_dir,
)

BASE = ["model.name_or_path=some/model", "data.train=pairs.jsonl"]
REPO = Path(__file__).resolve().parents[2]


def _step(root, step, *, payload="x"):
    d = ckpt.checkpoints_dir(root) / ckpt.step_dir_name(step)
    d.mkdir(parents=True)
    (d / ckpt.STATE_FILE).write_text("{}")
    (d / "payload").write_text(payload)
    return d


def _state(step=0, **fields):
    base = dict(step=step, epoch=0, world_size=2, grad_accum=1, micro_batch_tokens=256, seed=0, num_pairs=10,
                model="m", config={}, data_fingerprint="aaa", max_length=64, truncation="prompt_left",
                tokenizer_sha256="tok", zero_stage=3, model_fingerprint="fp")
    base.update(fields)
    return ckpt.TrainerState(**base)


# --------------------------------------------------------------------------------------------- export


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("precious")
    with pytest.raises(UnsafeOutputError, match="not an orpo-ds export"):
        check_export_target(notes, protected=[])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafeOutputError, match="is a file"):
        check_export_target(tmp_path / "file", protected=[])
    assert (notes / "todo.txt").read_text() == "precious"


def test_export_refuses_the_run_folder_and_its_ancestors_even_when_marked(tmp_path):
    run = tmp_path / "runs" / "x"
    step = _step(run, 3)
    (run / EXPORT_MARKER).write_text("")  # a marker does not make the run folder disposable
    for out in (run, run.parent, tmp_path, step):
        with pytest.raises(UnsafeOutputError, match="is or contains"):
            check_export_target(out, protected=[run, step])
    assert check_export_target(run / "export", protected=[run, step]) == (run / "export").resolve()


def test_export_accepts_new_empty_or_earlier_exports(tmp_path):
    (tmp_path / "empty").mkdir()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / EXPORT_MARKER).write_text("")
    for out in (tmp_path / "new", tmp_path / "empty", earlier):
        check_export_target(out, protected=[])


def test_export_cli_with_out_dot_exits_2_and_deletes_nothing(tmp_path):
    run = tmp_path / "run"
    _step(run, 1)
    (run / "metrics.jsonl").write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "orpo_ds", "export", "--checkpoint", str(run), "--out", "."],
                          cwd=run, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "is or contains" in proc.stderr
    assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "step-000001" / "payload").is_file()


def test_replace_dir_swaps_atomically_and_keeps_the_old_one_until_the_new_is_in(tmp_path, monkeypatch):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old").write_text("old")
    new = staging_dir(target)
    (new / "new").write_text("new")
    renames = []
    real_rename = os.rename

    def spy(src, dst):
        renames.append((os.path.basename(src), os.path.basename(dst)))
        # while the new folder moves in, the old one is whole under its aside name
        if os.path.basename(src) == new.name:
            (aside,) = aside_paths(target)
            assert (aside / "old").read_text() == "old"
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    replace_dir(new, target)
    assert [(src == "final", dst.startswith(".old-final.orpo-ds-")) for src, dst in renames[:1]] == [(True, True)]
    assert renames[1] == (new.name, "final")
    assert (target / "new").is_file() and not (target / "old").exists()
    assert not aside_paths(target) and not new.exists()


# ------------------------------------------------------------------------------------ checkpoints


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """A resume from step 2 of a folder that also holds steps 5 and 6 of an older timeline: the old code
    kept the highest numbers and deleted the new step-3, leaving `latest` pointing at nothing."""
    for s in (2, 5, 6):
        _step(tmp_path, s)
    tmp = ckpt.begin_save(tmp_path, 3)
    final = ckpt.commit_save(tmp, _state(3), keep=2)
    root = ckpt.checkpoints_dir(tmp_path)
    assert final.is_dir() and (root / ckpt.LATEST).read_text() == "step-000003"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000003"]
    assert ckpt.latest_checkpoint(tmp_path) == final
    final = ckpt.commit_save(ckpt.begin_save(tmp_path, 4), _state(4), keep=1)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000004"]


def test_resave_of_a_step_keeps_a_complete_checkpoint_at_every_instant(tmp_path, monkeypatch):
    _step(tmp_path, 5, payload="first")
    root = ckpt.checkpoints_dir(tmp_path)
    (root / ckpt.LATEST).write_text("step-000005")
    tmp = ckpt.begin_save(tmp_path, 5)
    (tmp / "payload").write_text("second")
    seen = []
    real_rename = os.rename

    def spy(src, dst):
        if os.path.basename(src) == tmp.name:  # the instant before the new folder lands
            found = ckpt.latest_checkpoint(tmp_path)
            seen.append((found.name, (found / "payload").read_text()))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    ckpt.commit_save(tmp, _state(5), keep=2)
    assert [(name.startswith(".old-step-000005.orpo-ds-"), payload) for name, payload in seen] == [(True, "first")]
    assert (root / "step-000005" / "payload").read_text() == "second"
    assert not list(root.glob(".old-*"))


def test_fresh_start_into_a_folder_with_checkpoints_is_refused_unless_overwrite(tmp_path):
    _step(tmp_path, 4)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ckpt.ResumeError, match="train.overwrite=true"):
        ckpt.resolve_resume("false", tmp_path)
    assert ckpt.resolve_resume("false", tmp_path, overwrite=True) is None
    ckpt.clear_run_state(tmp_path)
    assert not ckpt.checkpoints_dir(tmp_path).exists() and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_resume_false_is_accepted_as_a_yaml_boolean(tmp_path):
    assert load_config(None, BASE + ["train.resume=false"]).train.resume == "false"
    assert load_config(None, BASE + ["train.resume=true"]).train.resume == "auto"
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\ntrain: {resume: false, overwrite: true}\n")
    cfg = load_config(path)
    assert cfg.train.resume == "false" and cfg.train.overwrite is True


def test_resume_refuses_changed_data_tokenizer_and_truncation():
    old = _state()
    ckpt.check_compatible(old, _state(step=0), ckpt=None)  # same identity: accepted
    for change, words in ((dict(data_fingerprint="bbb"), "training data changed"),
                          (dict(max_length=128), "data.max_length"),
                          (dict(truncation="drop"), "data.truncation"),
                          (dict(tokenizer_sha256="other"), "tokenizer"),
                          (dict(config={"train": {"share_prompt": True}}), "train.share_prompt false -> true")):
        with pytest.raises(ckpt.ResumeError, match=words):
            ckpt.check_compatible(old, _state(**change), ckpt=None)


def test_pairs_fingerprint_sees_swapped_responses():
    pairs = [TokenizedPair(0, (1, 2), (3, 4, 5), (6, 7)), TokenizedPair(1, (11,), (8,), (9, 10))]
    swapped = [TokenizedPair(p.pair_id, p.prompt_ids, p.rejected_ids, p.chosen_ids) for p in pairs]
    assert ckpt.pairs_fingerprint(pairs) == ckpt.pairs_fingerprint(list(pairs))
    assert ckpt.pairs_fingerprint(pairs) != ckpt.pairs_fingerprint(swapped)


def test_rng_state_round_trips_without_pickle(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.write_rank_state(tmp_path, 0)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load_rank_state(tmp_path, 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['ORPO_DS_PWNED']}",))


def test_rng_file_with_a_pickled_object_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("ORPO_DS_PWNED", str(pwned))
    (tmp_path / "rng").mkdir()
    torch.save({"python": _Payload()}, tmp_path / "rng" / "rank-00000.pt")
    with pytest.raises(ckpt.ResumeError, match="refused to load"):
        ckpt.load_rank_state(tmp_path, 0)
    assert not pwned.exists()


# ------------------------------------------------------------------------------ metrics and lock


def test_torn_last_metrics_line_is_skipped_and_resume_rewrites_the_log(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "torn line 3" in capsys.readouterr().err
    MetricsLog(path).truncate_after(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_fresh_start_keeps_the_earlier_log_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    log = MetricsLog(path)
    log.start_fresh()
    log.write({"step": 1, "loss": 1.0})
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}]
    assert read_metrics(tmp_path / "metrics.prev.jsonl") == [{"step": 1}]


def _hold_lock(folder, ready, release):
    lock = FolderLock(folder)
    lock.acquire()
    ready.set()
    release.wait(30)


def test_second_run_into_a_locked_output_dir_names_the_holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UnsafeOutputError, match=f"pid {holder.pid} on host"):
            FolderLock(tmp_path).acquire()
    finally:
        release.set()
        holder.join(30)
    lock = FolderLock(tmp_path)  # the holder exited: the kernel released its lock
    lock.acquire()
    lock.release()


# --------------------------------------------------------------------------- clear config errors


@pytest.mark.parametrize("override, words", [
    ("train.lr=.inf", "train.lr"), ("train.lr=.nan", "train.lr"), ("loss.beta=.inf", "loss.beta"),
    ("loss.beta=-0.1", "loss.beta"), ("train.max_grad_norm=.nan", "train.max_grad_norm"),
    ("train.weight_decay=-0.01", "train.weight_decay"), ("train.weight_decay=.inf", "train.weight_decay"),
    ("train.adam_betas=[0.9,0.99,0.5]", "train.adam_betas"), ("train.adam_betas=[0.9]", "train.adam_betas"),
    ("train.output_dir=", "train.output_dir"), ("train.output_dir=' '", "train.output_dir"),
])
def test_nonsense_numbers_and_empty_paths_are_config_errors(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(None, BASE + [override])


@pytest.mark.parametrize("body", ["train: 3\n", "train: [1, 2]\n"])
def test_a_scalar_or_list_section_is_a_config_error(tmp_path, body):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\n" + body)
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(path)


def test_non_utf8_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model: {name_or_path: caf\xe9}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", "must hold a JSON object"),
    ('{"bf16": true}', "'bf16' must be a section"),
    ('{"zero_optimization": {"stage": 4}}', "stage must be 0, 1, 2 or 3"),
    ('{"zero_optimization": {"stage": "3"}}', "stage must be 0, 1, 2 or 3"),
    ('{"zero_optimization": 3}', "zero_optimization must be an object"),
])
def test_bad_deepspeed_json_is_a_config_error(tmp_path, text, words):
    path = tmp_path / "ds.json"
    path.write_text(text)
    cfg = load_config(None, BASE)
    with pytest.raises(ConfigError, match=words):
        build_ds_config(read_ds_config(str(path)), cfg.train, world_size=1, dtype=torch.float32)


# ------------------------------------------------------------------------------- the command line


def _train_cli(tmp_path, *overrides):
    return subprocess.run([sys.executable, "-m", "orpo_ds", "train", f"train.output_dir={tmp_path / 'run'}",
                           *overrides], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"})


def test_missing_model_folder_exits_2_without_a_traceback(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    proc = _train_cli(tmp_path, f"model.name_or_path={tmp_path / 'no-such-model'}", f"data.train={data}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.name_or_path" in proc.stderr and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_deepspeed_json_is_checked_before_the_data_is_read(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"bf16": true}')
    proc = _train_cli(tmp_path, "model.name_or_path=some/model", f"data.train={tmp_path / 'absent.jsonl'}",
                      f"deepspeed.config={bad}")
    assert proc.returncode == 2 and "'bf16' must be a section" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / RUN_CONFIG).exists()


def test_second_ctrl_c_stops_at_once_with_130():
    code = ("import os, signal, time\n"
            "from orpo_ds.preemption import PreemptionSignal\n"
            "p = PreemptionSignal()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(0.2)\n"
            "assert p._interrupt\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(5)\n"
            "raise SystemExit('still running')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert "finishing this step" in proc.stderr and "stopping now" in proc.stderr
