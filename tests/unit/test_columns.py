"""Tokenized pairs as columns (issue 35): TokenizedPairs against lists of TokenizedPair, its fingerprint and
duplicate search against the per-pair definitions, the epoch plan from length columns against a naive
best-fit packer over Python lists, and the cache's memory-mapped pairs."""

from __future__ import annotations

import hashlib
import json
import random
import re

import numpy as np
import pytest

from orpo_ds.data import TokenizedPair, TokenizedPairs, duplicate_pairs
from orpo_ds.data.columns import TokenColumn
from orpo_ds.packing import DEFAULT_LAYOUT, SharedPromptLayout, schedule_epoch, schedule_steps
from orpo_ds.packing.schedule import epoch_rows


def random_pairs(n: int, seed: int, *, max_prompt: int = 9, max_response: int = 7) -> list[TokenizedPair]:
    """Odd shapes: empty prompts, one-token responses after a prompt, repeated lengths, shuffled pair ids."""
    rng = random.Random(seed)
    pair_ids = rng.sample(range(10 * n + 1), n)
    pairs = []
    for pid in pair_ids:
        prompt = tuple(rng.randrange(50) for _ in range(rng.randrange(max_prompt + 1)))
        low = 1 if prompt else 2
        chosen, rejected = (tuple(rng.randrange(50) for _ in range(rng.randrange(low, max_response + 1)))
                            for _ in range(2))
        pairs.append(TokenizedPair(pid, prompt, chosen, rejected))
    return pairs


# ------------------------------------------------------------------------------------- naive references


def reference_fingerprint(pairs: list[TokenizedPair]) -> str:
    """The per-pair definition that checkpoints record (what pairs_fingerprint computed before columns)."""
    h = hashlib.sha256()
    for p in pairs:
        header = [p.pair_id, len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)]
        h.update(np.asarray(header + [*p.prompt_ids, *p.chosen_ids, *p.rejected_ids], dtype=np.int64).tobytes())
    return h.hexdigest()


def reference_duplicates(pairs: list[TokenizedPair]) -> list[int]:
    seen, repeats = set(), []
    for p in pairs:
        key = (p.prompt_ids, p.chosen_ids, p.rejected_ids)
        if key in seen:
            repeats.append(p.pair_id)
        seen.add(key)
    return repeats


def reference_epoch_rows(pairs: list[TokenizedPair], budget: int, *, seed: int, epoch: int, layout=DEFAULT_LAYOUT):
    """Best-fit decreasing over Python lists, scanning every open bin: the item goes to the bin with the
    least free room that holds it; among equals, the bin that reached that room last (the packer keeps a
    stack per free size). Same seeded shuffles as the packer."""
    sizes = [layout.num_tokens(p) for p in pairs]
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(len(pairs)).tolist()
    order = sorted(shuffled, key=lambda i: -sizes[i])  # Python's sort is stable
    bins, free, stamp, clock = [], [], [], 0
    for i in order:
        fits = [b for b in range(len(bins)) if 0 < free[b] and sizes[i] <= free[b]]
        if fits:
            b = min(fits, key=lambda b: (free[b], -stamp[b]))
            bins[b].append(i)
            free[b] -= sizes[i]
        else:
            b = len(bins)
            bins.append([i])
            free.append(budget - sizes[i])
            stamp.append(0)
        clock += 1
        stamp[b] = clock
    bins = [bins[b] for b in rng.permutation(len(bins)).tolist()]
    return bins, [sum(sizes[i] for i in b) for b in bins]


# ------------------------------------------------------------------------------------------- columns


def test_columns_hold_the_pairs_they_were_made_of():
    pairs = random_pairs(40, seed=1)
    columns = TokenizedPairs.from_pairs(pairs)
    assert len(columns) == 40 and list(columns) == pairs and columns == pairs and columns[-1] == pairs[-1]
    assert columns.lengths("prompt_ids").tolist() == [len(p.prompt_ids) for p in pairs]
    assert columns.lengths("chosen_ids").dtype == np.int64
    assert all(c.values.dtype == np.int32 for c in columns.columns.values())
    assert columns != pairs[:-1] and columns != [*pairs[:-1], pairs[0]]
    assert TokenizedPairs.from_pairs([]) == [] and len(TokenizedPairs.from_pairs([])) == 0


