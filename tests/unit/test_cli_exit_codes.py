"""The command line's exit codes (``orpo_ds.cli``), in process: each error a command raises becomes its
documented exit code and a one-line message on stderr, without a traceback; anything else propagates, so
Python prints its traceback and exits 1. The codes are the interface that launch/orpo.sbatch and users'
scripts read (75 means "requeue and rerun"), so they are spelled out here rather than imported.
End-to-end cases through real failures (a bad config value, a missing model folder, an unsafe --out) are
in tests/unit/test_config.py and tests/unit/test_nothing_lost.py."""

from __future__ import annotations

import pytest

from orpo_ds import cli
from orpo_ds.checkpoint import ResumeError
from orpo_ds.config import ConfigError
from orpo_ds.data import DataError
from orpo_ds.preemption import EXIT_INTERRUPTED, Preempted
from orpo_ds.safe_files import UnsafeOutputError
from orpo_ds.step import NonFiniteLossError

TRAIN = ["train", "model.name_or_path=m", "data.train=pairs.jsonl"]


def _train_raises(monkeypatch, exc: BaseException | None) -> None:
    """``orpo-ds train`` whose run stops with ``exc`` (or finishes, for None); the config is not read."""
    def run_training(cfg):
        if exc is not None:
            raise exc

    monkeypatch.setattr(cli, "load_config", lambda path, overrides: object())
    monkeypatch.setattr("orpo_ds.train.run_training", run_training)


@pytest.mark.parametrize("exc, code, line", [
    (None, 0, ""),
    (ConfigError("train.lr: must be > 0"), 2, "orpo-ds: config error: train.lr: must be > 0\n"),
    (DataError("data.train: no such file"), 2, "orpo-ds: data error: data.train: no such file\n"),
    (UnsafeOutputError("train.output_dir is in use"), 2, "orpo-ds: output error: train.output_dir is in use\n"),
    (NonFiniteLossError("3 consecutive steps had a non-finite loss"), 3,
     "orpo-ds: 3 consecutive steps had a non-finite loss\n"),
    (ResumeError("the checkpoint was made with other data"), 3, "orpo-ds: the checkpoint was made with other data\n"),
    (Preempted("SIGTERM: saved step 4"), 75, "orpo-ds: SIGTERM: saved step 4\n"),
    (Preempted("Ctrl-C: saved step 4", EXIT_INTERRUPTED), 130, "orpo-ds: Ctrl-C: saved step 4\n"),
], ids=["ok", "config", "data", "output", "nonfinite", "resume", "preempted", "interrupted"])
def test_each_error_maps_to_its_exit_code_and_one_line_on_stderr(monkeypatch, capsys, exc, code, line):
    _train_raises(monkeypatch, exc)
    assert cli.main(TRAIN) == code
    out, err = capsys.readouterr()
    assert err == line and out == ""  # the whole of stderr: the message, no traceback


def test_the_mapping_holds_for_eval_and_export(monkeypatch, capsys):
    """Each command runs inside the same mapping: eval's bad data and export's unsafe --out exit 2 too."""
    def bad_data(*args, **kwargs):
        raise DataError("--data: no preference pairs")

    def unsafe_out(*args, **kwargs):
        raise UnsafeOutputError("--out '.' is or contains the run")

    monkeypatch.setattr("orpo_ds.evaluate.evaluate_model_dir", bad_data)
    monkeypatch.setattr("orpo_ds.export.export_checkpoint", unsafe_out)
    assert cli.main(["eval", "--model", "m", "--data", "d.jsonl"]) == 2
    assert capsys.readouterr().err == "orpo-ds: data error: --data: no preference pairs\n"
    assert cli.main(["export", "--checkpoint", "run", "--out", "."]) == 2
    assert capsys.readouterr().err == "orpo-ds: output error: --out '.' is or contains the run\n"


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: an illegal memory access"), KeyboardInterrupt()],
                         ids=["bug", "ctrl-c-outside-the-loop"])
def test_an_unexpected_exception_propagates_unmapped(monkeypatch, capsys, exc):
    """A bug, or a Ctrl-C before the loop's own handler is installed, is not dressed up as a known error:
    it reaches the interpreter, which prints the traceback and exits 1 (for a Ctrl-C: ends by SIGINT)."""
    _train_raises(monkeypatch, exc)
    with pytest.raises(type(exc)) as raised:
        cli.main(TRAIN)
    assert raised.value is exc
    assert capsys.readouterr().err == ""
