"""launch/deepspeed.sh and launch/smoke_1gpu.sh run for real on the CPU; every launcher's DRY_RUN output.

(launch/orpo.sbatch runs on a real SLURM cluster in tests/slurm/test_sbatch.py.)
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from tests.distributed.conftest import REPO, base_overrides, free_port, run_env

LAUNCH = REPO / "launch"
PYTHON = sys.executable


def run_script(script: str, env: dict[str, str | None], *, cwd: Path = REPO, timeout: int = 600,
               bash: bool = False) -> subprocess.CompletedProcess:
    cmd = ["bash", str(LAUNCH / script)] if bash else [str(LAUNCH / script)]
    merged = {**run_env(), "PYTHON": PYTHON, **env}
    merged = {k: v for k, v in merged.items() if v is not None}  # None: unset the variable
    proc = subprocess.run(cmd, cwd=cwd, env=merged, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + "\n" + proc.stderr[-6000:])
    return proc


def dry_run(script: str, **env: str | None) -> list[list[str]]:
    proc = run_script(script, {"DRY_RUN": "1", **env}, bash=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def train_steps(metrics: Path) -> list[int]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def test_deepspeed_sh_runs_two_cpu_ranks(tiny_model, synthetic_data, tmp_path):
    out = tmp_path / "run"
    overrides = " ".join(base_overrides(tiny_model, synthetic_data, out, **{"train.max_steps": 6}))
    proc = run_script("deepspeed.sh", {"GPUS_PER_NODE": "2", "DS_ACCELERATOR": "cpu", "CONFIG": "",
                                       "OVERRIDES": overrides, "MASTER_PORT": str(free_port())}, cwd=tmp_path)
    assert proc.returncode == 0
    assert train_steps(out / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert (out / "final" / "config.json").is_file()


def test_deepspeed_sh_runs_one_rank_without_the_launcher(tiny_model, synthetic_data, tmp_path):
    out = tmp_path / "run"
    overrides = " ".join(base_overrides(tiny_model, synthetic_data, out, **{"train.max_steps": 3}))
    proc = run_script("deepspeed.sh", {"GPUS_PER_NODE": "1", "DS_ACCELERATOR": "cpu", "CONFIG": "",
                                       "OVERRIDES": overrides, "MASTER_PORT": None}, cwd=tmp_path)
    assert proc.returncode == 0
    assert "deepspeed.launcher.launch" not in proc.stdout + proc.stderr  # the launcher logs its command line
    assert train_steps(out / "metrics.jsonl") == [1, 2, 3]
    assert (out / "final" / "config.json").is_file()


def test_smoke_1gpu_passes_on_cpu(tmp_path):
    proc = run_script("smoke_1gpu.sh", {"SMOKE_DIR": str(tmp_path / "smoke"), "DS_ACCELERATOR": "cpu"}, cwd=tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[-1] == "PASS", proc.stdout[-3000:]
    report = "\n".join(lines)
    assert "throughput:" in report and "tokens/s" in report
    assert "peak memory:" in report and "peak RSS" in report
    assert "reloads with AutoModelForCausalLM.from_pretrained" in report
    assert (tmp_path / "smoke" / "run" / "final").is_dir()


def _fake_run(root: Path, losses: list[float], with_final: bool = False) -> Path:
    root.mkdir(parents=True)
    rows = [{"step": 0, "eval/loss": 9.0}] + [{"step": i + 1, "loss": v, "tokens_per_s": 100.0}
                                              for i, v in enumerate(losses)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _verify(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(LAUNCH / "smoke_check.py"), "verify", "--run", str(run)],
                          capture_output=True, text=True, env=run_env(), timeout=120)


def test_smoke_check_fails_when_the_loss_does_not_fall(tmp_path):
    proc = _verify(_fake_run(tmp_path / "flat", [3.0, 3.0, 3.0, 3.1, 3.2, 3.3]))
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1].startswith("FAIL: loss did not fall")


def test_smoke_check_fails_when_final_does_not_reload(tmp_path):
    proc = _verify(_fake_run(tmp_path / "nofinal", [3.0, 2.9, 2.8, 2.0, 1.9, 1.8]))
    assert proc.returncode == 1
    assert "does not reload with AutoModelForCausalLM.from_pretrained" in proc.stdout.strip().splitlines()[-1]


def test_dry_runs_print_the_commands(tmp_path):
    tricky = "train.lr=1e-5\tloss.beta=0.2\n data.train=/d/*.jsonl x=$(touch " + str(tmp_path / "pwned") + ")"
    words = ["train.lr=1e-5", "loss.beta=0.2", "data.train=/d/*.jsonl", "x=$(touch", f"{tmp_path / 'pwned'})"]

    # deepspeed.sh, one node: overrides split on whitespace only, never globbed or evaluated.
    (cmd,) = dry_run("deepspeed.sh", GPUS_PER_NODE="2", CONFIG="cfg.yaml", OVERRIDES=tricky, MASTER_PORT="29555",
                     OUTPUT_DIR="/o/run 1", DEEPSPEED="/x/deepspeed")
    assert cmd == ["/x/deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", "29555",
                   "--module", "orpo_ds", "train", "--config", "cfg.yaml", "train.output_dir=/o/run 1", *words]
    assert not (tmp_path / "pwned").exists()

    # deepspeed.sh with a hostfile: the master is its first host.
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nnodeA slots=8\nnodeB slots=8\n")
    (cmd,) = dry_run("deepspeed.sh", HOSTFILE=str(hostfile), NUM_NODES="2", CONFIG="", DEEPSPEED="deepspeed")
    assert cmd == ["deepspeed", "--hostfile", str(hostfile), "--launcher", "pdsh", "--num_nodes", "2",
                   "--master_addr", "nodeA", "--master_port", "29500", "--module", "orpo_ds", "train"]

    # smoke_1gpu.sh: make the tiny model, train in-process (to read peak memory), verify.
    smoke = tmp_path / "s"
    make, train, verify = dry_run("smoke_1gpu.sh", SMOKE_DIR=str(smoke), STEPS="12", OVERRIDES="train.seed=3")
    assert make == [PYTHON, str(LAUNCH / "make_tiny_model.py"), "--model", f"{smoke}/tiny-model",
                    "--pairs", f"{smoke}/pairs.jsonl", "--num-pairs", "128"]
    assert train[:6] == [PYTHON, str(LAUNCH / "smoke_check.py"), "run", "--report", f"{smoke}/memory.json", "--"]
    assert train[6:8] == ["orpo_ds", "train"] and "--config" not in train
    assert f"model.name_or_path={smoke}/tiny-model" in train and "train.max_steps=12" in train
    assert train[-1] == "train.seed=3"  # the user's OVERRIDES come last, so they win
    assert verify == [PYTHON, str(LAUNCH / "smoke_check.py"), "verify", "--run", f"{smoke}/run",
                      "--report", f"{smoke}/memory.json"]
    assert not smoke.exists()  # a dry run creates nothing

    # orpo.sbatch outside SLURM (no cluster, so no scontrol answer): the node list's first host is the master.
    (cmd,) = dry_run("orpo.sbatch", SLURM_CONF=None, SLURM_JOB_ID="77", SLURM_NNODES="3",
                     SLURM_JOB_NODELIST="gpu[07-09]", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="64",
                     CONFIG="configs/demo.yaml", OVERRIDES="train.lr=2e-5")
    assert cmd == ["srun", "--nodes=3", "--ntasks=12", "--ntasks-per-node=4", "--cpus-per-task=16",
                   "--kill-on-bad-exit=0", "--wait=300", "--export=ALL,MASTER_ADDR=gpu07,MASTER_PORT=20077",
                   "--gres=gpu:4", PYTHON, "-m", "orpo_ds", "train", "--config", "configs/demo.yaml", "train.lr=2e-5"]
