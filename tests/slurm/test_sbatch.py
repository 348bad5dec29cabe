"""launch/orpo.sbatch on a real 2-node SLURM cluster running on this host (tests/slurm/cluster.sh).

The script is submitted as it is, configured only through environment variables (sbatch --export=ALL)
and sbatch options. Each job trains the tiny model with ZeRO-3 on 2 nodes x 1 rank (gloo, CPU).

The module's fixture brings the cluster up (installing Debian's SLURM and munge with apt-get when they
are missing) and always takes it down again; without root or apt the tests skip.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from orpo_ds.metrics import read_metrics
from tests.helpers.models import save_tiny_llama
from tests.helpers.network import free_port
from tests.helpers.synthetic import write_pairs
from tests.helpers.tokenizers import make_tiny_tokenizer

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = Path(__file__).with_name("cluster.sh")
SBATCH_SCRIPT = REPO / "launch" / "orpo.sbatch"
ZERO3_TINY = REPO / "tests" / "distributed" / "zero3_tiny.json"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _free_port_block(n: int = 3) -> int:
    """A base port with base..base+n-1 all free (slurmctld, slurmd n1, slurmd n2)."""
    for base in range(16817, 19000, 7):
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", p))
                socks.append(s)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError("no free port block for the test cluster")


@dataclass
class Cluster:
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol -o show job` as a dict (JobState, ExitCode, Restarts, NumNodes, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll `scontrol show job` until the job reaches a terminal state (not `sbatch --wait`)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s")
            time.sleep(1)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root (munged runs as the munge user, slurmd as root)")
    if not (shutil.which("slurmctld", path="/usr/sbin:/usr/bin") or shutil.which("apt-get")):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    # A private state dir and free ports: a second test session on this host gets its own cluster.
    state = tempfile.mkdtemp(prefix="orpo-ds-slurm-", dir="/tmp")
    env = dict(os.environ, ORPO_SLURM_DIR=state, ORPO_SLURM_PORT=str(_free_port_block()),
               SLURM_CONF=f"{state}/slurm.conf", PATH=f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}")
    try:
        up = subprocess.run([str(CLUSTER_SH), "up"], env=env, capture_output=True, text=True, timeout=900)
        if up.returncode == 3:
            pytest.skip(f"SLURM cannot be installed on this machine: {up.stderr.strip()}")
        assert up.returncode == 0, f"cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}"
        yield Cluster(env)
    finally:
        subprocess.run([str(CLUSTER_SH), "down"], env=env, capture_output=True, text=True, timeout=300)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def work(cluster):
    """A folder every node can read and write (it is one host), with the tiny model and the pairs."""
    root = Path(tempfile.mkdtemp(prefix="orpo-ds-slurm-work-", dir="/tmp"))
    save_tiny_llama(root / "model", make_tiny_tokenizer())
    write_pairs(root / "train.jsonl", 96, seed=0)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def job_env(cluster: Cluster, work: Path, out: Path, extra_overrides: str = "", **env) -> dict[str, str]:
    overrides = (f"model.name_or_path={work / 'model'} data.train={work / 'train.jsonl'} data.max_length=64 "
                 f"train.micro_batch_tokens=256 train.lr=1e-3 deepspeed.config={ZERO3_TINY} "
                 f"data.cache_dir={work / 'tok-cache'} {extra_overrides}")
    return dict(cluster.env, CONFIG="", OUTPUT_DIR=str(out), OVERRIDES=overrides, DS_ACCELERATOR="cpu",
                TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHON=str(REPO / ".venv" / "bin" / "python")
                if (REPO / ".venv" / "bin" / "python").exists() else os.environ.get("PYTHON", "python3"),
                # A free port, not the script's 20000 + job id: a fresh test cluster numbers its jobs from 1.
                **{"MASTER_PORT": str(free_port()), **env})


def submit(cluster: Cluster, work: Path, name: str, env: dict[str, str]) -> tuple[str, Path]:
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    proc = cluster.run("sbatch", "--parsable", "--export=ALL", "--nodes=2", f"--job-name={name}",
                       f"--chdir={work}", f"--output={log_dir}/%x-%j.out", str(SBATCH_SCRIPT), env=env)
    job_id = proc.stdout.strip().split(";")[0]
    return job_id, log_dir / f"{name}-{job_id}.out"


def train_steps(metrics: Path) -> list[int]:
    return [m["step"] for m in read_metrics(metrics) if "loss" in m]  # skips a line the job is still writing


def test_two_node_zero3_run_completes(cluster, work):
    out = work / "run-ok"
    job_id, log = submit(cluster, work, "orpo-ok", job_env(cluster, work, out, "train.max_steps=6"))
    info = cluster.wait(job_id, timeout=300)
    text = log.read_text() if log.exists() else "(no log)"
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert info["ExitCode"] == "0:0" and info["NumNodes"] == "2"
    assert "2 node(s) x 1 rank(s), launcher srun" in text
    assert train_steps(out / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert (out / "final" / "config.json").is_file()


def test_failing_run_ends_failed_with_exit_code(cluster, work):
    out = work / "run-bad"
    job_id, log = submit(cluster, work, "orpo-bad", job_env(cluster, work, out, "train.lr=-1"))
    info = cluster.wait(job_id, timeout=180)
    text = log.read_text() if log.exists() else "(no log)"
    assert info["JobState"] == "FAILED", f"{info}\n{text[-4000:]}"
    assert info["ExitCode"] == "2:0", info  # the trainer's config-error code, passed through srun and the script
    assert "train.lr: must be > 0" in text
    assert info["Restarts"] == "0"  # a failure is not a preemption: no requeue


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_preemption_checkpoints_requeues_and_resumes(cluster, work, launcher):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit) -> the script
    forwards it to the ranks -> they checkpoint and exit 75 -> the script requeues the job -> the
    restart resumes from the checkpoint and completes.

    Checked on metrics.jsonl: the training steps logged are exactly 1..max_steps, each once, in order
    (no gap, no duplicate: the trainer drops records after the checkpoint's step when it resumes), the
    first run stopped early at the checkpoint step K (3 <= K < max_steps) and the restart resumed at K.

    LAUNCHER=torchrun (one srun task per node, c10d rendezvous): torchrun forwards USR1 to its workers
    (--signals-to-handle) but then exits 1 itself, so there the script requeues because it forwarded a
    preemption signal; checkpoint, resume and metrics are checked the same way.
    """
    max_steps = 60
    out = work / f"run-preempt-{launcher}"
    job_id, log = submit(cluster, work, f"orpo-preempt-{launcher}",
                         job_env(cluster, work, out, f"train.max_steps={max_steps} train.epochs=10", LAUNCHER=launcher))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(train_steps(metrics)) >= 3):
        info = cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"{info}\n{log.read_text()[-4000:] if log.exists() else ''}"
        assert time.monotonic() < deadline, "no training steps logged in 240 s"
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    info = cluster.wait(job_id, timeout=420)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-6000:]}"
    assert info["Restarts"] == "1", info
    assert f"launcher {launcher}," in text

    assert "received SIGUSR1: forwarding SIGUSR1" in text, text[-4000:]
    first_run = text.split("restart 1:")[0]
    if launcher == "srun":
        assert "training step exited with code 75" in first_run, (
            "the trainer did not exit 75 after SIGUSR1 (preemption contract: finish the step, checkpoint, "
            "exit 75)\n" + first_run[-6000:])
    else:
        assert "--rdzv-backend c10d" in first_run
    assert f"requeued job {job_id}" in first_run, first_run[-6000:]
    saved = [int(k) for k in re.findall(r"\[checkpoint\] step (\d+) ->", text)]
    resumed = [int(k) for k in re.findall(r"\[checkpoint\] resumed from \S+ at step (\d+)", text)]
    assert saved and 3 <= saved[0] < max_steps, f"preemption checkpoint steps: {saved}"
    assert resumed == [saved[0]], f"resumed at {resumed}, preemption checkpoint at {saved[0]}"
    assert text.count("restart 0:") == 1 and text.count("restart 1:") == 1

    steps = train_steps(metrics)
    assert steps == list(range(1, max_steps + 1)), f"steps not continuous across the requeue: {steps}"


