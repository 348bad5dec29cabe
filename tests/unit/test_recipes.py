"""Every recipe in recipes/ is planned as its header says, and gets the verdict its header states, so no
recipe rots as the planner or the code change (issue 33)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from orpo_ds import cli
from orpo_ds.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
DEMO_SETTINGS = {("loss", "beta", 3.0), ("train", "lr", 1e-4), ("model", "trainable_layers", 10)}


def _header(path: Path) -> tuple[list[str], bool, float]:
    text = path.read_text()
    plan = re.search(r"^# plan: +orpo-ds plan --config \S+ (.*)$", text, re.M)
    verdict = re.search(r"^# planner verdict: (fits|does not fit), peak ([\d.]+) GiB", text, re.M)
    assert plan and verdict, f"{path.name}: the header must give the plan command and the planner's verdict"
    assert re.search(r"^# launch: ", text, re.M), f"{path.name}: the header must give the launch command"
    return shlex.split(plan.group(1)), verdict.group(1) == "fits", float(verdict.group(2))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"one_gpu_smoke.yaml", "llama3_8b_full_8xh100.yaml",
                                         "llama3_70b_full_8x8xh100.yaml", "llama3_70b_lora_8xh100.yaml",
                                         "qwen3_30b_a3b_8xh100.yaml", "llama31_8b_32k_sp8_8xh100.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_each_recipe_loads_and_the_planner_gives_the_verdict_its_header_states(recipe, capsys):
    cfg = load_config(recipe)
    for section, key, value in DEMO_SETTINGS:
        assert getattr(getattr(cfg, section), key) != value, f"{recipe.name}: {section}.{key} is the CPU demo's"
    args, fits, peak_gib = _header(recipe)
    assert cli.main(["plan", "--config", str(recipe), *args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is fits
    assert plan["peak_bytes"] / 2**30 == pytest.approx(peak_gib, abs=0.05), "update the header's peak"
