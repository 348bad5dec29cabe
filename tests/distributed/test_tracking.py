"""``train.report_to``: TensorBoard and W&B (offline) beside metrics.jsonl, from rank 0 of a 2-rank run,
read back with TensorBoard's own reader and W&B's record format (tests/helpers/wandb_log.py)."""

from __future__ import annotations

import glob

import pytest

from orpo_ds.metrics import read_metrics
from tests.distributed.conftest import base_overrides, launch
from tests.helpers import wandb_log


@pytest.fixture(scope="module")
def tracked_run(tiny_model, synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    proc = launch(["train", *base_overrides(tiny_model, synthetic_data, out, **{
        "data.eval": synthetic_data["eval"], "train.max_steps": 3, "train.sample_prompts": 0,
        "train.report_to": "[tensorboard,wandb]", "train.run_name": "tiny-orpo", "train.wandb_project": "orpo-tests"})],
        ranks=2, env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, read_metrics(out / "metrics.jsonl")


def _numbers(record):
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_tensorboard_events_hold_every_logged_number_and_the_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = tracked_run
    files = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    assert len({f.rsplit(".", 2)[-2] for f in files}) == 1  # one process wrote them: rank 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert {r["step"] for r in records if "loss" in r} == {1, 2, 3} and any("eval/loss" in r for r in records)
    for record in records:
        for key, value in _numbers(record).items():
            assert scalars[key][record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, record["step"])
    # The resolved config as hyperparameters (torch's writer puts them in an event file of their own).
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = {}
    for path in files:
        accumulator = EventAccumulator(path).Reload()
        try:
            content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        except KeyError:  # the file of scalars
            continue
        hparams.update(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    assert hparams["train.micro_batch_tokens"].number_value == 256
    assert hparams["train.report_to"].string_value == '["tensorboard", "wandb"]'
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"micro_batch_tokens": 256' in config_text


def test_wandb_offline_run_holds_the_metrics_config_project_and_name(tracked_run):
    out, records = tracked_run
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1  # rank 0 only
    info = wandb_log.run_info(runs[0])
    assert (info["project"], info["name"]) == ("orpo-tests", "tiny-orpo")
    assert info["id"] == (out / "wandb" / "run_id").read_text().strip()  # what a requeued run resumes
    rows = {}
    for row in wandb_log.history(runs[0]):
        rows.setdefault(row["_step"], {}).update(row)
    for record in records:
        for key, value in _numbers(record).items():
            assert rows[record["step"]][key] == pytest.approx(value, rel=1e-9), (key, record["step"])
    config = wandb_log.config(runs[0])
    assert config["train"]["micro_batch_tokens"] == 256 and config["loss"]["beta"] == 0.1
