"""Nothing lost, end to end (issue 12): reruns into old folders, changed data, a torn metrics line, a
second run into a busy folder, a user's folder where the export goes, and Ctrl-C. One CPU rank each:
these paths do not depend on the world size, and one rank keeps the tier fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orpo_ds.checkpoint import RUN_CONFIG
from orpo_ds.metrics import read_metrics
from orpo_ds.preemption import EXIT_INTERRUPTED
from tests.distributed.conftest import REPO, base_overrides, launch, launch_command, run_env, wait_for_logged_steps
from tests.helpers.synthetic import write_pairs


def _args(model, data, out, **extra):
    return ["train", *base_overrides(model, {"train": data}, out, **{"train.export": False, **extra})]


def _steps(out):
    return [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]


def _eval_steps(out):
    return [m["step"] for m in read_metrics(out / "metrics.jsonl") if "eval/loss" in m]


def test_reruns_resume_past_a_torn_line_and_refuse_changed_data_or_a_fresh_start(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 24, seed=5)
    held_out = {"data.eval": write_pairs(tmp_path / "eval.jsonl", 6, seed=6)}
    out = tmp_path / "run"
    assert launch(_args(tiny_model, data, out, **{"train.max_steps": 2, **held_out}), ranks=1).returncode == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.')  # a write cut by a full disk
    resumed = launch(_args(tiny_model, data, out, **{"train.max_steps": 3, **held_out}), ranks=1)
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout
    assert _steps(out) == [1, 2, 3]
    # Extended past its old end, the run evaluates at its new end; the before-figures come from the checkpoint.
    assert _eval_steps(out) == [0, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_after"]["step"] == 3 and summary["eval_before"]["step"] == 0
    assert not any("mfu" in m for m in read_metrics(out / "metrics.jsonl"))  # no peak to divide by on the CPU
    config_before = (out / RUN_CONFIG).read_text()

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text(  # the same file, the same number of pairs, chosen <-> rejected
    "".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in rows))
    changed = launch(_args(tiny_model, data, out, **{"train.max_steps": 4}), ranks=1)
    assert changed.returncode == 3 and "training data changed" in changed.stderr
    assert "Traceback" not in changed.stderr

    fresh = launch(_args(tiny_model, data, out, **{"train.resume": "false", "train.lr": 5e-4}), ranks=1)
    assert fresh.returncode == 3 and "train.overwrite=true" in fresh.stderr
    assert (out / RUN_CONFIG).read_text() == config_before  # written only once a resume is accepted
    assert _steps(out) == [1, 2, 3]

    over = launch(_args(tiny_model, data, out, **{"train.resume": "false", "train.overwrite": "true",
                                                  "train.max_steps": 1}), ranks=1)
    assert over.returncode == 0 and "resumed from" not in over.stdout
    assert _steps(out) == [1]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001"]


def test_busy_output_dir_and_a_users_folder_at_final_exit_2_before_any_work(tiny_model, synthetic_data, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import signal; from orpo_ds.safe_files import FolderLock; "
                               f"FolderLock({str(out)!r}).acquire(); print('locked', flush=True); signal.pause()"],
                              cwd=REPO, env=run_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = launch(_args(tiny_model, synthetic_data["train"], out), ranks=1)
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode == 2 and f"pid {holder.pid} on host" in busy.stderr
    assert "Traceback" not in busy.stderr and not (out / RUN_CONFIG).exists()

    (out / "final").mkdir()
    (out / "final" / "notes.txt").write_text("mine")
    clash = launch(_args(tiny_model, synthetic_data["train"], out, **{"train.export": True}), ranks=1)
    assert clash.returncode == 2 and "not an orpo-ds export" in clash.stderr
    assert (out / "final" / "notes.txt").read_text() == "mine"


def test_ctrl_c_finishes_the_step_saves_and_exits_130(tiny_model, synthetic_data, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_model, synthetic_data["train"], out, **{"train.epochs": 50})
    proc = subprocess.Popen(launch_command(args, 1), cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_logged_steps(out, 2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    stopped_at = max(_steps(out))
    assert (out / "checkpoints" / "latest").read_text() == f"step-{stopped_at:06d}"
    assert f"interrupted: checkpoint saved at step {stopped_at}" in stderr


def test_a_resume_with_a_new_lr_and_more_steps_runs_them_and_marks_the_log(tiny_model, synthetic_data, tmp_path):
    """Issue 32 items 5 and 6: the new lr was ignored (steps bit-identical to the old schedule), and a run
    extended past its end trained its first new step at lr 0. Each new step's rate is the new config's
    linear schedule at that step: lr * (1 - (step - 1) / max_steps)."""
    out = tmp_path / "run"
    first = _args(tiny_model, synthetic_data["train"], out, **{"train.max_steps": 3, "train.lr_schedule": "linear"})
    assert launch(first, ranks=1).returncode == 0
    again = _args(tiny_model, synthetic_data["train"], out, **{"train.max_steps": 5, "train.lr_schedule": "linear",
                                                               "train.lr": 1e-2})
    resumed = launch(again, ranks=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "settings changed since the checkpoint, applied from step 4" in resumed.stdout
    records = read_metrics(out / "metrics.jsonl")
    rates = {r["step"]: r["lr"] for r in records if "loss" in r}
    assert rates[4] == pytest.approx(1e-2 * (1 - 3 / 5)) and rates[5] == pytest.approx(1e-2 * (1 - 4 / 5))
    (marker,) = [r for r in records if "resumed_with_changes" in r]
    assert marker["step"] == 3 and marker["resumed_with_changes"] == {"train.lr": [1e-3, 1e-2],
                                                                      "train.max_steps": [3, 5]}
    assert json.loads((out / RUN_CONFIG).read_text())["train"]["lr"] == 1e-2


def _rank_pid(session: int, rank: int) -> int | None:
    """The pid of ``rank``'s trainer process in the launcher's session (the deepspeed launcher passes
    ``--local_rank=N`` on each rank's command line)."""
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.getsid(int(entry.name)) != session:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"orpo_ds" in args and f"--local_rank={rank}".encode() in args:
            return int(entry.name)
    return None


def test_when_a_rank_dies_mid_run_the_others_exit_promptly(tiny_model, synthetic_data, tmp_path):
    """Issue 32: the survivors must not wait for the collective timeout (30 minutes by default); the
    timeout itself is train.collective_timeout_s, set short here so a hang would fail the test."""
    out = tmp_path / "run"
    args = _args(tiny_model, synthetic_data["train"], out, **{"train.epochs": 50, "train.collective_timeout_s": 60})
    proc = subprocess.Popen(launch_command(args, 2), cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_logged_steps(out, 2)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.communicate(timeout=300)
        waited = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"the job ended {waited:.1f} s after rank 1 was killed")
    assert proc.returncode != 0 and waited < 60  # before the collective timeout
    assert _rank_pid(proc.pid, 0) is None  # rank 0 is gone too
