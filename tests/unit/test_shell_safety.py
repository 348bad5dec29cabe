"""No user value reaches a shell parser or bash arithmetic: `make train` hands CONFIG and OVERRIDES to
launch/deepspeed.sh in the environment, and every launcher rejects a numeric variable that is not a plain
number (exit 2) before any $(( )) could evaluate it. All under DRY_RUN=1: nothing is trained."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
# The caller's settings that would change the printed commands (a surrounding make, a SLURM job, a shell
# with launcher variables exported).
CALLER = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CONFIG", "OVERRIDES", "OUTPUT_DIR", "PYTHON", "DEEPSPEED",
          "HOSTFILE", "NUM_NODES", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "LAUNCHER", "CPUS_PER_TASK",
          "EXIT_GRACE_S", "MAX_LENGTH", "SMOKE_DIR"}
# The dry run the README documents for launch/orpo.sbatch.
README_SBATCH = {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_GPUS_ON_NODE": "8"}


def dry_env(**env: str | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in CALLER and not k.startswith("SLURM_")}
    merged = {**base, "DRY_RUN": "1", **env}
    return {k: v for k, v in merged.items() if v is not None}  # None: unset the variable


def run(cmd: list[str], **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=dry_env(**env), capture_output=True, text=True, timeout=120)


def make_train(*make_args: str, **env: str | None) -> subprocess.CompletedProcess:
    # -o assets: take the prerequisite (venv, real assets) as made, so that only train's recipe runs.
    return run(["make", "-s", "-o", "assets", "train", "RANKS=2", *make_args], **env)


def deepspeed_tail(proc: subprocess.CompletedProcess) -> list[str]:
    """The one printed command, less the launcher's path (.venv/bin/deepspeed, or `deepspeed` without a venv)."""
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    cmd = shlex.split(line)
    assert Path(cmd[0]).name == "deepspeed"
    return cmd[1:]


TODAY = ["--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", "29500", "--module", "orpo_ds", "train"]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


@needs_make
def test_make_train_runs_the_same_command():
    assert deepspeed_tail(make_train()) == [*TODAY, "--config", "configs/demo.yaml"]
    proc = make_train("OVERRIDES=train.lr=5e-5 train.max_steps=30")  # the README's example
    assert deepspeed_tail(proc) == [*TODAY, "--config", "configs/demo.yaml", "train.lr=5e-5", "train.max_steps=30"]


def one_rank_command(proc: subprocess.CompletedProcess) -> list[str]:
    """The printed ``python -m orpo_ds train ...`` of a one-rank dry run, less the interpreter's path."""
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    return shlex.split(line)[1:]


@needs_make
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="the layout of a CPU-only machine")
def test_one_cpu_rank_runs_zero0_unless_told_otherwise():
    """ZeRO-3 in a world of one partitions nothing: `make train` on one CPU rank runs ZeRO-0; several
    ranks keep the config's ZeRO-3, and the user's DS_CONFIG= or deepspeed.config override wins."""
    one_rank = ["make", "-s", "-o", "assets", "train", "RANKS=1"]
    head = ["-m", "orpo_ds", "train", "--config", "configs/demo.yaml"]
    assert one_rank_command(run(one_rank)) == [*head, "deepspeed.config=ds_configs/zero0.json"]
    assert one_rank_command(run([*one_rank, "DS_CONFIG="])) == head
    mine = "deepspeed.config=ds_configs/zero3.json"  # later on the command line than the Makefile's: it wins
    assert one_rank_command(run([*one_rank, f"OVERRIDES={mine}"]))[-1] == mine
    assert deepspeed_tail(make_train()) == [*TODAY, "--config", "configs/demo.yaml"]


@needs_make
@pytest.mark.parametrize("where", ["command line", "environment"])
def test_make_train_never_lets_a_shell_parse_config_or_overrides(tmp_path, where):
    marker = tmp_path / "pwned"
    overrides = f"train.lr=5e-5 x; touch {marker} y=$(touch {marker}) z=`touch {marker}`|touch {marker}"
    config = f"my cfg;touch {marker}.yaml"
    if where == "command line":
        proc = make_train(f"OVERRIDES={overrides}", f"CONFIG={config}")
    else:
        proc = make_train(OVERRIDES=overrides, CONFIG=config)
    # Split on whitespace only; not a `;`, `$( )`, backtick or `|` acted on, by the shell or by make.
    assert deepspeed_tail(proc) == [*TODAY, "--config", config, "train.lr=5e-5", "x;", "touch", str(marker),
                                    "y=$(touch", f"{marker})", "z=`touch", f"{marker}`|touch", str(marker)]
    assert not marker.exists()
    assert not Path(f"{marker}.yaml").exists()


