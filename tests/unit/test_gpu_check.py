"""launch/gpu_check.sh without a GPU: its dry run (plan + wheel check), its refusals, and the summary it
writes from the parts' results. Seconds, no network: the wheels are empty files with wheel names."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "gpu_check.sh"
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "launch" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def fake_wheels(folder: Path, skip: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in gpu_check.NEEDED:
        if name not in skip:
            (folder / f"{gpu_check._norm(name)}-1.0-py3-none-any.whl").write_bytes(b"x" * 1000)
    for file_name in extra:
        (folder / file_name).write_bytes(b"x")
    return folder


def test_dry_run_prints_the_plan_and_passes_with_every_wheel(tmp_path):
    proc = run("--dry-run", str(tmp_path / "out"), GPU_WHEELS=str(fake_wheels(tmp_path / "wheels")),
               WORK_DIR=str(tmp_path / "work"), BIG_STEPS="12")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for part in ("1. install", "2. gpu-tests", "3. smoke", "3b. smoke-share", "3c. varlen-attn", "4. big-model",
                 "5. zero3-0.5b"):
        assert f"[plan] {part} (" in out
    assert "NOT SmolLM2-135M on the demo" in out  # what the one-GPU run is not, said plainly
    assert "0.50B parameters" in out
    assert f"-m gpu {REPO}/tests/gpu" in out and "launch/smoke_1gpu.sh" in out
    train = next(line for line in out.splitlines() if " orpo_ds train " in line)
    assert "train.micro_batch_tokens=4096" in train and "train.max_steps=12" in train
    assert f"train.output_dir={tmp_path}/work/big-run" in train
    assert "carry: wheels 0.0 MiB + working tree" in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # a dry run makes nothing


def test_dry_run_fails_naming_the_missing_wheels(tmp_path):
    proc = run("--dry-run", GPU_WHEELS=str(tmp_path / "no-such-folder"))
    assert proc.returncode == 1
    assert "[plan] 1. install" in proc.stdout
    for name in ("deepspeed", "liger-kernel", "datasets", "pyarrow"):
        assert f"FAIL: missing: {name} " in proc.stderr
    assert "launch/gpu_check.sh --prepare" in proc.stderr


@pytest.mark.parametrize("skip, extra, message", [
    (("liger-kernel",), (), "missing: liger-kernel"),
    ((), ("datasets-0.9-py3-none-any.whl",), "more than one datasets wheel"),
    (("pyarrow",), ("pyarrow-26.0.1-cp311-cp311-manylinux_2_28_x86_64.whl",), "not for CPython 3.12 on x86-64"),
])
def test_a_broken_wheel_folder_is_named(tmp_path, skip, extra, message):
    proc = run("--dry-run", GPU_WHEELS=str(fake_wheels(tmp_path / "w", skip=skip, extra=extra)))
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_the_wheels_must_fit_the_carry_limit(tmp_path, monkeypatch, capsys):
    folder = fake_wheels(tmp_path / "w")
    monkeypatch.setattr(gpu_check, "CARRY_LIMIT_BYTES", 4000)  # smaller than the working tree alone
    assert gpu_check.check(folder) == 1
    assert "over the device tool's" in capsys.readouterr().err


def test_outside_a_git_checkout_only_the_wheels_are_checked(tmp_path, monkeypatch, capsys):
    # The GPU machine gets a copy of the tree without .git; the carry limit was met on the way there.
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    assert gpu_check.check(fake_wheels(tmp_path / "w")) == 0
    assert "not a git checkout" in capsys.readouterr().out


def test_refusals_before_any_work(tmp_path):
    assert run().returncode == 2  # no OUT_DIR
    bad = run("--dry-run", BIG_STEPS="3; touch x")
    assert bad.returncode == 2 and "BIG_STEPS=" in bad.stderr and "is not a decimal number" in bad.stderr
    assert run("--fast").returncode == 2
    typo = run("--dry-run", PARTS="gpu-tests smoek")
    assert typo.returncode == 2 and "PARTS names smoek" in typo.stderr


def test_a_rerun_can_name_its_parts(tmp_path):
    proc = run("--dry-run", GPU_WHEELS=str(fake_wheels(tmp_path / "w")), PARTS="gpu-tests smoke")
    assert proc.returncode == 0 and "[plan] parts to run: install gpu-tests smoke\n" in proc.stdout


def test_without_a_gpu_it_fails_and_still_writes_the_summary(tmp_path):
    # A stand-in nvidia-smi that lists no GPU, whatever this machine has.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    proc = run(str(tmp_path / "out"), GPU_WHEELS=str(fake_wheels(tmp_path / "w")), WORK_DIR=str(tmp_path / "work"),
               PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] is False and summary["problems"][0].startswith("no GPU")
    assert "no GPU" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_install_list_leaves_out_a_recent_enough_pyarrow(tmp_path, monkeypatch, capsys):
    folder = fake_wheels(tmp_path / "w")
    have = int(importlib.metadata.version("pyarrow").split(".")[0])
    monkeypatch.setattr(gpu_check, "ONLY_IF_OLDER", {"pyarrow": have})
    gpu_check.install_list(folder)
    listed = capsys.readouterr().out.split()
    assert len(listed) == len(gpu_check.NEEDED) - 1 and not any("pyarrow" in p for p in listed)
    monkeypatch.setattr(gpu_check, "ONLY_IF_OLDER", {"pyarrow": have + 1})
    gpu_check.install_list(folder)
    assert any("pyarrow" in p for p in capsys.readouterr().out.split())


def _junit(path: Path, skipped: int) -> Path:
    cases = "".join(f'<testcase classname="tests.gpu.t" name="case{i}">{"<skipped/>" if i < skipped else ""}'
                    f"</testcase>" for i in range(3))
    path.write_text(f'<testsuites><testsuite tests="3" failures="0" errors="0" skipped="{skipped}">{cases}'
                    f"</testsuite></testsuites>")
    return path


def _work(tmp_path: Path, big_rc: int = 0) -> Path:
    work = tmp_path / "work"
    (work / "big-run").mkdir(parents=True)
    rows = [{"step": i, "loss": 2.0, "tokens": 4000, "tokens_per_s": 1000.0 * i, "step_s": 4.0 / i, "mfu": 0.01 * i}
            for i in range(1, 9)]
    (work / "big-run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "big-memory.json").write_text(json.dumps({"cuda_max_memory_allocated_bytes": 3 * 2**30,
                                                      "cuda_max_memory_reserved_bytes": 4 * 2**30}))
    (work / "zero3-0.5b.log").write_text("loading\n[model] attention: sdpa; liger: on\nstep 1\n")
    (work / "parts.tsv").write_text(f"install\t0\t9\t40\ngpu-tests\t0\t50\t140\nzero3-0.5b\t{big_rc}\t99\t150\n")
    return work


def test_summary_of_a_passing_check(tmp_path):
    work = _work(tmp_path)
    code = gpu_check.summarize(work / "parts.tsv", work, tmp_path / "summary.json", "NVIDIA H200", 3, [],
                               _junit(tmp_path / "j.xml", skipped=0))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 0 and summary["ok"] and summary["problems"] == []
    big = summary["zero3_0.5b"]
    # Steps 4..8 after 3 warm-up steps: medians of 4000..8000 tokens/s and 0.04..0.08 MFU.
    assert (big["steps_timed"], big["tokens_per_s_median"]) == (5, 6000.0)
    assert big["mfu_median"] == pytest.approx(0.06) and big["mfu_target_0.40_met"] is False
    assert big["peak_gpu_memory_gib"] == 3.0
    assert summary["parts"]["zero3-0.5b"]["model_line"] == "[model] attention: sdpa; liger: on"
    assert summary["gpu_tests"] == {"tests": 3, "failures": 0, "errors": 0, "skipped": 0}


def test_summary_fails_on_a_skipped_gpu_test_a_timeout_or_missing_figures(tmp_path):
    work = _work(tmp_path, big_rc=124)
    assert gpu_check.summarize(work / "parts.tsv", work, tmp_path / "s.json", "H200", 3, [],
                               _junit(tmp_path / "j.xml", skipped=1)) == 1
    problems = json.loads((tmp_path / "s.json").read_text())["problems"]
    assert problems == ["part zero3-0.5b exited 124 (its time limit)",
                        "GPU test skipped on the GPU machine: tests.gpu.t::case0"]

    work = _work(tmp_path / "again")
    (work / "big-memory.json").write_text(json.dumps({"peak_rss_bytes": 1}))  # a CPU run's report
    assert gpu_check.summarize(work / "parts.tsv", work, tmp_path / "s2.json", "H200", 3, [],
                               _junit(tmp_path / "j2.xml", skipped=0)) == 1
    assert json.loads((tmp_path / "s2.json").read_text())["problems"] == [
        f"no CUDA peak memory in {work / 'big-memory.json'}"]


def test_the_big_model_is_about_half_a_billion_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**gpu_check.BIG, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == gpu_check.big_model_parameters()
    assert 0.45e9 < gpu_check.big_model_parameters() < 0.55e9


def test_a_part_past_its_limit_is_killed_with_its_processes_and_fails_by_name(tmp_path, capsys):
    # A stand-in trainer: SIGTERM would make it "save a checkpoint" and exit 75 (a preemption), and it has
    # a child process. Past the limit both must die at once, and the part count as a timeout.
    child_pid = tmp_path / "child.pid"
    trainer = (f"sleep 300 & echo $! > {child_pid}; trap 'echo saving a checkpoint; sleep 5; exit 75' TERM; "
               "echo step 1; wait")
    parts = tmp_path / "parts.tsv"
    code = gpu_check.run_part("smoke", 2, ["bash", "-c", trainer], tmp_path / "smoke.log", parts)
    out = capsys.readouterr().out
    assert code == gpu_check.EXIT_TIMED_OUT
    assert "=== [smoke] FAILED: timed out at its 2 s limit" in out and "saving a checkpoint" not in out
    assert (tmp_path / "smoke.log").read_text() == "step 1\n"
    name, rc, seconds, limit = parts.read_text().strip().split("\t")
    assert (name, rc, limit) == ("smoke", "124", "2") and int(seconds) < 5
    assert not _alive(int(child_pid.read_text()))  # the part's child went with it

    code = gpu_check.run_part("gpu-tests", 30, ["bash", "-c", "echo ran; exit 3"], tmp_path / "t.log", parts)
    assert code == 3 and "=== [gpu-tests] exit 3 after" in capsys.readouterr().out
    assert parts.read_text().splitlines()[1].split("\t")[:2] == ["gpu-tests", "3"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (killed, not yet reaped by whoever adopted it) does not."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:")) != "Z"
