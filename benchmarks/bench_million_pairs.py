"""Start-up of the data path at scale (issue 35): time to the first micro-batch, peak RSS per rank, and the
node's total memory from PSS, for N synthetic pairs, 1 or 2 ranks, cold (tokenizing) or from the cache.

    PYTHONPATH=. python benchmarks/bench_million_pairs.py --pairs 100000 --ranks 1,2 --label after
    PYTHONPATH=/path/to/base/checkout python benchmarks/bench_million_pairs.py --pairs 100000 --label before

What runs: not ``orpo-ds train`` (no model, engine or process group) but the data path of its start-up, in
one process per rank, in the order ``orpo_ds.train.start_run`` runs it:

1. all ranks start and import at once; rank 0 tokenizes (``tokenize_data_section``, what ``load_pairs``
   calls, with a cache folder; a hit when cached), and only then do the other ranks read the cache;
2. every rank plans the run (``schedule_run``, one epoch), rank 0 looks for repeated pairs
   (``duplicate_pairs``, the start-up warning), every rank fingerprints the data (``pairs_fingerprint``,
   the resume identity), and builds its first micro-batch (``micro_batches`` of its slots of step 1);
3. each rank then holds its data until all ranks are there, the parent reads every rank's
   ``/proc/<pid>/smaps_rollup`` (PSS: a page shared by the ranks counts once in the sum), and they exit.

Reported per run: start-up (the parent's clock from starting rank 0 to the last rank's first batch), the
phases of each rank, each rank's peak RSS (``VmHWM``) and its RSS after imports ("base", so that RSS
above base is the data's cost), the sum of the ranks' PSS and RSS at the end, and each rank's anonymous
memory then. RSS counts the pages of the mapped cache file a rank has touched (the kernel maps pages around
each one read): shared, clean page cache, which PSS splits between the ranks and anonymous memory leaves out.

Data: standard-format records (prompt / chosen / rejected strings of random lowercase words), prompts
U[150, 350] and responses U[100, 380] bytes, so a pair is ~730 tokens with the tests' byte-level tokenizer
(no chat template: one token per byte, plus EOS per response). The file is made once per N under
``--work`` and reused. ``--seed-cache`` skips the cold runs and writes the cache from the text's bytes
instead (:func:`seed_cache`), for sizes too slow to tokenize on this machine. The code measured is the
``orpo_ds`` imported: set ``PYTHONPATH`` to the checkout to measure (the script prints which one ran).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# tests.helpers (the byte-level tokenizer); appended, so that PYTHONPATH decides which orpo_ds is measured.
sys.path.append(str(Path(__file__).resolve().parents[1]))

PROMPT_BYTES, RESPONSE_BYTES = (150, 350), (100, 380)
MAX_LENGTH, MICRO_BATCH_TOKENS = 1024, 4096


def write_records(path: Path, n: int, seed: int = 0) -> None:
    """``n`` standard-format records of random lowercase words, written in blocks (a million is ~730 MB)."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)  # ~1 space in 6
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            sizes = np.stack([rng.integers(*PROMPT_BYTES, count, endpoint=True),
                              rng.integers(*RESPONSE_BYTES, count, endpoint=True),
                              rng.integers(*RESPONSE_BYTES, count, endpoint=True)], axis=1)
            text = alphabet[rng.integers(0, len(alphabet), int(sizes.sum()))].tobytes().decode()
            at = 0
            for prompt, chosen, rejected in sizes.tolist():
                parts = []
                for size in (prompt, chosen, rejected):
                    parts.append(text[at:at + size])
                    at += size
                f.write(json.dumps({"prompt": parts[0], "chosen": parts[1], "rejected": parts[2]}) + "\n")
    tmp.rename(path)


