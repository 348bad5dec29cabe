"""Export's own checks (orpo_ds/export.py) that run before any consolidation; the exports themselves are
tested end to end in tests/distributed/test_checkpoint.py and test_lora.py."""

from __future__ import annotations

import pytest

from orpo_ds.config import ConfigError
from orpo_ds.export import parse_shard_size


@pytest.mark.parametrize("text, size", [("5GB", 5_000_000_000), ("500MB", 500_000_000), ("2GiB", 2 * 2**30)])
def test_shard_sizes_read_as_transformers_reads_them(text, size):
    assert parse_shard_size(text) == size


@pytest.mark.parametrize("text", ["lots", "100", "-5GB", "0GB", ""])
def test_anything_else_is_a_config_error_naming_the_flag(text):
    with pytest.raises(ConfigError, match="--max-shard-size"):
        parse_shard_size(text)
