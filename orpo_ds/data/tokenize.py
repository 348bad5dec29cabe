"""Preference rows -> token ids: :func:`tokenize_pairs` (the entry point), one row at a time over
``datasets.map``, with :func:`truncate_pair` fitting each pair into ``max_length``.

Token layout of one pair (``max_length`` bounds EACH sequence, prompt + one response, as in TRL):

* With a chat template (chat formats always; standard strings too, as one user message and one assistant
  message each, so instruct models see their own template): ``prompt_ids`` is the rendered prompt with the
  generation prompt; a response's ids are the tokens the full conversation adds after ``prompt_ids``, cut
  after the response's last EOS (ChatML's trailing ``"\\n"`` after ``<|im_end|>`` is not trained), with
  EOS appended when the template emits none.
* Without a chat template: ``prompt_ids = tokenizer(prompt)`` (with special tokens: a BOS if the tokenizer
  adds one); a response is ``tokenizer(response, add_special_tokens=False) + [eos]``.
* Every untruncated response ends with the tokenizer's EOS id and holds no prompt token.

Truncation (``truncation="prompt_left"``, the default), only when ``len(prompt) + len(longest response)``
exceeds ``max_length``; see :func:`truncate_pair`:

1. The prompt is cut from the LEFT (its end, where the question and the generation prompt sit, stays),
   only as far as needed for the longest response to fit, but never below ``min(len(prompt),
   max_length // 2)`` tokens (TRL's default ``max_prompt_length`` is half of ``max_length``), so a very
   long response cannot push the whole prompt out. A leading BOS token survives the cut.
2. Then the responses are cut from the RIGHT to the room left. A cut response does NOT keep its EOS (as
   in TRL): appending EOS at an arbitrary cut point would teach the model to stop mid-answer.
3. A pair whose prompt leaves no room for a response (fewer than 1 token after a non-empty prompt, 2
   after an empty one: what :class:`TokenizedPair` needs to score it), or whose two responses become
   identical, is dropped with that reason. With ``max_length >= 2`` the floor in step 1 always leaves
   room, so under ``prompt_left`` only identical responses drop; "prompt leaves no room" comes from
   ``truncation="drop"``.

``truncation="drop"`` drops every over-long pair instead ("too long", or "prompt leaves no room" when the
prompt alone fills ``max_length``).

Special-token strings in the text (``special_tokens_in_content``): a prompt or response that contains
the spelling of a control token (``"<|im_end|>"``, ``"<|im_start|>system"``, ...) would otherwise be
tokenized to the control token itself, so a row could end a turn or open a system turn from inside its
content. Control tokens are the tokenizer's special tokens, plus, with a chat template, the added tokens
the template writes (or those in ``tokenizer.chat_control_tokens``, if set); whitespace tokens such as
Gemma's ``"\\n"`` are ordinary text. Every string of a row (message contents and the other message
fields the template may print) is checked:

* ``"reject"`` (the default): the row is dropped as ``"special token in content: 'chosen' contains
  '<|im_end|>'"``.
* ``"escape"``: the strings are tokenized as plain text, the template's own control tokens stay tokens:
  with a chat template through transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``
  (transformers >= 5.20; older versions raise :class:`DataError`), without one with
  ``tokenizer(text, split_special_tokens=True)``. The text itself is not changed. Only where a template
  renders the prompt differently once a response follows (see :func:`_chat_response_ids`) is a response
  tokenized from rendered text, where its control-token spellings can no longer be told from the
  template's: such a row is dropped under the same reason instead.
* ``"keep"``: tokenized as written, control tokens included (the behaviour before this setting).

Control tokens are found by :mod:`orpo_ds.data.validate`; every unusable row is a drop with its reason in
the :class:`~orpo_ds.data.validate.DropReport`, never a crash.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orpo_ds.data.cache import cache_inputs, cache_key, load_cache, save_cache
from orpo_ds.data.columns import TokenizedPairs
from orpo_ds.data.errors import DataError
from orpo_ds.data.formats import parse_row, render_chat, resolve_format, token_ids
from orpo_ds.data.validate import Drop, DropReport, control_pattern, control_tokens, find_control

__all__ = ["TRUNCATION_POLICIES", "SPECIAL_TOKEN_POLICIES", "tokenize_pairs", "truncate_pair"]

logger = logging.getLogger(__name__)

TRUNCATION_POLICIES = ("prompt_left", "drop")
SPECIAL_TOKEN_POLICIES = ("reject", "escape", "keep")


# -------------------------------------------------------------------------------------- row pipeline


@dataclass(frozen=True)
class _Ctx:
    """Everything the row function needs; pickled to the map workers."""

    tokenizer: Any
    fmt: str
    use_template: bool
    eos_id: int
    bos_id: int | None
    max_length: int
    truncation: str
    special_tokens: str  # one of SPECIAL_TOKEN_POLICIES
    control_re: re.Pattern | None  # matches any control-token string; None when the tokenizer has none


def _end_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """Cut what a template puts after the response's last EOS (ChatML: "\\n"); append EOS if there is none."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == eos_id:
            return ids[: i + 1]
    return ids + [eos_id]


