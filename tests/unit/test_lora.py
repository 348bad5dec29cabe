"""LoRA in process (orpo_ds.lora): the config keys, what is refused and why, and the policy's chunked
head over a peft model against peft's own full-logits forward, on values and adapter gradients. The
trained runs (ZeRO-3 on 2 ranks, ZeRO-0, exports) are in tests/distributed/test_lora.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds import cli
from orpo_ds.config import ConfigError, LoraConfig, load_config
from orpo_ds.lora import apply_lora, quantization_config, rebuild_from_state, save_adapter, trains_head
from orpo_ds.model import PolicyWithChunkedHead
from tests.helpers.network import free_port

BASE = ["model.name_or_path=m", "data.train=pairs.jsonl"]
REPO = Path(__file__).resolve().parents[2]


def _tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))


def test_lora_keys_from_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: m\n  lora:\n    r: 8\n    target_modules: [q_proj, v_proj]\n"
                    "data:\n  train: pairs.jsonl\n")
    assert load_config(path).model.lora == LoraConfig(r=8, target_modules=("q_proj", "v_proj"))
    cfg = load_config(path, ["model.lora.alpha=4", "model.lora.target_modules=all-linear"])
    assert (cfg.model.lora.alpha, cfg.model.lora.target_modules) == (4.0, ("all-linear",))
    assert load_config(path, ["model.lora=null"]).model.lora is None
    assert load_config(None, [*BASE, "model.lora.r=2"]).model.lora == LoraConfig(r=2)  # a group from nothing
    assert load_config(None, BASE).model.lora is None  # off unless asked for


@pytest.mark.parametrize("overrides, key", [
    (["model.lora.r=0"], "model.lora.r"),
    (["model.lora.dropout=1.0"], "model.lora.dropout"),
    (["model.lora.rank=8"], "model.lora.rank"),
    (["model.lora=8"], "model.lora"),
    (["model.lora.target_modules=[all-linear,q_proj]"], "model.lora.target_modules"),
    (["model.lora.r=4", "model.trainable_layers=1"], "model.trainable_layers"),
    (["model.lora.r.x=1"], "model.lora.r.x"),
    (["model.lora.train_head=true", "model.lora.load_in_4bit=true"], "model.lora.train_head"),
])
def test_bad_lora_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}: "):
        load_config(None, [*BASE, *overrides])


def test_only_adapters_train_and_the_head_stays_frozen():
    model = apply_lora(_tiny_llama(tie=True), LoraConfig(r=4), "m")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear
    assert not model.get_output_embeddings().weight.requires_grad


@pytest.mark.parametrize("tie", [False, True])
def test_train_head_trains_the_heads_own_weight_beside_the_adapters(tie):
    model = apply_lora(_tiny_llama(tie), LoraConfig(r=4, train_head=True), "m")
    head = model.get_output_embeddings().weight
    assert head.requires_grad and trains_head(model)
    others = [n for n, p in model.named_parameters() if p.requires_grad and p is not head]
    assert others and all(".lora_A." in n or ".lora_B." in n for n in others)
    # Tied: the input embeddings are the head's tensor, so they train with it; untied they stay frozen.
    assert model.get_input_embeddings().weight.requires_grad is tie


@pytest.mark.parametrize("tie", [False, True])
def test_adapter_folder_with_a_trained_head_reloads_and_merges_with_peft(tmp_path, tie):
    from peft import PeftModel

    _tiny_llama(tie).save_pretrained(tmp_path / "base")
    model = apply_lora(_tiny_llama(tie), LoraConfig(r=4, train_head=True), str(tmp_path / "base"))
    with torch.no_grad():  # as if trained: the head and the adapters moved off the base
        model.get_output_embeddings().weight.add_(0.05)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, model.state_dict(), tmp_path / "adapter")
    rebuilt = rebuild_from_state(model.config, tmp_path / "adapter", model.state_dict(), torch.float32,
                                 train_head=True)  # as `orpo-ds export` rebuilds it from a checkpoint
    save_adapter(rebuilt, rebuilt.state_dict(), tmp_path / "rebuilt")
    for folder in ("adapter", "rebuilt"):
        loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-6, msg=folder)
            merged = loaded.merge_and_unload()
            merged.save_pretrained(tmp_path / f"{folder}-merged")
            reread = LlamaForCausalLM.from_pretrained(tmp_path / f"{folder}-merged")
            torch.testing.assert_close(reread(ids).logits, want, rtol=1e-5, atol=1e-6, msg=f"{folder} merged")
    # Without train_head the folder holds the adapters only, and the base's head is what loads.
    plain = apply_lora(_tiny_llama(tie), LoraConfig(r=4), str(tmp_path / "base"))
    save_adapter(plain, plain.state_dict(), tmp_path / "plain")
    from safetensors.torch import load_file

    assert all(".lora_" in k for k in load_file(tmp_path / "plain" / "adapter_model.safetensors"))


@pytest.mark.parametrize("tie", [False, True])
def test_an_adapter_on_the_head_is_refused(tie):
    # The chunked head reads lm_head.weight directly: an adapter there would be trained by nothing.
    with pytest.raises(ConfigError, match="model.lora.target_modules: 'lm_head' is the output head"):
        apply_lora(_tiny_llama(tie), LoraConfig(target_modules=("q_proj", "lm_head")), "m")


def test_unknown_target_modules_are_a_config_error():
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        apply_lora(_tiny_llama(), LoraConfig(target_modules=("no_such_proj",)), "m")


@pytest.mark.parametrize("on_gpu, stage, message", [
    (False, 0, "CUDA only"),
    (True, 3, "ZeRO-3 cannot partition 4-bit weights"),
])
def test_qlora_where_it_cannot_run_is_a_config_error(on_gpu, stage, message):
    with pytest.raises(ConfigError, match=f"model.lora.load_in_4bit: .*{message}"):
        quantization_config(LoraConfig(load_in_4bit=True), on_gpu=on_gpu, zero_stage=stage, dtype=torch.bfloat16)
    assert quantization_config(LoraConfig(), on_gpu=on_gpu, zero_stage=stage, dtype=torch.bfloat16) is None
    assert quantization_config(None, on_gpu=on_gpu, zero_stage=stage, dtype=torch.bfloat16) is None


@pytest.mark.parametrize("tie, train_head", [(False, False), (True, False), (False, True), (True, True)])
def test_chunked_head_over_peft_equals_peft_full_logits_on_values_and_adapter_gradients(tie, train_head):
    model = apply_lora(_tiny_llama(tie), LoraConfig(r=4, dropout=0.0, train_head=train_head), "m")
    for name, p in model.named_parameters():  # B starts at 0, which would hide the adapters' path
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.1)
    policy = PolicyWithChunkedHead(model, chunk_size=5)  # odd chunk: several chunks and a ragged last one
    ids = torch.randint(0, 96, (1, 23), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 3, 4, 4, 10, 21])  # a position may reach the head twice (a shared prompt)
    labels = torch.tensor([5, 7, 1, 9, 95, 0])
    got = policy(ids, torch.arange(23)[None], positions, labels).token_logps
    got_grads = torch.autograd.grad(got.sum(), [p for p in model.parameters() if p.requires_grad])

    logits = model(input_ids=ids, use_cache=False).logits[0].float()  # [T, V], peft's own forward
    want = torch.log_softmax(logits, -1)[positions, labels]
    want_grads = torch.autograd.grad(want.sum(), [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_merge_of_a_checkpoint_without_adapters_exits_2(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1}))
    code = cli.main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "merged"), "--merge"])
    err = capsys.readouterr().err
    assert code == 2 and "--merge" in err and "not LoRA adapters" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_plan_counts_the_adapters_the_trainer_trains():
    from orpo_ds.plan.shapes import model_shape

    lora = LoraConfig(r=4, target_modules=("q_proj", "down_proj"))
    model = apply_lora(_tiny_llama(), lora, "m")
    shape = model_shape(model.config, lora=lora)
    assert shape.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert not shape.head_trainable
    with_head = LoraConfig(r=4, target_modules=("q_proj", "down_proj"), train_head=True)
    shape = model_shape(model.config, lora=with_head)
    assert shape.head_trainable
    assert shape.trainable_params == sum(p.numel() for p in apply_lora(_tiny_llama(), with_head, "m").parameters()
                                         if p.requires_grad)


QLORA_DTYPES = """
import json, os
import torch, deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from orpo_ds.config import LoraConfig
from orpo_ds.lora import apply_lora, prepare_quantized_base

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
model.is_loaded_in_4bit = True  # the stand-in for bitsandbytes' load: peft upcasts only a k-bit model

