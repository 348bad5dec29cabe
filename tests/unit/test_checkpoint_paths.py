"""Locating checkpoints from the paths users pass to train.resume and `orpo-ds export`."""

import pytest

from orpo_ds.checkpoint import LATEST, STATE_FILE, ResumeError, find_checkpoint, resolve_resume


def _ckpt(root, step):
    d = root / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    (d / STATE_FILE).write_text("{}")
    return d


def test_find_checkpoint_accepts_step_folder_output_dir_and_checkpoints_folder(tmp_path):
    _ckpt(tmp_path, 3)
    newest = _ckpt(tmp_path, 6)
    (tmp_path / "checkpoints" / LATEST).write_text(newest.name)
    (tmp_path / "checkpoints" / ".tmp-step-000009").mkdir()  # torn write: never chosen
    assert find_checkpoint(newest) == newest
    assert find_checkpoint(tmp_path) == newest
    assert find_checkpoint(tmp_path / "checkpoints") == newest
    assert resolve_resume(str(tmp_path / "checkpoints"), "elsewhere") == newest
    assert resolve_resume("auto", tmp_path) == newest
    with pytest.raises(ResumeError, match="train.overwrite=true"):  # a fresh start would mix two runs
        resolve_resume("false", tmp_path)
    assert resolve_resume("false", tmp_path, overwrite=True) is None
    assert resolve_resume("false", tmp_path / "new-run") is None


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    assert resolve_resume("auto", tmp_path) is None  # a fresh start, not an error
    with pytest.raises(ResumeError, match="no complete orpo-ds checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)