NUMERIC = [
    ("deepspeed.sh", "GPUS_PER_NODE", {}),
    ("deepspeed.sh", "MASTER_PORT", {}),
    ("deepspeed.sh", "NUM_NODES", {"HOSTFILE": "hosts.txt"}),
    ("smoke_1gpu.sh", "MAX_LENGTH", {}),
    *[("orpo.sbatch", name, README_SBATCH) for name in
      ("GPUS_PER_NODE", "MASTER_PORT", "CPUS_PER_TASK", "EXIT_GRACE_S", "SLURM_NNODES", "SLURM_JOB_ID",
       "SLURM_GPUS_ON_NODE", "SLURM_CPUS_ON_NODE")],
    ("orpo.sbatch", "SLURM_JOB_NUM_NODES", {**README_SBATCH, "SLURM_NNODES": None}),  # read without SLURM_NNODES
]


@pytest.mark.parametrize(("script", "name", "env"), NUMERIC, ids=[f"{s}-{n}" for s, n, _ in NUMERIC])
def test_a_numeric_variable_is_checked_before_any_arithmetic(tmp_path, script, name, env):
    marker = tmp_path / "pwned"
    # Bash arithmetic runs the command substitution in an array subscript: $((PATH[$(touch x)] + 1)) (of a
    # variable that is set: under `set -u` an unset one stops the expansion first).
    proc = run(["bash", str(LAUNCH / script)], **{**env, name: f"PATH[$(touch {marker})]"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{name}=" in proc.stderr and "is not a decimal number" in proc.stderr
    assert proc.stdout == ""
    assert not marker.exists()


@pytest.mark.parametrize("value", ["08", "-1", "1.5", " 2", "2 ", "0x10", "1e3", "2\n"])
def test_only_plain_decimal_numbers_pass(value):
    proc = run(["bash", str(LAUNCH / "deepspeed.sh")], GPUS_PER_NODE=value)
    assert proc.returncode == 2, proc.stdout + proc.stderr


def test_a_plain_number_or_empty_passes():
    cmd = deepspeed_tail(run(["bash", str(LAUNCH / "deepspeed.sh")], GPUS_PER_NODE="16", MASTER_PORT="29555"))
    assert cmd[:2] == ["--num_gpus", "16"] and cmd[4:6] == ["--master_port", "29555"]
    cmd = deepspeed_tail(run(["bash", str(LAUNCH / "deepspeed.sh")], GPUS_PER_NODE="2", MASTER_PORT=""))
    assert cmd[4:6] == ["--master_port", "29500"]  # the default


@pytest.mark.parametrize("gpus_per_node", ["1", ""])  # "": no nvidia-smi GPU here, or DS_ACCELERATOR=cpu
def test_one_rank_on_one_node_runs_the_trainer_without_the_launcher(gpus_per_node):
    proc = run(["bash", str(LAUNCH / "deepspeed.sh")], GPUS_PER_NODE=gpus_per_node, DS_ACCELERATOR="cpu",
               PYTHON="/venv/bin/python", OVERRIDES="train.lr=5e-5")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert shlex.split(line) == ["/venv/bin/python", "-m", "orpo_ds", "train", "--config", "configs/demo.yaml",
                                 "train.lr=5e-5"]


def test_the_readme_sbatch_dry_run_still_works():
    proc = run(["bash", str(LAUNCH / "orpo.sbatch")], **README_SBATCH)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert shlex.split(line)[:2] == ["srun", "--nodes=2"]
    assert "--export=ALL,MASTER_ADDR=gpu1,MASTER_PORT=20001" in shlex.split(line)


def test_an_sbatch_job_without_gpus_refuses_to_train_on_the_cpu_unless_asked():
    """Issue 34 item 6: a job submitted without a GPU request saw no GPU on cgroup-fenced clusters and
    trained on one CPU rank without a word."""
    no_gpu = {**README_SBATCH, "SLURM_GPUS_ON_NODE": None, "DS_ACCELERATOR": None, "PATH": "/usr/bin:/bin"}
    proc = run(["bash", str(LAUNCH / "orpo.sbatch")], **no_gpu)
    assert proc.returncode == 2 and "sees no GPU" in proc.stderr and "--gpus-per-node" in proc.stderr
    for allowed in ({"ORPO_ALLOW_CPU": "1"}, {"DS_ACCELERATOR": "cpu"}):
        proc = run(["bash", str(LAUNCH / "orpo.sbatch")], **{**no_gpu, **allowed})
        assert proc.returncode == 0 and "--gres" not in proc.stdout, proc.stderr
    with_gpus = shlex.split(run(["bash", str(LAUNCH / "orpo.sbatch")], **README_SBATCH).stdout)
    assert "--gres=gpu:8" in with_gpus and "--ntasks-per-node=8" in with_gpus