def dtypes(module):
    kinds = {}
    for name, p in module.named_parameters():
        kind = "adapter" if "lora_" in name else "norm" if "norm" in name else "other"
        kinds.setdefault(kind, set()).add(str(p.dtype).removeprefix("torch."))
    return {k: sorted(v) for k, v in kinds.items()}

model = apply_lora(prepare_quantized_base(model, gradient_checkpointing=True), LoraConfig(r=4), "m")
result = {"peft": dtypes(model)}
for stage in (0, 2):
    ds_config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                                   model_parameters=[p for p in model.parameters() if p.requires_grad])
    # ZeRO-2's flat fp32 partitions, or ZeRO-0's per-parameter fp32 copies
    masters = getattr(optimizer, "single_partition_of_fp32_groups", None) or \\
        [p for group in optimizer.fp32_groups for p in group]
    result[f"zero{stage}"] = dtypes(engine.module) | {"masters": sorted({str(t.dtype).removeprefix("torch.")
                                                                         for t in masters})}
print("RESULT", json.dumps(result))
"""


def test_qlora_precision_is_what_the_docs_say_after_deepspeed_initialize():
    # peft upcasts a 4-bit model's other parameters to fp32; DeepSpeed's bf16 mode casts them all back
    # (docs/configuration.md, "Precision under QLoRA"). bitsandbytes is stood in for by the flag peft reads.
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-c", QLORA_DTYPES], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["peft"] == {"adapter": ["float32"], "norm": ["float32"], "other": ["float32"]}
    for stage in ("zero0", "zero2"):
        assert result[stage] == {"adapter": ["bfloat16"], "norm": ["bfloat16"], "other": ["bfloat16"],
                                 "masters": ["float32"]}, stage


def test_lora_reaches_a_mixture_of_experts_fused_experts_and_router_and_matches_peft():
    """transformers 5 keeps each layer's experts in fused 3-D parameters, which all-linear's nn.Linear
    search would miss; peft 0.21 wraps them (and the router) all the same. The policy over that model
    equals peft's own forward on values and on every adapter's gradient, the experts' included."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    base = MixtralForCausalLM(MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2))
    model = apply_lora(base, LoraConfig(r=4, dropout=0.0), "m")
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in adapters)
    assert any(".experts." in n for n in adapters) and any(".gate.lora_" in n for n in adapters), adapters
    for name, p in model.named_parameters():  # B starts at 0, which would hide the adapters' path
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 96, (1, 17), generator=torch.Generator().manual_seed(1))
    positions, labels = torch.tensor([0, 5, 9, 16]), torch.tensor([3, 7, 95, 0])
    got = PolicyWithChunkedHead(model, chunk_size=3)(ids, torch.arange(17)[None], positions, labels).token_logps
    trained = [p for p in model.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad(got.sum(), trained)
    want = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)[positions, labels]
    want_grads = torch.autograd.grad(want.sum(), trained)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(adapters, got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)
    experts = [g for name, g in zip(adapters, got_grads, strict=True) if ".experts." in name]
    assert all(g.abs().sum() > 0 for g in experts)