def seed_cache(data: Path, cache: Path, check_rows: int = 500) -> None:
    """Write the tokenized-pairs cache of ``data`` without tokenizing, for N too large to tokenize here (a
    million pairs take ~15 minutes on this machine's 2 cores). The byte-level tokenizer (no chat template)
    gives every byte its own id, ``BYTE_OFFSET + byte``, and closes each response with EOS; these records
    are ASCII and fit ``MAX_LENGTH``, so the ids follow from the text's bytes, vectorised. The first
    ``check_rows`` are checked against ``tokenize_pairs``; a seeded cache under the wrong key would show as a
    tokenizing ``load_s``. Needs the columnar code (``TokenizedPairs``)."""
    import pyarrow as pa

    from orpo_ds.data import DropReport, TokenizedPairs, load_records, tokenize_pairs
    from orpo_ds.data.cache import cache_inputs, cache_key, save_cache
    from orpo_ds.data.columns import TokenColumn
    from orpo_ds.data.io import file_fingerprint
    from orpo_ds.data.validate import control_tokens
    from tests.helpers.tokenizers import BYTE_OFFSET, EOS_ID, make_tiny_tokenizer

    records, tokenizer = load_records(str(data)), make_tiny_tokenizer(chat_template=False)
    columns = {}
    for field, closed_by_eos in (("prompt", False), ("chosen", True), ("rejected", True)):
        text = records.data.table.column(field).combine_chunks()  # [N] utf-8 strings
        _, offset_buffer, data_buffer = text.buffers()
        width = np.int64 if pa.types.is_large_string(text.type) else np.int32
        offsets = np.frombuffer(offset_buffer, dtype=width)[text.offset:text.offset + len(text) + 1].astype(np.int64)
        raw = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0]:offsets[-1]]
        offsets -= offsets[0]
        ids = raw.astype(np.int32) + BYTE_OFFSET
        if closed_by_eos:  # an EOS after each response: pair i's ids end i + 1 places later
            ids = np.insert(ids, offsets[1:], np.int32(EOS_ID))
            offsets += np.arange(offsets.shape[0])
        columns[f"{field}_ids"] = TokenColumn(ids, offsets)
    pairs = TokenizedPairs(np.arange(len(records)), columns)
    checked = tokenize_pairs(records.select(range(check_rows)), tokenizer, max_length=MAX_LENGTH, progress=False)[0]
    if list(checked) != [pairs[i] for i in range(check_rows)]:
        raise RuntimeError("the seeded pairs differ from what tokenize_pairs gives")
    # The inputs tokenize_data_section keys a DataConfig of these settings (and the defaults) with.
    inputs = cache_inputs(file_fingerprint(str(data)), tokenizer, max_length=MAX_LENGTH, truncation="prompt_left",
                          fmt="auto", special_tokens="reject", control_tokens=control_tokens(tokenizer, False))
    key = cache_key(inputs)
    save_cache(cache / key, key, inputs, pairs, DropReport(len(pairs), len(pairs), []))


def status_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS) of this process, KiB. Not ``ru_maxrss``: Linux carries that over
    ``execve`` from the parent, which here may have held a million records while seeding the cache."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def smaps_kib(pid: int) -> dict[str, int]:
    """``Rss``, ``Pss`` and ``Anonymous`` (private memory: not the mapped cache file's pages) of a process,
    KiB, from ``/proc/<pid>/smaps_rollup``."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Anonymous"):
                out[key] = int(rest.split()[0])
    return out


def run_rank(args) -> None:
    """One rank: the data path of start-up; prints one JSON line, then holds its data until ``<sync>.release``
