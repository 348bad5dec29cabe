"""A shortened `make train`: the real model and the real pairs, 2 ranks, ZeRO-3, a couple of steps."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo_ds.metrics import read_metrics
from orpo_ds.tools.assets import prepare_assets
from tests.distributed.conftest import REPO, launch, run_env


def test_demo_config_runs_on_real_assets_and_export_reloads(tmp_path):
    paths = prepare_assets(REPO / "assets")
    out = tmp_path / "demo"
    proc = launch(["train", "--config", str(REPO / "configs" / "demo.yaml"), f"train.output_dir={out}",
                   f"model.name_or_path={paths.model_dir}", f"data.train={paths.train_file}",
                   f"data.eval={paths.eval_file}", "train.max_steps=2", "data.max_length=128",
                   "train.micro_batch_tokens=512", "train.compare_train_pairs=8", "train.sample_prompts=2",
                   "train.sample_new_tokens=8", f"data.cache_dir={tmp_path / 'tok'}"], ranks=2, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept 260/260 pairs" in proc.stdout and "kept 40/40 pairs" in proc.stdout
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(m["pairs"] > 0 for m in steps)
    assert (out / "curves.png").stat().st_size > 0
    # the seen and held-out tables, with intervals, and the answers before and after
    seen, held_out = proc.stdout.index("seen: 8 training pairs"), proc.stdout.index("held-out: 40 pairs")
    assert seen < held_out < proc.stdout.index("Intervals: paired bootstrap")
    assert proc.stdout.count("| mean log-odds |") == 2 and "95% interval" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for name in ("seen", "held-out"):
        c = summary["comparison"][name]["mean log-odds"]
        assert c["low"] <= c["change"] <= c["high"]
    samples = (out / "samples.md").read_text()
    assert samples.count("**Before training:**") == 2 == samples.count("**After training:**")
    assert samples.count("**The pair's chosen answer:**") == 2 and "## Prompt 2" in proc.stdout

    exported = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "orpo_ds", "export", "--checkpoint", str(out), "--out", str(exported)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    live = AutoModelForCausalLM.from_pretrained(out / "final").eval()  # gathered from the engine at the end
    offline = AutoModelForCausalLM.from_pretrained(exported).eval()  # consolidated from the ZeRO-3 checkpoint
    original = AutoModelForCausalLM.from_pretrained(paths.model_dir).eval()
    with torch.no_grad():
        a, b, c = live(ids).logits, offline(ids).logits, original(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)  # training changed the model
