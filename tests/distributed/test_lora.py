"""LoRA through peft without ZeRO-3 (one process, ZeRO-0): the loss curve of peft's own model, adapters
as the only trained state, and the exports (adapter folder, merged model). The 2-rank ZeRO-3 run against
the same reference is the ``zero3-lora`` case of ``test_trainer.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from orpo_ds.metrics import read_metrics
from orpo_ds.packing import layout_for, schedule_run
from tests.distributed.conftest import REPO, launch, run_env
from tests.distributed.test_trainer import _reference_setup, _step_pairs, lora_reference_model, train_steps
from tests.helpers.reference import reference_train

STEPS = 5
LORA = {"model.lora.r": 4, "model.lora.alpha": 8, "model.lora.target_modules": "[q_proj,v_proj,down_proj]",
        "train.lr": 2e-2, "train.max_steps": STEPS, "train.lr_schedule": "constant", "train.max_grad_norm": 1.0,
        "deepspeed.config": REPO / "ds_configs" / "zero0.json", "train.sample_prompts": 1}


@pytest.fixture(scope="module")
def lora_run(tiny_model, synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    overrides, cfg, tokenizer, pairs = _reference_setup(tiny_model, synthetic_data["train"], out,
                                                        {**LORA, "data.eval": synthetic_data["eval"]})
    proc = launch(["train", *overrides], ranks=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, overrides, cfg, tokenizer, pairs


def _export(run_dir, out, *flags):
    return subprocess.run([sys.executable, "-m", "orpo_ds", "export", "--checkpoint", str(run_dir), "--out", str(out),
                           *flags], cwd=REPO, env=run_env(), capture_output=True, text=True)


def _batch(vocab_size):
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def test_single_process_lora_matches_peft_reference(lora_run, tiny_model):
    out, _, cfg, tokenizer, pairs = lora_run
    t = cfg.train
    plan = schedule_run(pairs, t.micro_batch_tokens, 1, t.grad_accum, seed=t.seed, epochs=t.epochs, max_steps=STEPS,
                    layout=layout_for(False))
    model = lora_reference_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                                      attn_implementation="sdpa"), cfg)
    ref = reference_train(model, _step_pairs(plan, pairs), beta=cfg.loss.beta, nll_on_prompt=False,
                          pad_id=tokenizer.pad_token_id, lr=t.lr, max_grad_norm=1.0, total_steps=STEPS,
                          schedule_factor=lambda s: 1.0)
    got = train_steps(read_metrics(out / "metrics.jsonl"))
    assert len(got) == STEPS
    for g, r in zip(got, ref, strict=True):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-4), (g["step"], g["loss"], r["loss"])
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3)
    assert got[-1]["loss"] != pytest.approx(got[0]["loss"], rel=1e-3)


def test_only_adapters_get_gradients_optimizer_state_and_updates(lora_run, tiny_model):
    out = lora_run[0]
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter), sorted(adapter)[:4]
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj", "down_proj"}
    assert all(float(v.abs().sum()) > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at 0: it moved
    adapter_params = sum(v.numel() for v in adapter.values())
    held = json.loads((out / "summary.json").read_text())["rank0_state_bytes"]
    assert held["gradients"] == 4 * adapter_params  # fp32 gradients of the adapters, nothing else
    # AdamW's two moments (fp32 ZeRO-0 keeps no master copy) plus its per-tensor step counters
    assert 8 * adapter_params <= held["optimizer"] <= 8 * adapter_params + 1024
    # The base weights in the checkpoint, head and embeddings included, are the model's own, bit for bit.
    from orpo_ds.engine import consolidate_zero_checkpoint

    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    state = consolidate_zero_checkpoint(ckpt / "ds")
    original = load_file(tiny_model / "model.safetensors")
    prefix = "causal_lm.base_model.model."
    for name, value in original.items():
        key = prefix + name
        if key not in state:  # an adapted layer keeps its weight under base_layer
            key = prefix + name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], value), name


def test_adapter_folder_loads_with_peft_and_merged_export_equals_base_plus_adapter(lora_run, tiny_model, tmp_path):
    out = lora_run[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = _batch(base.config.vocab_size)
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "final")(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # the adapters change the model

    proc = _export(out, tmp_path / "adapter")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_checkpoint, live = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "adapter", out / "final"))
    assert from_checkpoint.keys() == live.keys()
    for key in live:
        torch.testing.assert_close(from_checkpoint[key], live[key], rtol=0, atol=0)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model)

    proc = _export(out, tmp_path / "merged", "--merge")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_resume_with_other_lora_settings_is_refused(lora_run, tmp_path):
    out, overrides = lora_run[:2]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = launch(["train", *overrides, "model.lora.r=8"], ranks=1)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "model.lora" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