exists."""
    t0 = time.perf_counter()
    from orpo_ds.batch import micro_batches
    from orpo_ds.checkpoint import pairs_fingerprint
    from orpo_ds.config import DataConfig
    from orpo_ds.data import duplicate_pairs, tokenize_data_section
    from orpo_ds.packing import schedule_run
    from tests.helpers.tokenizers import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(chat_template=False)
    phases, base_kib = {"imports_s": time.perf_counter() - t0}, status_kib("VmRSS")

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 3)
        return now

    if args.rank:
        while not Path(f"{args.sync}.loaded0").exists():  # load_pairs' barrier after rank 0's turn
            time.sleep(0.02)
    t = time.perf_counter()
    section = DataConfig(train=args.data, max_length=MAX_LENGTH, cache_dir=args.cache)
    pairs, report = tokenize_data_section(args.data, tokenizer, section, progress=args.rank == 0 and not args.quiet)
    t = phase("load_s", t)
    Path(f"{args.sync}.loaded{args.rank}").touch()
    steps = schedule_run(pairs, MICRO_BATCH_TOKENS, args.world_size, 1, seed=0, epochs=1)
    t = phase("plan_s", t)
    if args.rank == 0:
        duplicate_pairs(pairs)
        t = phase("duplicates_s", t)
    fingerprint = pairs_fingerprint(pairs)
    t = phase("fingerprint_s", t)
    batch = micro_batches(steps[0].rows[args.rank], pairs, nll_on_prompt=False, pad_token_id=0)
    phase("first_batch_s", t)
    sample = [pairs[i] for i in range(min(len(pairs), 1000))]
    tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in sample) / len(sample)
    print(json.dumps({"rank": args.rank, "pairs": len(pairs), "kept": report.kept, "steps": len(steps),
                      "row_tokens": batch[0].num_tokens, "tokens_per_pair": round(tokens, 1),
                      "fingerprint": fingerprint[:12], "phases": phases, "total_s": round(time.perf_counter() - t0, 3),
                      "base_rss_mib": base_kib / 1024,
                      "peak_rss_mib": status_kib("VmHWM") / 1024}), flush=True)
    Path(f"{args.sync}.done{args.rank}").touch()
    while not Path(f"{args.sync}.release").exists():  # hold the data until the parent has read every rank's PSS
        time.sleep(0.05)


def wait_for(path: Path, procs: list[subprocess.Popen]) -> None:
    while not path.exists():
        for p in procs:
            if p.poll() not in (None, 0):
                raise RuntimeError(f"a rank failed (exit {p.returncode}): {p.stderr.read() if p.stderr else ''}")
        time.sleep(0.02)


def run_job(data: Path, cache: Path, ranks: int, sync: Path, quiet: bool) -> dict:
    """Run the ranks (they order their loading as ``load_pairs`` does); return their records and the node's
    PSS/RSS sums, read while every rank still holds its data."""
    for f in sync.parent.glob(sync.name + ".*"):
        f.unlink()
    common = [sys.executable, __file__, "--world-size", str(ranks), "--data", str(data), "--cache", str(cache),
              "--sync", str(sync)] + (["--quiet"] if quiet else [])
    start = time.perf_counter()
    procs = [subprocess.Popen([*common, "--rank", str(r)], stdout=subprocess.PIPE, text=True) for r in range(ranks)]
    for r in range(ranks):
        wait_for(Path(str(sync) + f".done{r}"), procs)
    startup = time.perf_counter() - start
    memory = [smaps_kib(p.pid) for p in procs]
    Path(str(sync) + ".release").touch()
    records = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"ranks": ranks, "startup_s": round(startup, 2), "records": records,
            "node_pss_mib": round(sum(m["Pss"] for m in memory) / 1024, 1),
            "node_rss_mib": round(sum(m["Rss"] for m in memory) / 1024, 1),
            "rank_anonymous_mib": [round(m["Anonymous"] / 1024, 1) for m in memory]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts, each run cold then cached")
    ap.add_argument("--work", default=".cache/bench_million_pairs", help="records and caches live here")
    ap.add_argument("--label", default="", help="a name for the code measured (its caches stay apart)")
    ap.add_argument("--quiet", action="store_true", help="no tokenizing progress bar")
    ap.add_argument("--seed-cache", action="store_true",
                    help="no cold run: the cached runs read a cache written by seed_cache (columnar code only)")
    for hidden in ("--data", "--cache", "--sync"):  # a rank's own arguments (run_job sets them; --sync: a
        # prefix of the marker files by which ranks and parent signal each other)
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        run_rank(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"pairs-{args.pairs}.jsonl"
    if not data.exists():
        write_records(data, args.pairs)
    import orpo_ds

    print(f"code: {Path(orpo_ds.__file__).parent}", flush=True)
    for ranks in (int(r) for r in args.ranks.split(",")):
        cache = work / f"cache-{args.label or 'default'}-{args.pairs}-{ranks}"
        shutil.rmtree(cache, ignore_errors=True)
        if args.seed_cache:
            seed_cache(data, cache)
        for mode in ("cached",) if args.seed_cache else ("cold", "cached"):
            result = run_job(data, cache, ranks, work / f"sync-{os.getpid()}", args.quiet)
            result.update(pairs=args.pairs, mode=mode, label=args.label)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