def test_the_docstring_example():
    pairs = TokenizedPairs.from_pairs([TokenizedPair(7, (11, 12), (21, 2), (31, 2)),
                                       TokenizedPair(9, (), (5, 6, 2), (8, 2))])
    assert pairs.pair_id.tolist() == [7, 9]
    assert pairs.columns["prompt_ids"].values.tolist() == [11, 12]
    assert pairs.columns["prompt_ids"].offsets.tolist() == [0, 2, 2]
    assert pairs.columns["chosen_ids"].values.tolist() == [21, 2, 5, 6, 2]
    assert pairs.columns["chosen_ids"].offsets.tolist() == [0, 2, 5]


def test_arrow_round_trip_keeps_a_sliced_base():
    pairs = random_pairs(30, seed=2)
    table = TokenizedPairs.from_pairs(pairs).to_arrow().slice(5, 20)  # offsets no longer start at 0
    columns = TokenizedPairs.from_arrow(table)
    assert columns.columns["chosen_ids"].offsets[0] > 0 and columns == pairs[5:25]
    assert columns == TokenizedPairs.from_pairs(pairs[5:25])
    assert columns.fingerprint == reference_fingerprint(pairs[5:25])


def test_bad_columns_are_refused_with_the_reason():
    good = TokenizedPairs.from_pairs(random_pairs(3, seed=3))
    cols = dict(good.columns)
    with pytest.raises(ValueError, match="missing \\['rejected_ids'\\]"):
        TokenizedPairs(good.pair_id, {k: v for k, v in cols.items() if k != "rejected_ids"})
    chosen = cols["chosen_ids"]
    with pytest.raises(ValueError, match="chosen_ids: values must be 1-D int32"):
        TokenizedPairs(good.pair_id, {**cols, "chosen_ids": TokenColumn(chosen.values.astype(np.int64),
                                                                        chosen.offsets)})
    with pytest.raises(ValueError, match="offsets have shape \\(3,\\), expected \\(4,\\)"):
        TokenizedPairs(good.pair_id, {**cols, "chosen_ids": TokenColumn(chosen.values, chosen.offsets[:-1])})
    backwards = chosen.offsets.copy()
    backwards[1], backwards[2] = backwards[2], backwards[1] - 1
    with pytest.raises(ValueError, match="non-decreasing"):
        TokenizedPairs(good.pair_id, {**cols, "chosen_ids": TokenColumn(chosen.values, backwards)})
    empty = TokenColumn(np.zeros(0, np.int32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=f"pair {good.pair_id[0]}: chosen_ids has 0 token"):
        TokenizedPairs(good.pair_id, {**cols, "chosen_ids": empty})
    with pytest.raises(TypeError, match="must be an int"):
        good[0:2]
    with pytest.raises(IndexError, match="out of range for 3 pairs"):
        good[3]


@pytest.mark.parametrize("chunk_pairs", [1, 3, 8192])
def test_fingerprint_is_the_per_pair_definition(chunk_pairs):
    pairs = random_pairs(50, seed=4)
    columns = TokenizedPairs.from_pairs(pairs)
    assert columns._compute_fingerprint(chunk_pairs=chunk_pairs) == reference_fingerprint(pairs)
    assert TokenizedPairs.from_pairs([]).fingerprint == reference_fingerprint([])


def test_duplicates_match_the_per_pair_search():
    pairs = random_pairs(200, seed=5, max_prompt=2, max_response=3)  # small: many equal lengths, some repeats
    planted = [TokenizedPair(10_000 + k, p.prompt_ids, p.chosen_ids, p.rejected_ids)
               for k, p in enumerate(pairs[::17])]
    data = pairs + planted
    random.Random(0).shuffle(data)
    expected = reference_duplicates(data)
    assert len(expected) >= len(planted) and duplicate_pairs(data) == expected
    assert duplicate_pairs(TokenizedPairs.from_pairs(data)) == expected and duplicate_pairs([]) == []


# ----------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("layout", [DEFAULT_LAYOUT, SharedPromptLayout()])
@pytest.mark.parametrize(("n", "budget", "seed", "epoch"), [(1, 40, 0, 0), (2, 40, 3, 1), (37, 40, 1, 2),
                                                            (120, 64, 7, 0), (120, 32, 2, 5)])
def test_plan_from_columns_is_the_naive_packers(layout, n, budget, seed, epoch):
    pairs = random_pairs(n, seed=seed)
    expected = reference_epoch_rows(pairs, budget, seed=seed, epoch=epoch, layout=layout)
    columns = TokenizedPairs.from_pairs(pairs)
    assert epoch_rows(columns, budget, seed=seed, epoch=epoch, layout=layout) == expected
    plan = schedule_epoch(columns, budget, 3, 2, seed=seed, epoch=epoch, layout=layout)
    dealt = schedule_steps(expected[1], 3, 2)
    assert [step.rows for step in plan] == [[[expected[0][b] if b is not None else None for b in slots]
                                             for slots in step] for step in dealt]


def test_a_pair_over_budget_is_named_by_its_pair_id():
    pairs = TokenizedPairs.from_pairs([TokenizedPair(41, (1,), (2,), (3,)), TokenizedPair(42, (1,) * 9, (2,), (3,))])
    with pytest.raises(ValueError, match="pair 42 has 20 tokens"):
        epoch_rows(pairs, 10, seed=0, epoch=0)


# ---------------------------------------------------------------------------------------- the cache


def test_cached_pairs_are_memory_mapped_and_carry_their_fingerprint(tmp_path):
    from orpo_ds.data.cache import load_cache, save_cache
    from orpo_ds.data.validate import DropReport

    pairs = TokenizedPairs.from_pairs(random_pairs(25, seed=6))
    report = DropReport(25, 25, [])
    assert save_cache(tmp_path / "k", "k", {"for": "people"}, pairs, report)
    loaded, again = load_cache(tmp_path / "k", "k")
    assert loaded == pairs and again == report
    assert json.loads((tmp_path / "k" / "meta.json").read_text())["fingerprint"] == reference_fingerprint(list(pairs))
    assert loaded._fingerprint == pairs.fingerprint  # read from meta.json, not recomputed
    for column in loaded.columns.values():  # views of the mapped file: read-only, owned by Arrow
        assert not column.values.flags.owndata and not column.values.flags.writeable


def test_cached_pairs_carry_their_duplicates_so_a_hit_reads_no_ids(tmp_path, monkeypatch):
    # Finding the duplicates reads every candidate pair's ids: on a mapped million-pair cache most of the
    # file's pages (benchmarks/RESULTS.md, issue 35). A hit reads them from meta.json instead.
    from orpo_ds.data import columns as columns_lib
    from orpo_ds.data.cache import load_cache, save_cache
    from orpo_ds.data.validate import DropReport

    base = random_pairs(12, seed=7)
    listed = base + [TokenizedPair(100 + i, p.prompt_ids, p.chosen_ids, p.rejected_ids) for i, p in enumerate(base[:3])]
    pairs = TokenizedPairs.from_pairs(listed)
    assert save_cache(tmp_path / "k", "k", {}, pairs, DropReport(15, 15, []))
    assert json.loads((tmp_path / "k" / "meta.json").read_text())["duplicates"] == [100, 101, 102]

    def read_ids(*args):
        raise AssertionError("the ids were read to find the duplicates")

    monkeypatch.setattr(columns_lib, "_find_duplicates", read_ids)
    loaded, _ = load_cache(tmp_path / "k", "k")
    assert duplicate_pairs(loaded) == [100, 101, 102]

    # A cache folder written before the duplicates were recorded is still a hit: they are found on use.
    monkeypatch.undo()
    meta = json.loads((tmp_path / "k" / "meta.json").read_text())
    del meta["duplicates"]
    (tmp_path / "k" / "meta.json").write_text(json.dumps(meta))
    older, _ = load_cache(tmp_path / "k", "k")
    assert older == pairs and duplicate_pairs(older) == [100, 101, 102]


@pytest.mark.parametrize("shared_cache", [True, False], ids=["shared-filesystem", "node-local-cache"])
def test_a_two_node_job_tokenizes_once_on_a_shared_filesystem_and_once_per_node_otherwise(shared_cache, tmp_path,
                                                                                        monkeypatch):
    """2 nodes x 2 ranks through train.load_pairs, each rank in its turn (the collective between turns is
    stood in for by running the ranks in that order): rank 0 first, node 1's first rank next, the others
    last. With the cache folder on a shared filesystem only rank 0 tokenizes; with a folder per node,
    each node's first rank does."""
    from types import SimpleNamespace

    import orpo_ds.data.tokenize as tokenize_module
    from orpo_ds import distributed as dist_lib
    from orpo_ds.config import DataConfig
    from orpo_ds.train import data_turn, load_pairs
    from tests.helpers.synthetic import write_pairs
    from tests.helpers.tokenizers import make_tiny_tokenizer

    source, tokenizer = str(write_pairs(tmp_path / "pairs.jsonl", 20)), make_tiny_tokenizer()
    tokenized, run_map = [], tokenize_module._run_map
    monkeypatch.setattr(tokenize_module, "_run_map", lambda *a, **k: tokenized.append(1) or run_map(*a, **k))
    monkeypatch.setattr(dist_lib, "raise_if_any_rank_failed", lambda error, elsewhere: None if error is None
                        else pytest.fail(f"a rank failed: {error}"))
    ranks = [SimpleNamespace(rank=r, node=r // 2, is_main=r == 0, local_rank=r % 2) for r in range(4)]
    assert [data_turn(info) for info in ranks] == [0, 2, 1, 2]
    loaded = {}
    for info in sorted(ranks, key=data_turn):
        cache = tmp_path / ("cache" if shared_cache else f"node{info.node}-cache")
        cfg = SimpleNamespace(data=DataConfig(train=source, max_length=64, cache_dir=str(cache)))
        loaded[info.rank] = load_pairs(source, tokenizer, cfg, info)
    assert len(tokenized) == (1 if shared_cache else 2)
    assert all(list(pairs) == list(loaded[0]) for pairs in loaded.values()) and len(loaded[0]) == 20


def test_a_cached_data_file_is_not_parsed_again(tmp_path, monkeypatch):
    """Ranks reading the cache pay for the mapped pairs only: the records are not loaded on a hit."""
    import orpo_ds.data.io as data_io
    from orpo_ds.config import DataConfig
    from orpo_ds.data import load_records, tokenize_data_section
    from tests.helpers.synthetic import write_pairs
    from tests.helpers.tokenizers import make_tiny_tokenizer

    source = str(write_pairs(tmp_path / "pairs.jsonl", 20))
    data, tokenizer = DataConfig(train=source, max_length=64, cache_dir=str(tmp_path / "cache")), make_tiny_tokenizer()
    first, report = tokenize_data_section(source, tokenizer, data, progress=False)
    monkeypatch.setattr(data_io, "load_records", lambda *a, **k: pytest.fail("a cache hit parsed the records"))
    again, again_report = tokenize_data_section(source, tokenizer, data, progress=False)
    assert again == first and again_report == report and len(first) == 20
    assert data_io.file_fingerprint(source) == load_records(source)._fingerprint


def test_tokenizing_reports_its_rate_in_pairs_per_second_and_a_cache_hit_does_not(tmp_path, capsys):
    from orpo_ds.config import DataConfig
    from orpo_ds.data import tokenize_data_section
    from tests.helpers.synthetic import write_pairs
    from tests.helpers.tokenizers import make_tiny_tokenizer

    source = str(write_pairs(tmp_path / "pairs.jsonl", 20))
    data, tokenizer = DataConfig(train=source, max_length=64, cache_dir=str(tmp_path / "cache")), make_tiny_tokenizer()
    tokenize_data_section(source, tokenizer, data, progress=True)
    out, err = capsys.readouterr()
    assert re.search(r"\[data\] tokenized 20 pairs in [\d.]+ s: [\d,]+ pairs/s \(1 process\)", err)
    assert "pairs/s" not in out  # stdout may be JSON (orpo-ds plan --json)
    tokenize_data_section(source, tokenizer, data, progress=True)
    assert "pairs/s" not in capsys.readouterr().err


def test_file_fingerprint_is_load_records_for_parquet_and_none_elsewhere(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orpo_ds.data import load_records
    from orpo_ds.data.io import file_fingerprint

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}), path)
    assert file_fingerprint(str(path)) == load_records(str(path))._fingerprint
    assert file_fingerprint(str(tmp_path)) is None and file_fingerprint(str(tmp_path / "missing.jsonl")) is None
