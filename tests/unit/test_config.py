"""Config: YAML + dotted overrides, validation errors that name the key, DeepSpeed JSON injection."""

import subprocess
import sys

import pytest
import torch

from orpo_ds.config import ConfigError, TypedOverride, load_config, parse_override
from orpo_ds.ds_config import build_ds_config, read_ds_config

BASE = ["model.name_or_path=some/model", "data.train=pairs.jsonl"]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  train: t.jsonl\n  max_length: 256\n"
                    "train:\n  lr: 1.0e-5\n  micro_batch_tokens: 4096\n")
    cfg = load_config(path, ["train.lr=2e-5", "loss.beta=0.5", "loss.nll_on_prompt=true",
                             "train.adam_betas=[0.9,0.95]"])
    assert cfg.model.name_or_path == "m"
    assert cfg.data.max_length == 256
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.loss.beta == 0.5 and cfg.loss.nll_on_prompt is True
    assert cfg.train.adam_betas == (0.9, 0.95)
    assert cfg.train.micro_batch_tokens == 4096
    # The later of two overrides of one key wins (`make train` puts its CPU layout before the user's).
    cfg = load_config(path, ["deepspeed.config=ds_configs/zero0.json", "deepspeed.config=ds_configs/zero3.json"])
    assert cfg.deepspeed.config == "ds_configs/zero3.json"


@pytest.mark.parametrize("override, key", [
    ("train.lr=-1", "train.lr"),
    ("train.lrr=1", "train.lrr"),
    ("trian.lr=1", "trian"),
    ("model.attn_implementation=magic", "model.attn_implementation"),
    ("train.grad_accum=1.5", "train.grad_accum"),
    ("loss.nll_on_prompt=maybe", "loss.nll_on_prompt"),
    ("data.max_length=8192", "train.micro_batch_tokens"),
    ("data.truncation=right", "data.truncation"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + [override])
    assert str(err.value).startswith(key), str(err.value)


def test_missing_required_keys_say_how_to_fix():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_config(None, ["data.train=x.jsonl"])
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, ["model.name_or_path=m"])


def test_override_parsing():
    assert parse_override("train.lr=1e-5") == ("train.lr", TypedOverride(1e-5, "1e-5"))
    assert parse_override("data.train=a/b.c.jsonl") == ("data.train", TypedOverride("a/b.c.jsonl", "a/b.c.jsonl"))
    assert parse_override("train.max_steps=10") == ("train.max_steps", TypedOverride(10, "10"))
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_cli_config_error_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "orpo_ds", "train", "model.name_or_path=m", "data.train=x",
                           "train.lr=0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json", "zero0.json"])
def test_ds_configs_inject_batch_clipping_precision(name):
    cfg = load_config(None, BASE + ["train.grad_accum=3", "train.max_grad_norm=0.5"])
    ds = build_ds_config(read_ds_config(f"ds_configs/{name}"), cfg.train, world_size=4, dtype=torch.bfloat16)
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_ds_config_conflicts_are_errors():
    cfg = load_config(None, BASE + ["train.grad_accum=2"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_ds_config({"gradient_accumulation_steps": 4}, cfg.train, 1, torch.float32)
    with pytest.raises(ConfigError, match="bf16"):
        build_ds_config({"bf16": {"enabled": True}}, cfg.train, 1, torch.float32)
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config({"optimizer": {"type": "Adam"}}, cfg.train, 1, torch.float32)
    ok = build_ds_config({"gradient_accumulation_steps": "auto", "gradient_clipping": 1.0}, cfg.train, 2, torch.float32)
    assert ok["gradient_accumulation_steps"] == 2 and ok["train_batch_size"] == 4


def test_missing_ds_config_file():
    with pytest.raises(ConfigError, match="deepspeed.config"):
        read_ds_config("ds_configs/nope.json")


def test_report_to_names_known_trackers_and_a_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    from orpo_ds import tracking

    base = ["model.name_or_path=m", "data.train=pairs.jsonl"]
    assert load_config(None, base).train.report_to == ()
    cfg = load_config(None, [*base, "train.report_to=[tensorboard,wandb]"])
    assert cfg.train.report_to == ("tensorboard", "wandb")
    assert load_config(None, [*base, "train.report_to=wandb"]).train.report_to == ("wandb",)
    with pytest.raises(ConfigError, match="^train.report_to: 'mlflow' is not one of tensorboard, wandb"):
        load_config(None, [*base, "train.report_to=[mlflow]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^train.report_to: wandb needs the wandb package; pip install "
                                          r"'orpo-ds\[tracking\]'"):
        tracking.check_installed(cfg)


# ------------------------------------------------------------- issue 32 item 14 and the smaller items

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path, capsys):
    from orpo_ds import cli

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 1024
    with pytest.raises(ConfigError, match=r"line 2: YAML aliases \(\*a\) are not accepted") as err:
        load_config(bomb)
    assert len(str(err.value)) < 300
    out = tmp_path / "orpo.yaml"
    assert cli.main(["config", "from-trl", str(bomb), "--out", str(out)]) == 2  # the importers read it alike
    assert not out.exists() and "YAML aliases" in capsys.readouterr().err


def test_a_key_given_twice_is_warned_about(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name_or_path: m\ndata:\n  train: a.jsonl\n  train: b.jsonl\n")
    assert load_config(config).data.train == "b.jsonl"
    assert "line 5: key 'train' is given twice; the last value is used" in capsys.readouterr().err


@pytest.mark.parametrize("override, key, expected", [
    ("train.output_dir=0755", "output_dir", "0755"),  # YAML 1.1 reads an octal 493
    ("train.output_dir=12:30", "output_dir", "12:30"),  # and a sexagesimal 750
    ("train.run_name=1e3", "run_name", "1e3"),
    ("train.resume=true", "resume", "auto"), ("train.resume=false", "resume", "false"),
    ("train.seed=0755", "seed", 493),  # an integer key still takes YAML's number
])
def test_a_string_key_keeps_the_override_as_typed(override, key, expected):
    assert getattr(load_config(None, BASE + [override]).train, key) == expected


def test_output_dir_expands_the_home_folder():
    import os

    assert load_config(None, BASE + ["train.output_dir=~/runs/x"]).train.output_dir == os.path.expanduser("~/runs/x")
