"""Nothing lost, part 3 (issue 32): files a run or an export does not own, and eval's output and input
checks. Each test failed on the code before the fix."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orpo_ds import checkpoint as ckpt
from orpo_ds.safe_files import (
    RUN_MARKER,
    UnsafeOutputError,
    atomic_write,
    check_export_target,
    claim_output_dir,
    replace_dir,
    staging_dir,
)
from tests.helpers.models import save_tiny_llama
from tests.helpers.tokenizers import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "orpo_ds", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "tiny", make_tiny_tokenizer())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ 1. the run's own folder


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    before = _snapshot(model)
    with pytest.raises(UnsafeOutputError, match="not an orpo-ds run's.*config.json"):
        claim_output_dir(model)
    assert _snapshot(model) == before and not (model / RUN_MARKER).exists()


def test_new_empty_and_earlier_run_folders_are_claimed(tmp_path):
    (tmp_path / "empty").mkdir()
    locked_only = tmp_path / "locked"  # a refused earlier attempt leaves only its lock file
    locked_only.mkdir()
    (locked_only / ".lock").write_text("")
    for folder in (tmp_path / "new" / "deeper", tmp_path / "empty", locked_only):
        assert claim_output_dir(folder) == folder and (folder / RUN_MARKER).is_file()
    (tmp_path / "empty" / "summary.json").write_text("{}")  # the run's own file, in a marked folder
    claim_output_dir(tmp_path / "empty")


@pytest.mark.parametrize("case", ["file", "under-a-file"])
def test_an_output_dir_that_is_or_lies_under_a_file_is_refused(tmp_path, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    with pytest.raises(UnsafeOutputError, match="is a file"):
        claim_output_dir(blocker if case == "file" else blocker / "run")
    assert blocker.read_text() == "mine"


def test_an_output_dir_that_cannot_be_created_is_an_output_error(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UnsafeOutputError, match="cannot write there.*Permission denied"):
        claim_output_dir(tmp_path / "run")


def test_train_into_a_model_folder_exits_2_before_any_work(tiny_model, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (model / name).write_bytes((tiny_model / name).read_bytes())
    before = _snapshot(model)
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    proc = _cli("train", f"model.name_or_path={model}", f"data.train={data}", f"train.output_dir={model}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not an orpo-ds run's" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(model) == before


def test_the_runs_config_is_not_named_like_a_models():
    from orpo_ds.checkpoint import RUN_CONFIG

    assert RUN_CONFIG != "config.json" and RUN_CONFIG.startswith("orpo-ds")


# ----------------------------------------------------------------- 2. exports and checkpoint folders


def _step(run: Path, step: int) -> Path:
    claim_output_dir(run)
    d = ckpt.checkpoints_dir(run) / ckpt.step_dir_name(step)
    d.mkdir(parents=True)
    (d / ckpt.STATE_FILE).write_text("{}")
    return d


def test_export_never_suggests_and_never_accepts_a_place_inside_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    step = _step(run, 3)
    suggestion = run.parent / "run-export"
    with pytest.raises(UnsafeOutputError) as refused:
        check_export_target(step, protected=[step, run], suggest=suggestion)
    assert f"--out {suggestion}" in str(refused.value) and "checkpoints" not in str(refused.value).split("--out")[-1]
    for inside in (step / "export", run / "checkpoints" / "export", run / "checkpoints" / ".tmp-step-000004" / "x"):
        with pytest.raises(UnsafeOutputError, match="inside the checkpoint folder"):
            check_export_target(inside, protected=[])
    assert check_export_target(suggestion, protected=[step, run]) == suggestion.resolve()


def test_export_cli_refuses_out_inside_a_checkpoint_and_suggests_outside(tmp_path):
    run = tmp_path / "run"
    step = _step(run, 1)
    proc = _cli("export", "--checkpoint", run, "--out", step / "export")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "inside the checkpoint folder" in proc.stderr and f"--out {tmp_path / 'run-export'}" in proc.stderr
    assert not (step / "export").exists()


# ------------------------------------------------------------- 3. siblings named like a staging folder


def test_staging_and_replacing_an_export_leave_a_users_dot_tmp_and_dot_old_folders_alone(tmp_path):
    exports = tmp_path / "exports"
    for name in (".tmp-victim", ".old-victim"):
        (exports / name).mkdir(parents=True)
        (exports / name / "thesis.tex").write_text("years of work")
    new = staging_dir(exports / "victim")
    (new / "model.safetensors").write_text("new")
    replace_dir(new, exports / "victim")
    new = staging_dir(exports / "victim")  # a second export replaces the first
    replace_dir(new, exports / "victim")
    for name in (".tmp-victim", ".old-victim"):
        assert (exports / name / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in exports.iterdir()) == [".old-victim", ".tmp-victim", "victim"]


def test_atomic_write_leaves_a_users_dot_tmp_file_alone_and_cleans_up_its_own_on_failure(tmp_path, monkeypatch):
    (tmp_path / ".tmp-summary.json").write_text("mine")
    atomic_write(tmp_path / "summary.json", "{}")
    assert (tmp_path / ".tmp-summary.json").read_text() == "mine"

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "summary.json", "{\"new\": 1}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-summary.json", "summary.json"]
    assert (tmp_path / "summary.json").read_text() == "{}"


# ----------------------------------------------------------------------------------- 4, 8, 13, 14: eval


def _pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_json_never_replaces_a_file_and_checks_its_folder_before_evaluating(tiny_model, tmp_path):
    data = _pairs(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    existing = tmp_path / "metrics.json"
    existing.write_text("earlier results")
    for target, words in ((existing, "exists"), (tmp_path, "exists"), (tmp_path / "no-dir" / "m.json", "does not")):
        proc = _cli("eval", "--model", tiny_model, "--data", data, "--json", target)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "[data]" not in proc.stdout  # refused before the evaluation
    assert existing.read_text() == "earlier results"
    written = tmp_path / "new.json"
    proc = _cli("eval", "--model", tiny_model, "--data", data, "--json", written)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rewards/accuracies" in json.loads(written.read_text())


def test_eval_with_no_usable_pair_exits_2_naming_the_reasons(tiny_model, tmp_path):
    data = _pairs(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "", "rejected": "c"},
                                         {"prompt": "a", "chosen": "b"}])
    proc = _cli("eval", "--model", tiny_model, "--data", data)
    assert proc.returncode == 2 and "no usable pair" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "0.0000" not in proc.stdout


def test_eval_refuses_a_missing_model_a_checkpoint_and_an_overlong_max_length(tiny_model, tmp_path):
    data = _pairs(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    step = _step(tmp_path / "run", 2)
    cases = [(["--model", tmp_path / "absent"], "not found"),
             (["--model", step], "orpo-ds export --checkpoint"),
             (["--model", tmp_path / "run"], "orpo-ds export --checkpoint"),
             (["--model", tiny_model, "--max-length", 100_000_000], "2048 positions")]
    for args, words in cases:
        proc = _cli("eval", *args, "--data", data)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


# -------------------------------------------------------------------------- 11. start-up, exit 2


def _data(tmp_path):
    return _pairs(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])


def test_seed_out_of_numpys_range_is_a_config_error():
    from orpo_ds.config import ConfigError, load_config

    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match="train.seed"):
            load_config(None, ["model.name_or_path=m", "data.train=d.jsonl", f"train.seed={seed}"])


def test_start_up_refusals_exit_2_naming_the_key(tiny_model, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text('{"model_type": "mything", "auto_map": {"AutoConfig": "configuration_x.C"}}')
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3, "overlap_comm": "sometimes"}}')
    autoep = tmp_path / "autoep.json"
    autoep.write_text('{"zero_optimization": {"stage": 3}, "expert_parallel": {"enabled": true, "autoep_size": 2}}')
    # A tokenizer with more tokens than the model's embedding (added tokens, no resize): the data's ids
    # must be refused on the host, since on a GPU the head checks its labels on the device only.
    small_vocab = tmp_path / "small_vocab"
    shutil.copytree(tiny_model, small_vocab)
    config = json.loads((small_vocab / "config.json").read_text())
    (small_vocab / "config.json").write_text(json.dumps(config | {"vocab_size": 8}))
    cases = [([f"model.name_or_path={small_vocab}"], "pair 0 holds token id"),
             ([f"model.name_or_path={remote}"], "model.trust_remote_code=true"),
             ([f"model.name_or_path={tiny_model}", f"deepspeed.config={ds}"], "overlap_comm"),
             ([f"model.name_or_path={tiny_model}", f"deepspeed.config={autoep}"],
              "expert_parallel (DeepSpeed AutoEP) is not supported"),
             ([f"model.name_or_path={tiny_model}", "data.max_length=4096", "train.micro_batch_tokens=8192"],
              "2048 positions")]
    if importlib.util.find_spec("flash_attn") is None:
        cases.append(([f"model.name_or_path={tiny_model}", "model.attn_implementation=flash_attention_2"],
                      "flash_attention_2: the flash-attn package is not installed"))
    if not torch.cuda.is_available():
        cases.append(([f"model.name_or_path={tiny_model}", "model.attn_implementation=varlen_attn"],
                      "varlen_attn: there is no CUDA device"))
    for i, (args, words) in enumerate(cases):
        proc = _cli("train", f"data.train={_data(tmp_path)}", f"train.output_dir={tmp_path / f'run{i}'}", *args)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: the SigCgt mask in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_during_start_up_exits_with_the_requeue_or_interrupt_code(tmp_path, sig, code):
    """Issue 32: SIGTERM during start-up exited 143, which the sbatch script does not requeue; SIGINT
    printed a KeyboardInterrupt traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "orpo_ds", "train", "model.name_or_path=m",
                             f"data.train={_data(tmp_path)}", f"train.output_dir={tmp_path / 'run'}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    try:
        deadline = time.monotonic() + 60
        # SIGTERM's handler is the last cli.main installs (Python catches SIGINT from its start).
        while not _catches(proc.pid, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)  # torch and DeepSpeed are still importing: the start-up takes seconds
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr[-2000:]
    assert "during start-up, before any training step" in stderr and "Traceback" not in stderr


def test_a_read_only_run_folder_is_an_output_error_not_a_traceback(tmp_path, monkeypatch):
    import orpo_ds.safe_files as safe_files
    from orpo_ds.safe_files import FolderLock

    run = tmp_path / "run"
    claim_output_dir(run)  # an earlier run's folder, now on a read-only mount
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(safe_files.os, "open", read_only)
    with pytest.raises(UnsafeOutputError, match="cannot write there.*Read-only file system"):
        FolderLock(run).acquire()


def test_config_out_in_a_missing_folder_exits_2_before_importing(tmp_path):
    source = tmp_path / "trl.yaml"
    source.write_text("model_name_or_path: m\ndataset_name: d.jsonl\n")
    proc = _cli("config", "from-trl", source, "--out", tmp_path / "nodir" / "x.yaml")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