def _chat_response_ids(ctx: _Ctx, prompt: list[dict], prompt_ids: list[int], response: list[dict],
                       name: str) -> list[int]:
    tok = ctx.tokenizer
    escape = ctx.special_tokens == "escape"
    full = render_chat(tok, prompt + response, False, True, escape)
    if full[: len(prompt_ids)] == prompt_ids:
        ids = full[len(prompt_ids):]
    else:
        # The prompt's ids are not a prefix of the full conversation's: the template renders the history
        # differently once an assistant turn follows (e.g. it drops <think> blocks or the generation
        # prompt differs from the rendered assistant header), or the tokenizer merges across the
        # boundary. Fall back to tokenizing the response text on its own: what the full rendering adds
        # after the prompt rendering, or, when even the texts disagree, the bare response contents.
        # In rendered text a control-token string from the content cannot be told from the template's own
        # tokens any more, so escape cannot be kept here: such a response is dropped instead.
        found = find_control(response, ctx.control_re) if escape and ctx.control_re is not None else None
        if found is not None:
            raise Drop(f"special token in content: {name!r} contains {found!r}, which cannot be escaped with "
                       "this chat template (it renders the prompt differently once a response follows)")
        prompt_text = render_chat(tok, prompt, True, False)
        full_text = render_chat(tok, prompt + response, False, False)
        if full_text.startswith(prompt_text):
            text = full_text[len(prompt_text):]
        else:
            text = "".join(m["content"] for m in response)
        ids = token_ids(tok(text, add_special_tokens=False)["input_ids"])
    return _end_at_eos(ids, ctx.eos_id)