def _dry_run(cluster: Cluster, **env) -> list[str]:
    base = {k: v for k, v in cluster.env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    base.update(PYTHON="/opt/py/bin/python", CONFIG="configs/demo.yaml", OVERRIDES="train.lr=1e-5  loss.beta=0.2",
                OUTPUT_DIR="/runs/my run", SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="n[1-2]",
                SLURM_CPUS_ON_NODE="8", DRY_RUN="1", DS_ACCELERATOR="cpu")  # a CPU cluster: no GPU to ask srun for
    base.update(env)
    proc = cluster.run("bash", str(SBATCH_SCRIPT), env=base)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def test_dry_run_prints_the_launch_command(cluster):
    train = ["/opt/py/bin/python", "-m", "orpo_ds", "train", "--config", "configs/demo.yaml",
             "train.output_dir=/runs/my run", "train.lr=1e-5", "loss.beta=0.2"]
    # The master address is n1's NodeAddr from `scontrol -o show node` (n1 itself does not resolve).
    srun = ["srun", "--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--cpus-per-task=4", "--kill-on-bad-exit=0",
            "--wait=300", "--export=ALL,MASTER_ADDR=127.0.0.1,MASTER_PORT=24242"]
    assert _dry_run(cluster, GPUS_PER_NODE="2") == srun + train

    torchrun = ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=8", "--kill-on-bad-exit=0",
                "--wait=300", "--export=ALL,MASTER_ADDR=127.0.0.1,MASTER_PORT=24242",
                "/opt/py/bin/python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:24242", "--rdzv-id", "4242",
                "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "300",
                "-m", *train[2:]]
    assert _dry_run(cluster, GPUS_PER_NODE="2", LAUNCHER="torchrun") == torchrun
