"""Fixtures for the multi-process tier: a tiny model folder, synthetic data, and a launcher helper."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.models import save_tiny_llama
from tests.helpers.network import free_port
from tests.helpers.synthetic import write_pairs
from tests.helpers.tokenizers import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    return env


def launch_command(args: list[str], ranks: int) -> list[str]:
    """``deepspeed --num_gpus N --module orpo_ds ...`` for N > 1, else ``python -m orpo_ds ...``."""
    if ranks > 1:
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                str(free_port()), "--module", "orpo_ds", *args]
    return [sys.executable, "-m", "orpo_ds", *args]


def launch(args: list[str], *, ranks: int, timeout: int = 600, cwd: Path = REPO,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the trainer to completion in its own session (a fault-injected SIGKILL of its process group
    must not reach pytest)."""
    proc = subprocess.run(launch_command(args, ranks), cwd=cwd, env={**run_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + "\n" + proc.stderr[-6000:])
    return proc


def wait_for_logged_steps(out: Path, count: int, timeout: float = 300) -> None:
    """Poll ``out/metrics.jsonl`` until it holds ``count`` training steps (or the timeout passes)."""
    from orpo_ds.metrics import read_metrics

    deadline = time.time() + timeout
    path = out / "metrics.jsonl"
    while time.time() < deadline and not (path.exists() and sum("loss" in m for m in read_metrics(path)) >= count):
        time.sleep(0.2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama", make_tiny_tokenizer())


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_pairs(root / "train.jsonl", 96, seed=0),
            "eval": write_pairs(root / "eval.jsonl", 16, seed=1)}


def base_overrides(model: Path, data: dict[str, Path], out: Path, **extra) -> list[str]:
    values = {
        "model.name_or_path": model, "data.train": data["train"], "data.max_length": 64,
        "data.cache_dir": out.parent / "tok-cache", "train.output_dir": out, "train.micro_batch_tokens": 256,
        "train.lr": 1e-3, "train.seed": 0, "deepspeed.config": Path(__file__).parent / "zero3_tiny.json",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
