"""`orpo-ds plan` end to end, in process: the figures it prints, their consistency, and bad input."""

import json
import math
from pathlib import Path

import pytest

from orpo_ds.cli import main
from orpo_ds.config import load_config
from orpo_ds.ds_config import ZeroSetup
from orpo_ds.plan import Cluster, make_plan
from orpo_ds.plan.memory import model_states
from orpo_ds.plan.shapes import load_model_config, model_shape
from tests.helpers.models import save_tiny_llama
from tests.helpers.synthetic import write_pairs
from tests.helpers.tokenizers import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path, model="llama-3-8b", data="missing.jsonl", ds="ds_configs/zero3.json", checkpointing=False,
            **train):
    lines = [f"model: {{name_or_path: {model}, gradient_checkpointing: {str(checkpointing).lower()}}}",
             f"data: {{train: {tmp_path / data}, max_length: 1024, cache_dir: {tmp_path / 'cache'}}}",
             f"deepspeed: {{config: {REPO / ds}}}"]
    if train:
        lines.append("train: {" + ", ".join(f"{k}: {v}" for k, v in train.items()) + "}")
    path = tmp_path / "plan.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plan_json(capsys, *argv):
    assert main(["plan", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_figures_without_data(tmp_path, capsys):
    out = _plan_json(capsys, "--config", _config(tmp_path), "--nodes", 2, "--gpus-per-node", 8)
    assert out["model_state_bytes"] == out["parameter_bytes"] + out["gradient_bytes"] + out["optimizer_bytes"]
    # 8.03B parameters in bf16 on 16 GPUs: 2 + 2 + 12 bytes each, over 16 (plus the small persistent ones)
    assert out["model_state_bytes"] == pytest.approx(16 * out["total_params"] / 16, rel=0.01)
    assert out["epoch_s"] is None and out["steps_per_epoch"] is None  # no data: no epoch time
    assert out["step_s"] == pytest.approx(out["step_compute_s"] + out["step_communication_s"]
                                          + out["step_sequence_parallel_s"])
    assert out["sequence_parallel_bytes_per_step"] == out["step_sequence_parallel_s"] == 0  # no SP: no all-to-all
    assert out["fits"] == (out["peak_bytes"] <= out["gpu_memory_bytes"])
    assert "sbatch --nodes=2 --gpus-per-node=8 launch/orpo.sbatch" in out["sbatch"]
    assert out["mfu"] == 0.4 and "assumed" in out["mfu_source"]


def test_text_report_names_every_term(tmp_path, capsys):
    assert main(["plan", "--config", str(_config(tmp_path))]) == 0
    text = capsys.readouterr().out
    for term in ("parameters", "gradients", "optimizer states", "activations saved", "chunked head backward",
                 "full [M, V] logits", "communication buffers", "verdict:", "largest train.micro_batch_tokens",
                 "fewest GPUs", "step ", "sbatch"):
        assert term in text, term


def test_epoch_time_from_the_data_through_the_trainers_packer(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "tiny", make_tiny_tokenizer())
    write_pairs(tmp_path / "pairs.jsonl", 64, seed=0)
    cfg = _config(tmp_path, model=model, data="pairs.jsonl", micro_batch_tokens=4096, grad_accum=2)
    out = _plan_json(capsys, "--config", cfg, "--gpus-per-node", 2)
    assert out["steps_per_epoch"] >= 1 and out["epoch_s"] == pytest.approx(out["steps_per_epoch"] * out["step_s"])
    assert 0 < out["row_tokens"] <= 4096
    assert "64 pairs" in out["rows_source"]
    assert 0 < out["head_fraction"] < 1


def test_the_largest_row_fits_and_one_more_token_does_not(tmp_path):
    cfg = load_config(_config(tmp_path))
    plan = make_plan(cfg, Cluster.of("H100", nodes=1, gpus_per_node=8))
    row = plan.largest_row_tokens
    assert row is not None
    fraction, gpus, memory = plan.rows.head_fraction, plan.cluster.gpus, plan.cluster.memory_bytes
    assert plan.planner.budget(gpus, row, fraction, False).peak <= memory
    assert plan.planner.budget(gpus, row + 1, fraction, False).peak > memory


def test_a_70b_model_on_one_gpu_does_not_fit_and_the_fewest_gpus_do(tmp_path):
    cfg = load_config(_config(tmp_path, model="llama-3-70b", checkpointing=True))
    one = make_plan(cfg, Cluster.of("H100", nodes=1, gpus_per_node=1))
    assert not one.fits and one.fewest_gpus and one.fewest_gpus > 1
    nodes = math.ceil(one.fewest_gpus / 8)
    assert make_plan(cfg, Cluster.of("H100", nodes=nodes, gpus_per_node=8)).fits


def test_offload_moves_optimizer_and_parameters_to_the_host(tmp_path):
    shape = model_shape(load_model_config("llama-3-8b"))
    zero = {name: ZeroSetup.from_ds_config(json.loads((REPO / f"ds_configs/{name}.json").read_text()))
            for name in ("zero3", "zero3_offload")}
    on_gpu = model_states(shape, zero["zero3"], 8, 2)
    offload = zero["zero3_offload"]
    moved = model_states(shape, offload, 8, 2)
    assert moved.optimizer == 0 and moved.parameters == 0
    assert moved.host == on_gpu.optimizer + on_gpu.parameters
    assert moved.gradients == on_gpu.gradients


def test_zero3_traffic_is_two_gathers_and_a_reduce_scatter_per_micro_batch(tmp_path):
    cfg = load_config(_config(tmp_path, grad_accum=3))
    plan = make_plan(cfg, Cluster.of("H100", nodes=1, gpus_per_node=8))
    p = plan.planner.shape.total_params
    assert plan.traffic_bytes == pytest.approx(3 * 3 * 2 * p * 7 / 8)
    assert make_plan(cfg, Cluster.of("H100", nodes=1, gpus_per_node=1)).traffic_bytes == 0


def test_freeze_tuning_counts_only_the_trained_layers(tmp_path):
    shape = model_shape(load_model_config("llama-3-8b"), trainable_layers=4)
    assert shape.trainable_layers == 4 and not shape.head_trainable
    assert shape.trainable_params == 4 * shape.decoder_layer_params + 4096  # + the final norm


@pytest.mark.parametrize("argv, named", [
    (["--gpu", "B300X"], "--gpu"),
    (["--nodes", "0"], "--nodes"),
    (["--gpu", "500"], "--gpu-memory-gb"),
    (["--mfu", "1.5"], "--mfu"),
    (["model.name_or_path=/no/such/model"], "model.name_or_path"),
])
def test_bad_input_exits_2_naming_the_option(tmp_path, capsys, argv, named):
    assert main(["plan", "--config", str(_config(tmp_path)), *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_write_ds_config_writes_a_new_file_and_never_replaces_one(tmp_path, capsys):
    target = tmp_path / "ds.json"
    assert main(["plan", "--config", str(_config(tmp_path)), "--write-ds-config", str(target)]) == 0
    assert json.loads(target.read_text()) == json.loads((REPO / "ds_configs/zero3.json").read_text())
    target.write_text("mine")
    assert main(["plan", "--config", str(_config(tmp_path)), "--write-ds-config", str(target)]) == 2
    assert target.read_text() == "mine"