def _tokenize_row(row: Mapping, ctx: _Ctx) -> tuple[list[int], list[int], list[int]]:
    """One record -> ``(prompt_ids, chosen_ids, rejected_ids)`` within ``max_length``, or raises Drop."""
    prompt, chosen, rejected = parse_row(row, ctx.fmt)
    if ctx.special_tokens == "reject" and ctx.control_re is not None:
        for name, value in (("conversations" if ctx.fmt == "sharegpt" else "prompt", prompt), ("chosen", chosen),
                            ("rejected", rejected)):
            found = find_control(value, ctx.control_re)
            if found is not None:
                raise Drop(f"special token in content: {name!r} contains {found!r}")
    tok = ctx.tokenizer
    escape = ctx.special_tokens == "escape"
    if ctx.fmt == "standard" and ctx.use_template:
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    if isinstance(prompt, list):
        prompt_ids = render_chat(tok, prompt, True, True, escape)
        responses = [_chat_response_ids(ctx, prompt, prompt_ids, r, name)
                     for name, r in (("chosen", chosen), ("rejected", rejected))]
    else:
        # escape: special-token strings are split into ordinary tokens; the BOS/EOS the tokenizer adds stay.
        split = {"split_special_tokens": True} if escape else {}
        prompt_ids = token_ids(tok(prompt, **split)["input_ids"])
        if prompt_ids and prompt_ids[-1] == ctx.eos_id and (escape or not prompt.endswith(str(tok.eos_token))):
            prompt_ids.pop()  # a tokenizer that appends EOS to every text: EOS must not end the prompt
        responses = [token_ids(tok(r, add_special_tokens=False, **split)["input_ids"]) + [ctx.eos_id]
                     for r in (chosen, rejected)]
    for name, ids in zip(("chosen", "rejected"), responses, strict=True):
        if len(ids) <= 1:  # EOS alone: the text rendered to nothing
            raise Drop(f"empty response: {name!r} has no tokens")
    if responses[0] == responses[1]:
        raise Drop("chosen == rejected")
    fitted = truncate_pair(prompt_ids, responses[0], responses[1], max_length=ctx.max_length,
                           policy=ctx.truncation, bos_id=ctx.bos_id)
    if isinstance(fitted, str):
        raise Drop(fitted)
    if fitted[1] == fitted[2]:
        raise Drop(f"chosen == rejected: identical after truncation to max_length {ctx.max_length}")
    return fitted


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: int,
                  policy: str = "prompt_left", bos_id: int | None = None
                  ) -> tuple[list[int], list[int], list[int]] | str:
    """Fit ``prompt + chosen`` and ``prompt + rejected`` into ``max_length`` tokens each.

    Returns the (possibly cut) lists, or a drop reason string. Pairs that fit are returned unchanged.
    ``"prompt_left"``: keep the last ``max(max_length - L, min(P, max_length // 2))`` prompt tokens
    (``P`` = prompt length, ``L`` = longest response; a leading ``bos_id`` is kept in front of them and
    counts toward them), then cut both responses from the right to the room left (a cut response loses
    its EOS). ``"drop"``: every over-long pair is a drop. Either way a pair with no room for a scorable
    response (>= 1 token after a non-empty prompt, >= 2 after an empty one) is a drop.
    """
    if policy not in TRUNCATION_POLICIES:
        raise DataError(f"truncation={policy!r}; expected one of {', '.join(TRUNCATION_POLICIES)}")
    n_prompt, longest = len(prompt), max(len(chosen), len(rejected))
    if n_prompt + longest <= max_length:
        return list(prompt), list(chosen), list(rejected)
    if policy == "drop":
        if n_prompt + (1 if prompt else 2) > max_length:
            return f"prompt leaves no room: prompt has {n_prompt} tokens, max_length is {max_length}"
        return f"too long: prompt {n_prompt} + response {longest} tokens > max_length {max_length}"
    keep = max(max_length - longest, min(n_prompt, max_length // 2))
    if keep < n_prompt:
        head = 1 if (bos_id is not None and prompt and prompt[0] == bos_id) else 0
        prompt = list(prompt[:head]) + list(prompt[n_prompt - max(keep - head, 0):])
    room = max_length - len(prompt)
    if room < (1 if prompt else 2):
        return f"prompt leaves no room: {len(prompt)} prompt tokens after truncation, max_length {max_length}"
    return list(prompt), list(chosen[:room]), list(rejected[:room])


def _map_batch(batch: dict[str, list], ctx: _Ctx) -> dict[str, list]:
    """``datasets.map`` function: each row yields its ids, or empty ids and a drop reason (never raises)."""
    out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "drop": []}
    n = len(next(iter(batch.values()))) if batch else 0
    for i in range(n):
        row = {k: v[i] for k, v in batch.items()}
        try:
            # Looked up at call time (not bound earlier) so tests can count or replace the row function.
            p, c, r = _tokenize_row(row, ctx)
            reason = ""
        except Drop as d:
            p, c, r, reason = [], [], [], d.reason or "unusable row"
        except Exception as e:  # noqa: BLE001 - a row must never crash the pipeline
            p, c, r, reason = [], [], [], f"tokenizer error: {type(e).__name__}: {e}"
        out["prompt_ids"].append(p)
        out["chosen_ids"].append(c)
        out["rejected_ids"].append(r)
        out["drop"].append(reason)
    return out


def _run_map(dataset, ctx: _Ctx, num_proc: int, progress: bool, fingerprint: str
             ) -> tuple[TokenizedPairs, DropReport]:
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Features, Value

    List = getattr(datasets, "List", datasets.Sequence)  # datasets < 4 has only Sequence
    total = len(dataset)
    if total == 0:
        return TokenizedPairs.from_pairs([]), DropReport(0, 0, [])
    ids = List(Value("int32"))
    features = Features({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids, "drop": Value("string")})
    workers = min(num_proc, total)
    bars_were_on = datasets.is_progress_bar_enabled()
    if not progress and bars_were_on:
        datasets.disable_progress_bars()
    started = time.perf_counter()
    try:
        out = dataset.map(
            _map_batch, fn_kwargs={"ctx": ctx}, batched=True, batch_size=64,
            num_proc=workers if workers > 1 else None, remove_columns=dataset.column_names,
            features=features,  # explicit: a batch of dropped rows would otherwise infer a null type
            # In memory, no datasets cache files: our own cache is the cache, and a dataset read from a
            # saved folder must not get cache-*.arrow files written next to it.
            keep_in_memory=True, load_from_cache_file=False,
            new_fingerprint=fingerprint,  # given, so datasets does not try to hash the tokenizer
            desc="Tokenizing preference pairs")  # the bar's rate, examples/s, is pairs/s: one row, one pair
    finally:
        if not progress and bars_were_on:
            datasets.enable_progress_bars()
    if progress:
        seconds = time.perf_counter() - started
        # On stderr with the bar: stdout may be a machine's (orpo-ds plan --json).
        print(f"[data] tokenized {total} pairs in {seconds:.1f} s: {total / max(seconds, 1e-9):,.0f} pairs/s "
              f"({workers} process{'es' if workers > 1 else ''})", file=sys.stderr, flush=True)
    # Columns straight from the Arrow table: no Python list per pair. map is 1:1 and keeps order, so
    # position i is source row i.
    table = out.data.table
    kept = pc.equal(table.column("drop"), "").to_numpy(zero_copy_only=False)  # [total] bool
    dropped_rows = np.flatnonzero(~kept)
    reasons = table.column("drop").take(dropped_rows).to_pylist()
    if dropped_rows.size:
        table = table.filter(kept)
    table = table.drop_columns(["drop"]).append_column("pair_id", pa.array(np.flatnonzero(kept), pa.int64()))
    pairs = TokenizedPairs.from_arrow(table)
    return pairs, DropReport(total, len(pairs), list(zip(dropped_rows.tolist(), reasons, strict=True)))


# ------------------------------------------------------------------------------------------ frontend


def tokenize_pairs(dataset, tokenizer, *, max_length: int, fmt: str = "auto", truncation: str = "prompt_left",
                   special_tokens_in_content: str = "reject", num_proc: int = 1,
                   cache_dir: str | os.PathLike | None = None, strict: bool = False,
                   progress: bool = True) -> tuple[TokenizedPairs, DropReport]:
    """Tokenize every row of ``dataset`` into a pair of :class:`TokenizedPairs` (``pair_id`` = row index).

    Args:
        dataset: a ``datasets.Dataset`` (see :func:`~orpo_ds.data.io.load_records`).
        tokenizer: a Hugging Face tokenizer with an EOS token; chat formats need a chat template.
        max_length: token budget of EACH sequence (prompt + one response), >= 2.
        fmt: ``"auto"`` (:func:`~orpo_ds.data.formats.format_of`), ``"standard"``, ``"conversational"`` or
            ``"sharegpt"``.
        truncation: ``"prompt_left"`` or ``"drop"`` (module docstring; :func:`truncate_pair`).
        special_tokens_in_content: what to do with a row whose strings contain a control token's spelling
            (``"<|im_end|>"``): ``"reject"`` drops it ("special token in content"), ``"escape"`` tokenizes
            those strings as plain text, ``"keep"`` lets them become control tokens (module docstring).
        num_proc: ``datasets.map`` workers; the result does not depend on it.
        cache_dir: if set, results live in ``cache_dir/<key>``, the key hashing the dataset fingerprint
            (file content hash for :func:`~orpo_ds.data.io.load_records` files), the tokenizer's identity (name, size,
            full serialized state incl. vocab, chat template), ``max_length``, ``truncation``, the
            resolved format, ``special_tokens_in_content`` with the control tokens it looks for, and
            :data:`~orpo_ds.data.cache.CACHE_VERSION`. A hit skips tokenization entirely. The pairs returned
            are memory-mapped from the cache folder whenever one holds them (a hit, or a miss just
            saved), so processes that read the same folder share one copy.
        strict: raise :class:`DataError` (naming the first bad row) if any row is unusable.
        progress: show the ``datasets`` progress bar.

    Returns:
        ``(pairs, report)``: the kept pairs in row order (columns, :class:`TokenizedPairs`), and the
        :class:`DropReport` of all rows.

    Raises:
        DataError: bad arguments, undetectable format, a tokenizer without EOS (or without chat template
            for a chat format, or, for ``escape`` with a chat template, a transformers without
            ``sanitize_control_tokens``), or any bad row when ``strict``. Bad rows are otherwise only reported.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an int >= 2, got {max_length!r}")
    if truncation not in TRUNCATION_POLICIES:
        raise DataError(f"truncation={truncation!r}; expected one of {', '.join(TRUNCATION_POLICIES)}")
    if special_tokens_in_content not in SPECIAL_TOKEN_POLICIES:
        raise DataError(f"special_tokens_in_content={special_tokens_in_content!r}; expected one of "
                        f"{', '.join(SPECIAL_TOKEN_POLICIES)}")
    if num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    requested_fmt, fmt = fmt, resolve_format(dataset, fmt)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; set one")
    use_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt != "standard" and not use_template:
        raise DataError(f"{fmt} records need a tokenizer with a chat template; "
                        f"{getattr(tokenizer, 'name_or_path', '')!r} has none")
    if (special_tokens_in_content == "escape" and use_template
            and "sanitize_control_tokens" not in inspect.signature(tokenizer.apply_chat_template).parameters):
        raise DataError("special_tokens_in_content='escape' with a chat template needs transformers >= 5.20 "
                        "(apply_chat_template(..., sanitize_control_tokens=True)); upgrade transformers, or "
                        "use 'reject' to drop such rows")
    control = control_tokens(tokenizer, use_template)
    ctx = _Ctx(tokenizer, fmt, use_template, int(eos_id), tokenizer.bos_token_id, max_length, truncation,
               special_tokens_in_content, control_pattern(control))

    folder, key, inputs = _cache_entry(getattr(dataset, "_fingerprint", None), tokenizer, cache_dir,
                                       max_length=max_length, truncation=truncation, fmt=requested_fmt,
                                       special_tokens=special_tokens_in_content)
    cached = load_cache(folder, key) if folder is not None else None
    if cached is not None:
        logger.info("tokenized pairs loaded from cache %s", folder)
        pairs, report = cached
    else:
        pairs, report = _run_map(dataset, ctx, num_proc, progress, fingerprint=key)
        if folder is not None and save_cache(folder, key, inputs, pairs, report):
            # Swap the private in-memory copy for the mapped file, which this node's other ranks map too.
            pairs, report = load_cache(folder, key) or (pairs, report)
    _raise_if_strict(report, strict)
    return pairs, report


def _cache_entry(fingerprint: str | None, tokenizer, cache_dir: str | os.PathLike | None, **settings
                 ) -> tuple[Path | None, str, dict[str, Any] | None]:
    """``(folder, key, inputs)``: where tokenizing a dataset of ``fingerprint`` with ``settings`` (those of
    :func:`~orpo_ds.data.cache.cache_inputs`) is cached. ``folder`` is None when nothing is cached (no
    ``cache_dir``, or no fingerprint); ``key`` then names the ``datasets.map`` run only."""
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise DataError(f"data.cache_dir {str(cache_dir)!r} is a file; name a folder for the tokenized-pairs cache")
    control = control_tokens(tokenizer, bool(getattr(tokenizer, "chat_template", None)))
    inputs = cache_inputs(fingerprint, tokenizer, control_tokens=control, **settings)
    if inputs is None:
        return None, uuid.uuid4().hex, None
    key = cache_key(inputs)
    return (Path(cache_dir) / key if cache_dir is not None else None), key, inputs


def _raise_if_strict(report: DropReport, strict: bool) -> None:
    if strict and report.dropped:
        row, reason = report.dropped[0]
        more = len(report.dropped) - 1
        raise DataError(f"row {row}: {reason}" + (f" (and {more} more unusable rows: {report.summary()})"
                                                   if more else "") + "; strict mode stops on any unusable row",
                        row=row, reason=reason)


def tokenize_data_section(source: str, tokenizer, data, *, progress: bool) -> tuple[TokenizedPairs, DropReport]:
    """Load ``source`` and tokenize it with every setting of ``data`` (a :class:`orpo_ds.config.DataConfig`),
    as training and the planner do.

    A local data file whose pairs are cached is not even parsed: its fingerprint comes from its bytes
    (:func:`~orpo_ds.data.io.file_fingerprint`), so a rank reading the cache pays for the mapped pairs only,
    not for a copy of the records as Python objects.
    """
    from orpo_ds.data.io import file_fingerprint, load_records

    folder, key, _ = _cache_entry(file_fingerprint(source), tokenizer, data.cache_dir, max_length=data.max_length,
                                  truncation=data.truncation, fmt=data.format,
                                  special_tokens=data.special_tokens_in_content)
    cached = load_cache(folder, key) if folder is not None else None
    if cached is not None:
        logger.info("tokenized pairs of %s loaded from cache %s", source, folder)
        _raise_if_strict(cached[1], data.strict)
        return cached
    return tokenize_pairs(load_records(source), tokenizer, max_length=data.max_length, fmt=data.format,
                          truncation=data.truncation, num_proc=data.num_proc,
                          special_tokens_in_content=data.special_tokens_in_content, cache_dir=data.cache_dir,
                          strict=data.strict, progress=progress)
