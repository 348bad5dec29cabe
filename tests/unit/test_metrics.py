"""metrics.jsonl (``orpo_ds.metrics``): what a resume keeps of it, what a fresh start sets aside, how torn
lines are read, and that every line is strict JSON. tests/unit/test_nothing_lost.py has the plain
torn-last-line and fresh-start cases; these are the rest."""

from __future__ import annotations

import json
import math
import os

import pytest

from orpo_ds.metrics import MetricsLog, read_metrics


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# eval records at step 0 (before the first step) and at step 2, then training steps: what a run logs
RECORDS = [{"step": 0, "eval/loss": 2.5}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.8},
           {"step": 2, "eval/loss": 2.1}, {"step": 3, "loss": 1.6}, {"step": 4, "loss": 1.5},
           {"step": 5, "loss": 1.4}]


def test_truncate_after_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_tail(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(RECORDS) + '{"step": 6, "lo')
    MetricsLog(path).truncate_after(2)
    # in order, byte for byte what the run wrote, steps 3.. gone (they run again), the torn line gone
    assert path.read_text() == _lines(RECORDS[:4])
    assert "torn line 8" in capsys.readouterr().err


def test_truncate_after_the_last_step_keeps_everything(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(RECORDS))
    MetricsLog(path).truncate_after(5)
    assert read_metrics(path) == RECORDS


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_truncate_after_that_fails_midway_leaves_the_old_log_whole(tmp_path, monkeypatch, fails):
    """A full disk (the flush to disk fails) or a failed rename: the log the run had is still there, unchanged,
    and the next resume (the requeued job) truncates it normally."""
    path = tmp_path / "metrics.jsonl"
    before = _lines(RECORDS)
    path.write_text(before)

    def broken(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, fails, broken)
        with pytest.raises(OSError, match="No space left"):
            MetricsLog(path).truncate_after(2)
    assert path.read_text() == before
    MetricsLog(path).truncate_after(2)
    assert read_metrics(path) == RECORDS[:4]


def test_truncate_after_on_a_non_main_rank_or_without_a_log_writes_nothing(tmp_path):
    # ranks other than 0 share the folder: only rank 0 may rewrite the log
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(RECORDS))
    MetricsLog(path, enabled=False).truncate_after(2)
    assert read_metrics(path) == RECORDS
    # a checkpoint without a log beside it (the log was removed by hand): nothing to truncate, nothing created
    MetricsLog(tmp_path / "absent.jsonl").truncate_after(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_start_fresh_moves_neither_an_empty_log_nor_a_non_main_ranks(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # an empty log (a run killed before its first logged step) holds nothing to keep: it stays, and no
    # empty metrics.prev.jsonl replaces one kept from an earlier run
    (tmp_path / "metrics.prev.jsonl").write_text(_lines(RECORDS[:1]))
    path.touch()
    MetricsLog(path).start_fresh()
    assert path.read_text() == ""
    assert read_metrics(tmp_path / "metrics.prev.jsonl") == RECORDS[:1]
    # only rank 0 moves a log (test_nothing_lost checks that it does)
    path.write_text(_lines(RECORDS))
    MetricsLog(path, enabled=False).start_fresh()
    assert read_metrics(path) == RECORDS
    assert read_metrics(tmp_path / "metrics.prev.jsonl") == RECORDS[:1]


def test_read_metrics_skips_torn_lines_anywhere_with_their_line_number(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    # a torn line mid-file (a run killed mid-write, then requeued and appending) and one cut inside a UTF-8
    # character: both skipped, every whole record kept; blank lines are not torn lines
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n\n{"step": 3}\n{"step": 4, "note": "\xc3')
    assert read_metrics(path) == [{"step": 1}, {"step": 3}]
    err = capsys.readouterr().err
    assert "torn line 2" in err and "torn line 5" in err
    assert err.count("torn line") == 2


def test_write_makes_non_finite_floats_null_and_returns_the_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    record = {"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "log_odds_ratio": -float("inf"),
              "acc": 0.75, "tokens": 12, "attention": "sdpa"}
    returned = log.write(record)
    log.write({"step": 2, "loss": 1.5})
    # strict JSON: json.loads would accept NaN / Infinity tokens, other readers (jq, pandas) do not
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
            for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "loss": None, "grad_norm": None, "log_odds_ratio": None, "acc": 0.75, "tokens": 12,
                     "attention": "sdpa"}, {"step": 2, "loss": 1.5}]
    # the caller gets its own values back (the run's summary keeps the NaN it saw)
    assert returned is record and math.isnan(returned["loss"])


def test_write_on_a_non_main_rank_writes_nothing(tmp_path):
    record = {"step": 1, "loss": 1.0}
    assert MetricsLog(tmp_path / "metrics.jsonl", enabled=False).write(record) is record
    assert not (tmp_path / "metrics.jsonl").exists()
