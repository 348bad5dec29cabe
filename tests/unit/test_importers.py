"""``orpo-ds config from-trl`` / ``from-axolotl`` on sample configs in the peers' documented key names:
what maps where, every unmapped key reported with a reason, the YAML loads as ``orpo-ds train`` loads
it, and nothing is ever overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orpo_ds import cli
from orpo_ds.config import ConfigError, LoraConfig, load_config

# TRL's ORPOConfig (TrainingArguments names) plus the model, dataset and LoRA arguments of its scripts.
TRL = {
    "model_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "dataset_name": "trl-lib/ultrafeedback_binarized",
    "learning_rate": 8.0e-6, "num_train_epochs": 2, "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 8, "max_length": 1024, "max_prompt_length": 512, "beta": 0.2,
    "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 5, "warmup_ratio": 0.1, "bf16": True,
    "gradient_checkpointing": True, "logging_steps": 10, "save_steps": 100, "output_dir": "Qwen2-0.5B-ORPO",
    "report_to": ["wandb", "mlflow"], "use_peft": True, "lora_r": 32, "lora_alpha": 16,
    "lora_target_modules": ["q_proj", "v_proj"], "deepspeed": "ds_configs/zero3.json", "push_to_hub": True,
    "seed": 42, "max_grad_norm": 0.5,
}

# axolotl's ORPO example layout (rl: orpo, orpo_alpha, chat_template datasets, QLoRA).
AXOLOTL = {
    "base_model": "meta-llama/Meta-Llama-3-8B-Instruct", "load_in_4bit": True, "rl": "orpo", "orpo_alpha": 0.1,
    "chat_template": "chatml", "datasets": [{"path": "argilla/ultrafeedback-binarized-preferences-cleaned",
                                             "type": "chat_template.argilla"}, {"path": "other/dataset"}],
    "test_datasets": [{"path": "data/held_out.jsonl", "split": "test"}],
    "val_set_size": 0.0, "output_dir": "./outputs/out", "sequence_len": 2048, "sample_packing": False,
    "adapter": "qlora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_linear": True,
    "wandb_project": "orpo-llama", "wandb_name": "first", "gradient_accumulation_steps": 4, "micro_batch_size": 2,
    "num_epochs": 1, "optimizer": "paged_adamw_8bit", "lr_scheduler": "cosine", "learning_rate": "2e-5",
    "bf16": "auto", "gradient_checkpointing": True, "flash_attention": True, "warmup_steps": 10,
    "deepspeed": "deepspeed_configs/zero2.json",
}


def _import(tmp_path, capsys, kind, source, *, suffix=".yaml"):
    path = tmp_path / f"{kind}{suffix}"
    path.write_text(json.dumps(source) if suffix == ".json" else yaml.safe_dump(source))
    out = tmp_path / "orpo.yaml"
    code = cli.main(["config", f"from-{kind}", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    unmapped = dict(line.removeprefix("unmapped ").split(": ", 1) for line in err.splitlines()
                    if line.startswith("unmapped "))
    return load_config(out), unmapped, err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_trl_config_maps_the_common_keys_and_reports_the_rest(tmp_path, capsys, suffix):
    cfg, unmapped, err = _import(tmp_path, capsys, "trl", TRL, suffix=suffix)
    assert cfg.model.name_or_path == "Qwen/Qwen2-0.5B-Instruct"
    assert cfg.data.train == "trl-lib/ultrafeedback_binarized" and cfg.data.max_length == 1024
    assert (cfg.loss.beta, cfg.train.lr, cfg.train.epochs, cfg.train.grad_accum) == (0.2, 8e-6, 2, 8)
    assert cfg.train.micro_batch_tokens == 4 * 2 * 1024  # 4 pairs of two 1024-token sequences
    assert (cfg.train.lr_schedule, cfg.train.warmup_steps) == ("constant", 5)
    assert (cfg.train.precision, cfg.model.gradient_checkpointing) == ("auto", True)
    assert (cfg.train.log_steps, cfg.train.save_steps, cfg.train.seed, cfg.train.max_grad_norm) == (10, 100, 42, 0.5)
    assert cfg.train.output_dir == "Qwen2-0.5B-ORPO" and cfg.deepspeed.config == "ds_configs/zero3.json"
    assert cfg.train.report_to == ("wandb",)
    assert cfg.model.lora == LoraConfig(r=32, alpha=16.0, target_modules=("q_proj", "v_proj"))
    assert set(unmapped) == {"max_prompt_length", "warmup_ratio", "report_to", "push_to_hub"}
    assert "mlflow" in unmapped["report_to"] and "warmup_steps" in unmapped["warmup_ratio"]
    assert unmapped["push_to_hub"] == "no orpo-ds equivalent"
    assert "4 key(s) not mapped" in err


def test_trl_lora_keys_without_use_peft_are_reported_not_applied(tmp_path, capsys):
    source = {k: v for k, v in TRL.items() if k != "use_peft"}
    cfg, unmapped, _ = _import(tmp_path, capsys, "trl", source)
    assert cfg.model.lora is None
    assert {"lora_r", "lora_alpha", "lora_target_modules"} <= set(unmapped)
    assert "use_peft" in unmapped["lora_r"]


def test_axolotl_orpo_config_maps_the_common_keys_and_reports_the_rest(tmp_path, capsys):
    cfg, unmapped, _ = _import(tmp_path, capsys, "axolotl", AXOLOTL)
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.data.train == "argilla/ultrafeedback-binarized-preferences-cleaned"
    assert cfg.data.eval == "data/held_out.jsonl" and cfg.data.max_length == 2048
    assert (cfg.loss.beta, cfg.train.lr, cfg.train.lr_schedule, cfg.train.warmup_steps) == (0.1, 2e-5, "cosine", 10)
    assert (cfg.train.micro_batch_tokens, cfg.train.grad_accum, cfg.train.epochs) == (2 * 2 * 2048, 4, 1)
    assert cfg.model.attn_implementation == "flash_attention_2" and cfg.model.gradient_checkpointing
    assert cfg.model.lora == LoraConfig(r=8, alpha=16.0, dropout=0.05, target_modules=("all-linear",),
                                        load_in_4bit=True)
    assert (cfg.train.report_to, cfg.train.wandb_project, cfg.train.run_name) == (("wandb",), "orpo-llama", "first")
    assert cfg.deepspeed.config == "deepspeed_configs/zero2.json"
    assert set(unmapped) == {"datasets[0]", "datasets[1:]", "chat_template", "val_set_size", "sample_packing",
                             "optimizer"}
    assert "chat_template.argilla" in unmapped["datasets[0]"] and "1 more" in unmapped["datasets[1:]"]


def test_an_axolotl_config_that_is_not_orpo_exits_2(tmp_path, capsys):
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({**AXOLOTL, "rl": "dpo"}))
    assert cli.main(["config", "from-axolotl", str(path)]) == 2
    assert "rl: 'dpo'" in capsys.readouterr().err


def test_a_value_orpo_ds_cannot_take_is_reported_with_the_reason(tmp_path, capsys):
    cfg, unmapped, _ = _import(tmp_path, capsys, "trl", {**TRL, "lr_scheduler_type": "polynomial",
                                                         "num_train_epochs": 1.5})
    assert cfg.train.lr_schedule == "cosine" and cfg.train.epochs == 1  # the defaults stand
    assert "orpo-ds schedules are" in unmapped["lr_scheduler_type"]
    assert "whole epochs" in unmapped["num_train_epochs"]


def test_a_mapped_value_that_fails_validation_exits_2_naming_the_key(tmp_path, capsys):
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({**TRL, "beta": -1}))
    assert cli.main(["config", "from-trl", str(path)]) == 2
    assert "loss.beta: must be >= 0" in capsys.readouterr().err


def test_missing_model_and_dataset_are_left_for_the_user_and_train_names_them(tmp_path, capsys):
    source = {k: v for k, v in TRL.items() if k not in ("model_name_or_path", "dataset_name")}
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(source))
    assert cli.main(["config", "from-trl", str(path), "--out", str(tmp_path / "orpo.yaml")]) == 0
    err = capsys.readouterr().err
    assert "missing model.name_or_path: required" in err and "missing data.train: required" in err
    with pytest.raises(ConfigError, match="^model.name_or_path: is empty"):
        load_config(tmp_path / "orpo.yaml")


def test_out_is_never_replaced_and_stdout_is_the_default(tmp_path, capsys):
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(TRL))
    existing = tmp_path / "mine.yaml"
    existing.write_text("my edits\n")
    assert cli.main(["config", "from-trl", str(path), "--out", str(existing)]) == 2
    assert existing.read_text() == "my edits\n" and "exists" in capsys.readouterr().err
    assert cli.main(["config", "from-trl", str(path)]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["loss"]["beta"] == 0.2


def test_an_unreadable_source_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- list\n")
    assert cli.main(["config", "from-trl", str(path)]) == 2
    assert "expected a mapping" in capsys.readouterr().err
    assert cli.main(["config", "from-trl", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------- the peers' own files (issue 32 item 15)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "importers"


@pytest.mark.parametrize("kind, name", [("axolotl", "axolotl-mistral-qlora-orpo.yml"),
                                        ("trl", "trl-orpo-script.yaml")])
def test_the_peers_own_example_configs_import_validate_and_plan(tmp_path, capsys, kind, name):
    """axolotl's example left `key:` empty in many places: the old importer wrote the string "None" for
    them (train.wandb_project, train.run_name, and deepspeed.config, a path that does not exist)."""
    out = tmp_path / "orpo.yaml"
    assert cli.main(["config", f"from-{kind}", str(FIXTURES / name), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    text = out.read_text()
    assert "None" not in text and "null" not in text, text
    cfg = load_config(out)
    assert cfg.deepspeed.config == "ds_configs/zero3.json"  # the default, not "None"
    unmapped = dict(line.removeprefix("unmapped ").split(": ", 1) for line in err.splitlines()
                    if line.startswith("unmapped "))
    if kind == "axolotl":
        assert cfg.loss.nll_on_prompt is False and "train_on_inputs" not in unmapped
        assert cfg.train.wandb_project == "orpo-ds" and cfg.train.run_name is None
        assert unmapped["wandb_project"] == "empty in the source; orpo-ds's default applies"
        assert cfg.model.lora is not None and cfg.model.lora.load_in_4bit
    else:
        assert cfg.model.lora is not None and cfg.model.lora.r == 16 and cfg.train.max_steps == 1000
        assert {"max_prompt_length", "torch_dtype", "hub_model_id"} <= unmapped.keys()
    # The planner takes it as train would (the model swapped for a preset of the same class: no hub here).
    assert cli.main(["plan", "--config", str(out), "model.name_or_path=llama-3-8b", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["fits"], bool)
