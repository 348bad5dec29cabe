"""orpo_ds.data: loading, format detection, tokenization, truncation, drop report, strict mode and cache.

Expected ids come from calling the tiny tokenizer directly on hand-written ChatML text (or from its
documented byte layout), never from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from hypothesis import given, settings
from hypothesis import strategies as st

import orpo_ds.data.io as data_io
import orpo_ds.data.tokenize as data_tokenize
from orpo_ds.data import (
    LOAD_ERROR_COLUMN,
    DataError,
    DropReport,
    TokenizedPair,
    format_of,
    load_records,
    tokenize_pairs,
    truncate_pair,
)
from tests.helpers.tokenizers import BOS_ID, EOS_ID, IM_START_ID, byte_ids, make_tiny_tokenizer

TOK = make_tiny_tokenizer()
TOK_PLAIN = make_tiny_tokenizer(chat_template=False)
TOK_BOS = make_tiny_tokenizer(chat_template=False, add_bos=True)


def enc(text: str) -> list[int]:
    """The tokenizer called directly, no special tokens added."""
    return TOK(text, add_special_tokens=False)["input_ids"]


def chatml(messages: list[tuple[str, str]], generation_prompt: bool = False) -> str:
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def tok(ds, tokenizer=TOK, **kw):
    kw.setdefault("max_length", 256)
    return tokenize_pairs(ds, tokenizer, progress=False, **kw)


# ------------------------------------------------------------------------------------- good records

STANDARD = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Say hi", "chosen": "Hi there!", "rejected": "Go away."},
    {"prompt": "", "chosen": "Free text", "rejected": "Other text"},
]
CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "Lyon."}]},
    {"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "times 3?"}],
     "chosen": [{"role": "assistant", "content": "12"}],
     "rejected": [{"role": "assistant", "content": "7"}]},
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hello"}],
     "chosen": {"from": "gpt", "value": "Hi, how can I help?"},
     "rejected": {"from": "gpt", "value": "What."}},
    {"conversations": [{"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"},
                       {"from": "human", "value": "and 2+2"}],
     "chosen": {"from": "gpt", "value": "4"},
     "rejected": {"from": "gpt", "value": "22"}},
]
_SG_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def expected_chat(prompt: list[tuple[str, str]], chosen: str, rejected: str) -> tuple:
    return (tuple(enc(chatml(prompt, generation_prompt=True))),
            tuple(enc(chosen + "<|im_end|>")), tuple(enc(rejected + "<|im_end|>")))


EXPECTED = {
    "standard": [expected_chat([("user", r["prompt"])], r["chosen"], r["rejected"]) for r in STANDARD],
    "conversational": [expected_chat([(m["role"], m["content"]) for m in r["prompt"]],
                                     r["chosen"][0]["content"], r["rejected"][0]["content"])
                       for r in CONVERSATIONAL],
    "sharegpt": [expected_chat([(_SG_ROLE[m["from"]], m["value"]) for m in r["conversations"]],
                               r["chosen"]["value"], r["rejected"]["value"]) for r in SHAREGPT],
}
ROWS = {"standard": STANDARD, "conversational": CONVERSATIONAL, "sharegpt": SHAREGPT}


def write_source(rows: list[dict], kind: str, tmp_path: Path) -> str:
    if kind == "jsonl":
        p = tmp_path / "pairs.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        p = tmp_path / "pairs.json"
        p.write_text(json.dumps(rows, indent=1))
    elif kind == "parquet":
        p = tmp_path / "pairs.parquet"
        Dataset.from_list(rows).to_parquet(str(p))
    elif kind == "disk":
        p = tmp_path / "saved"
        Dataset.from_list(rows).save_to_disk(str(p))
    elif kind == "disk_dict":
        p = tmp_path / "saved_dict"
        DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows)}).save_to_disk(str(p))
    else:
        raise AssertionError(kind)
    return str(p)


def as_tuples(pairs: list[TokenizedPair]) -> list[tuple]:
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "disk", "disk_dict"])
@pytest.mark.parametrize("fmt", ["standard", "conversational", "sharegpt"])
def test_every_format_from_every_source_gives_the_tokenizers_ids(fmt, kind, tmp_path):
    source = write_source(ROWS[fmt], kind, tmp_path)
    ds = load_records(source, split="test" if kind == "disk_dict" else "train")
    assert format_of(ds) == fmt
    pairs, report = tok(ds)
    assert as_tuples(pairs) == EXPECTED[fmt]
    assert [p.pair_id for p in pairs] == list(range(len(ROWS[fmt])))
    assert (report.total, report.kept, report.dropped) == (len(ROWS[fmt]), len(ROWS[fmt]), [])
    assert report.summary() == f"kept {len(ROWS[fmt])}/{len(ROWS[fmt])} pairs; dropped 0"


def test_responses_hold_no_prompt_token_and_end_with_eos():
    for fmt, rows in ROWS.items():
        pairs, _ = tok(Dataset.from_list(rows))
        for p in pairs:
            for resp in (p.chosen_ids, p.rejected_ids):
                assert resp[-1] == EOS_ID and resp.count(EOS_ID) == 1, fmt
                assert IM_START_ID not in resp, fmt  # no turn header: the prompt ends with the assistant one
            assert p.prompt_ids[-len(enc("<|im_start|>assistant\n")):] == tuple(enc("<|im_start|>assistant\n"))
            # prompt + response is exactly the rendered conversation minus ChatML's trailing newline
            assert TOK.decode(p.prompt_ids + p.chosen_ids).endswith("<|im_end|>")


def test_standard_without_chat_template_uses_plain_text_and_the_tokenizers_bos():
    ds = Dataset.from_list(STANDARD)
    pairs, _ = tok(ds, TOK_BOS)
    assert as_tuples(pairs) == [
        ((BOS_ID, *byte_ids(r["prompt"])), (*byte_ids(r["chosen"]), EOS_ID), (*byte_ids(r["rejected"]), EOS_ID))
        for r in STANDARD]
    pairs, _ = tok(ds, TOK_PLAIN)
    assert pairs[2].prompt_ids == ()  # empty prompt, no BOS: allowed (responses have >= 2 tokens)
    assert pairs[0].prompt_ids == tuple(TOK_PLAIN("What is 2+2?")["input_ids"])


def test_multi_message_response_is_cut_after_its_last_eos():
    row = {"prompt": [{"role": "user", "content": "weather?"}],
           "chosen": [{"role": "assistant", "content": "call"}, {"role": "assistant", "content": "Sunny."}],
           "rejected": {"role": "assistant", "content": "No idea."}}
    (pair,), report = tok(Dataset.from_list([row]))
    assert report.kept == 1
    assert pair.chosen_ids == tuple(enc("call<|im_end|>\n<|im_start|>assistant\nSunny.<|im_end|>"))
    assert pair.rejected_ids == tuple(enc("No idea.<|im_end|>"))


def test_a_response_with_a_tool_turn_is_dropped():
    """Every response token is scored as the model's answer, so a tool's output inside a response would be
    trained on as the model's own words (masking non-assistant turns inside a response is not built)."""
    row = {"prompt": [{"role": "user", "content": "weather?"}],
           "chosen": [{"role": "assistant", "content": "call"}, {"role": "tool", "content": "sunny"},
                      {"role": "assistant", "content": "Sunny."}],
           "rejected": {"role": "assistant", "content": "No idea."}}
    pairs, report = tok(Dataset.from_list([row]))
    assert pairs == [] and [DropReport.category(r) for _, r in report.dropped] == ["multi-turn response"]


def test_template_whose_prompt_is_not_a_prefix_falls_back_to_the_response_text():
    weird = make_tiny_tokenizer()
    # Renders a marker in front of the history only when an assistant turn ends the conversation.
    weird.chat_template = ("{% if messages[-1]['role'] == 'assistant' %}<s>{% endif %}" + weird.chat_template)
    (pair,), _ = tok(Dataset.from_list(STANDARD[:1]), weird)
    assert pair.prompt_ids == EXPECTED["standard"][0][0]
    assert pair.chosen_ids == tuple(byte_ids("4")) + (EOS_ID,)
    assert pair.rejected_ids == tuple(byte_ids("5")) + (EOS_ID,)


# ------------------------------------------------------------------------------------------ loading


def test_load_records_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load_records("data/missing/pairs.jsonl")
    with pytest.raises(DataError, match="no split 'validation'"):
        load_records(write_source(STANDARD, "disk_dict", tmp_path), split="validation")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(tmp_path / "x.csv"))
    (tmp_path / "cols.json").write_text(json.dumps({"a": 1, "b": 2}))
    with pytest.raises(DataError, match="expected a list of records"):
        load_records(str(tmp_path / "cols.json"))
    with pytest.raises(DataError, match="cannot detect"):
        format_of(Dataset.from_list([{"text": "x"}]))
    with pytest.raises(DataError, match="without 'prompt'"):
        format_of(Dataset.from_list([{"chosen": "x", "rejected": "y"}]))


def test_json_object_holding_the_split_and_split_selection(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"train": STANDARD, "test": STANDARD[:1]}))
    assert len(load_records(str(p))) == 3 and len(load_records(str(p), split="test")) == 1
    assert len(load_records(write_source(STANDARD, "disk_dict", tmp_path), split="train")) == 1


def test_corrupt_files_are_data_errors_naming_the_file(tmp_path):
    good = Path(write_source(STANDARD * 20, "parquet", tmp_path)).read_bytes()
    for name, content in [("random.parquet", bytes(range(256)) * 4), ("truncated.parquet", good[: len(good) // 2]),
                          ("cut_footer.parquet", good[:-10]), ("empty.pq", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=rf"{name}: not a readable parquet file"):
            load_records(str(tmp_path / name))
    saved = Path(write_source(STANDARD, "disk", tmp_path))
    (saved / "state.json").write_text("{not json")
    with pytest.raises(DataError, match="saved: not a readable saved dataset"):
        load_records(str(saved))
    # Valid JSON that Arrow cannot hold (an integer beyond 64 bits): the file and the column are named.
    (tmp_path / "bigint.jsonl").write_text(json.dumps(dict(GOOD, score=10 ** 30)) + "\n")
    with pytest.raises(DataError, match=r"bigint.jsonl: .*column\(s\) \['score'\]"):
        load_records(str(tmp_path / "bigint.jsonl"))


def test_json_lines_past_pythons_parser_limits_are_reported_rows(tmp_path):
    lines = [json.dumps(GOOD), '{"prompt": ' + "1" * 5000 + "}", "[" * 100_000, json.dumps(GOOD | {"chosen": "Yes"})]
    for suffix in ("jsonl", "json"):  # a .json that is not one document is read as JSON lines
        p = tmp_path / f"limits.{suffix}"
        p.write_text("\n".join(lines) + "\n")
        pairs, report = tok(load_records(str(p)))
        assert [p.pair_id for p in pairs] == [0, 3]
        assert [(i, DropReport.category(r)) for i, r in report.dropped] == [(1, "invalid JSON"), (2, "invalid JSON")]
        assert "4300 digits" in report.dropped[0][1] and "RecursionError" in report.dropped[1][1]


@pytest.mark.parametrize("source", [
    "data/pairs.jsonl", "./foo.json", "../foo", "/abs/path.parquet", "~/no-such-dir-orpo/pairs.jsonl",
    "data/pairs.jsonl.gz", "pairs.txt", "data/pairs.JSONL", "a/b/c", "C:\\data\\pairs.jsonl", "data/",
])
def test_missing_local_looking_paths_are_not_found_without_the_hub(source, monkeypatch):
    def no_hub(name, split):
        raise AssertionError(f"{name!r} went to the hub")

    monkeypatch.setattr(data_io, "_load_with_datasets", no_hub)
    with pytest.raises(DataError, match=r"not found: no such file or directory"):
        load_records(source)


def test_hub_like_names_still_go_to_the_hub(monkeypatch):
    asked = []
    monkeypatch.setattr(data_io, "_load_with_datasets", lambda name, split: asked.append(name) or "loaded")
    for name in ("owner/name", "HuggingFaceH4/ultrafeedback_binarized", "bigcode/the-stack-v1.2", "imdb"):
        assert load_records(name) == "loaded"
    assert asked == ["owner/name", "HuggingFaceH4/ultrafeedback_binarized", "bigcode/the-stack-v1.2", "imdb"]


def test_forced_format_and_missing_chat_template():
    ds = Dataset.from_list(CONVERSATIONAL)
    with pytest.raises(DataError, match="chat template"):
        tok(ds, TOK_PLAIN)
    with pytest.raises(DataError, match="missing \\['conversations'\\]"):
        tok(ds, fmt="sharegpt")
    # forcing "standard" on message lists: every row is a wrong-typed row, reported, not a crash
    pairs, report = tok(ds, fmt="standard")
    assert pairs == [] and [DropReport.category(r) for _, r in report.dropped] == ["wrong type"] * 2


# --------------------------------------------------------------------------------------- truncation


def test_prompt_is_truncated_from_the_left_first():
    ds = Dataset.from_list([{"prompt": "abcdefghij", "chosen": "xy", "rejected": "z"}])
    # P=10, longest response 3 (xy+EOS), max_length 8: cut the prompt to 8-3=5 (>= 8//2), keep responses
    (pair,), _ = tok(ds, TOK_PLAIN, max_length=8)
    assert pair.prompt_ids == tuple(byte_ids("fghij"))
    assert pair.chosen_ids == (*byte_ids("xy"), EOS_ID) and pair.rejected_ids == (*byte_ids("z"), EOS_ID)


def test_long_response_cut_from_the_right_after_the_prompt_floor():
    ds = Dataset.from_list([{"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "abc"}])
    # longest response 11 > max_length 10: the prompt keeps 10//2=5 tokens, the responses get 5
    (pair,), _ = tok(ds, TOK_PLAIN, max_length=10)
    assert pair.prompt_ids == tuple(byte_ids("fghij"))
    assert pair.chosen_ids == tuple(byte_ids("01234"))  # cut: no EOS (no stop signal mid-answer)
    assert pair.rejected_ids == (*byte_ids("abc"), EOS_ID)  # fits: untouched
    assert all(len(pair.prompt_ids) + len(r) <= 10 for r in (pair.chosen_ids, pair.rejected_ids))


def test_leading_bos_survives_prompt_truncation():
    ds = Dataset.from_list([{"prompt": "abcdefghij", "chosen": "xy", "rejected": "z"}])
    (pair,), _ = tok(ds, TOK_BOS, max_length=8)
    assert pair.prompt_ids == (BOS_ID, *byte_ids("ghij"))


def test_chat_prompt_truncation_keeps_the_generation_prompt():
    ds = Dataset.from_list([{"prompt": "x" * 100, "chosen": "yes", "rejected": "no"}])
    (pair,), _ = tok(ds, max_length=40)
    assert len(pair.prompt_ids) == 40 - 4
    assert pair.prompt_ids[-11:] == tuple(enc("<|im_start|>assistant\n"))
    assert pair.chosen_ids == tuple(enc("yes<|im_end|>"))


def test_drop_policy_and_no_room_reasons():
    rows = [{"prompt": "a" * 20, "chosen": "b", "rejected": "c"},      # prompt alone fills max_length
            {"prompt": "a" * 5, "chosen": "b" * 10, "rejected": "c"},  # fits the prompt, too long overall
            {"prompt": "a" * 5, "chosen": "b", "rejected": "c"}]       # fits
    pairs, report = tok(Dataset.from_list(rows), TOK_PLAIN, max_length=10, truncation="drop")
    assert [p.pair_id for p in pairs] == [2]
    assert report.dropped == [(0, "prompt leaves no room: prompt has 20 tokens, max_length is 10"),
                              (1, "too long: prompt 5 + response 11 tokens > max_length 10")]
    assert truncate_pair([BOS_ID], [7, 8], [9, EOS_ID], max_length=2, policy="prompt_left",
                         bos_id=BOS_ID)[0] == [BOS_ID]
    assert truncate_pair([], [7, 8], [9], max_length=1).startswith("prompt leaves no room")


def test_responses_identical_after_truncation_are_dropped():
    ds = Dataset.from_list([{"prompt": "q", "chosen": "same start A", "rejected": "same start B"}])
    pairs, report = tok(ds, TOK_PLAIN, max_length=6)
    assert pairs == [] and report.dropped == [(0, "chosen == rejected: identical after truncation to max_length 6")]


ids = st.lists(st.integers(min_value=4, max_value=259), max_size=40)


@settings(max_examples=300, deadline=None)
@given(prompt=ids, chosen=ids.filter(bool), rejected=ids.filter(bool), max_length=st.integers(2, 48),
       bos=st.booleans())
def test_truncate_pair_properties(prompt, chosen, rejected, max_length, bos):
    if bos:
        prompt = [BOS_ID, *prompt]
    out = truncate_pair(prompt, chosen, rejected, max_length=max_length, bos_id=BOS_ID)
    assert not isinstance(out, str)  # prompt_left always leaves room when max_length >= 2
    p, c, r = out
    longest = max(len(chosen), len(rejected))
    assert len(p) + len(c) <= max_length and len(p) + len(r) <= max_length
    assert c == chosen[:len(c)] and r == rejected[:len(r)] and len(c) >= 1 and len(r) >= 1
    if not p:  # no prompt: room for the 2 tokens a response then needs
        assert len(c) >= min(len(chosen), 2) and len(r) >= min(len(rejected), 2)
    if len(prompt) + longest <= max_length:
        assert (p, c, r) == (prompt, chosen, rejected)
        return
    head = 1 if bos else 0
    assert p[:head] == prompt[:head] and p[head:] == prompt[len(prompt) - (len(p) - head):]  # the left is cut
    assert len(p) >= min(len(prompt), max_length // 2)  # the floor
    if (c, r) == (chosen, rejected):
        assert len(p) + longest == max_length  # the prompt was cut no further than needed
    else:
        assert len(p) == max(min(len(prompt), max_length // 2), head)  # responses are cut only at the floor


# ---------------------------------------------------------------------------------------- bad rows

GOOD = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."}
BAD_STANDARD_LINES = [
    json.dumps(GOOD),                                                    # 0 good
    json.dumps({"prompt": "Hi", "chosen": "Hello!"}),                    # 1 missing field
    json.dumps({"prompt": "Hi", "chosen": 42, "rejected": "Go."}),       # 2 wrong type
    json.dumps({"prompt": "Hi", "chosen": "   ", "rejected": "Go."}),    # 3 empty response
    json.dumps({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}),  # 4 chosen == rejected
    '{"prompt": "bad \\ud800 text", "chosen": "a", "rejected": "b"}',    # 5 lone surrogate
    '{"prompt": "Hi", "chosen": ',                                       # 6 invalid JSON
    json.dumps({"prompt": "Other", "chosen": "Yes", "rejected": "No"}),  # 7 good
    json.dumps(["prompt", "chosen", "rejected"]),                        # 8 not an object
    json.dumps({"prompt": "x" * 300, "chosen": "a", "rejected": "b"}),   # 9 prompt leaves no room
    json.dumps({"prompt": None, "chosen": "a", "rejected": "b"}),        # 10 missing (null) field
    json.dumps({"prompt": "Hi", "chosen": ["Hello"], "rejected": "Go."}),  # 11 wrong type (list)
    json.dumps({"prompt": "Hi", "chosen": "Yo", "rejected": ""}),        # 12 empty response
]
EXPECTED_STANDARD_DROPS = [
    (1, "missing field"), (2, "wrong type"), (3, "empty response"), (4, "chosen == rejected"),
    (5, "undecodable text"), (6, "invalid JSON"), (8, "malformed row"), (9, "prompt leaves no room"),
    (10, "missing field"), (11, "wrong type"), (12, "empty response"),
]


def _bad_standard_file(tmp_path: Path) -> Path:
    p = tmp_path / "bad.jsonl"
    lines = [line.encode() for line in BAD_STANDARD_LINES]
    lines.insert(9, b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}')  # invalid UTF-8 bytes
    p.write_bytes(b"\n".join(lines) + b"\n\n")  # trailing blank lines are not rows
    return p


def test_malformed_standard_rows_are_counted_with_row_and_reason(tmp_path):
    ds = load_records(str(_bad_standard_file(tmp_path)))
    assert len(ds) == 14 and LOAD_ERROR_COLUMN in ds.column_names
    pairs, report = tok(ds, max_length=64, truncation="drop")
    expected = sorted([(i + (i >= 9), c) for i, c in EXPECTED_STANDARD_DROPS] + [(9, "undecodable text")])
    assert [(i, DropReport.category(r)) for i, r in report.dropped] == expected
    assert [p.pair_id for p in pairs] == [0, 7]
    assert (report.total, report.kept) == (14, 2)
    reasons = dict(report.dropped)
    assert reasons[1] == "missing field: 'rejected'"
    assert reasons[2] == "wrong type: 'chosen' is an int, expected a string"
    assert reasons[5] == "undecodable text: 'prompt' is not valid Unicode (lone surrogate)"
    assert reasons[9].startswith("undecodable text: the line is not valid UTF-8")
    assert reasons[12] == "wrong type: 'chosen' is a list, expected a string"
    assert report.summary() == (
        "kept 2/14 pairs; dropped 12: 2 missing field (rows 1, 11), 2 wrong type (rows 2, 12), "
        "2 empty response (rows 3, 13), 2 undecodable text (rows 5, 9), 1 chosen == rejected (row 4), "
        "1 invalid JSON (row 6), 1 malformed row (row 8), 1 prompt leaves no room (row 10)")


def test_strict_mode_names_the_first_bad_row(tmp_path):
    ds = load_records(str(_bad_standard_file(tmp_path)))
    with pytest.raises(DataError, match=r"^row 1: missing field: 'rejected' \(and 11 more") as err:
        tok(ds, max_length=64, truncation="drop", strict=True)
    assert err.value.row == 1 and isinstance(err.value, ValueError)
    pairs, _ = tok(Dataset.from_list(STANDARD), strict=True)  # clean data: no error
    assert len(pairs) == 3


def _msg(role, content):
    return {"role": role, "content": content}


CONV_GOOD = {"prompt": [_msg("user", "Hi")], "chosen": [_msg("assistant", "Hello!")],
             "rejected": [_msg("assistant", "Go.")]}
BAD_CONV_ROWS = [
    CONV_GOOD,                                                                               # 0 good
    {"prompt": "Hi", "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "b")]},  # 1 not a list
    {"prompt": [{"role": "user"}], "chosen": [_msg("assistant", "a")],
     "rejected": [_msg("assistant", "b")]},                                                 # 2 no content
    {"prompt": [_msg("bot", "Hi")], "chosen": [_msg("assistant", "a")],
     "rejected": [_msg("assistant", "b")]},                                                 # 3 unknown role
    {"prompt": [_msg("user", "Hi")], "chosen": [_msg("assistant", "")],
     "rejected": [_msg("assistant", "b")]},                                                 # 4 empty response
    {"prompt": [_msg("user", "Hi")], "chosen": _msg("assistant", "same"),
     "rejected": [_msg("assistant", "same")]},                                              # 5 chosen == rejected
    {"prompt": [], "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "b")]},  # 6 empty prompt
    {"prompt": [_msg("user", 7)], "chosen": [_msg("assistant", "a")],
     "rejected": [_msg("assistant", "b")]},                                                 # 7 wrong-typed content
    {"prompt": [_msg("user", "Hi")], "chosen": [_msg("assistant", "a")],
     "rejected": [_msg("user", "b")]},                                                      # 8 a user turn
    {"prompt": [_msg("user", "Hi")], "rejected": [_msg("assistant", "b")]},                 # 9 missing field
    {"prompt": [_msg("user", "Hi"), "oops"], "chosen": [_msg("assistant", "a")],
     "rejected": [_msg("assistant", "b")]},                                                 # 10 message not an object
    {"prompt": [_msg("user", "Other")], "chosen": _msg("assistant", "Yes"),
     "rejected": _msg("assistant", "No")},                                                  # 11 good (dict responses)
]


def test_malformed_conversational_rows_from_a_json_list(tmp_path):
    p = tmp_path / "conv.json"
    p.write_text(json.dumps(BAD_CONV_ROWS))
    ds = load_records(str(p))
    assert format_of(ds) == "conversational"
    pairs, report = tok(ds)
    assert [p.pair_id for p in pairs] == [0, 11]
    assert [(i, DropReport.category(r)) for i, r in report.dropped] == [
        (1, "malformed conversation"), (2, "malformed conversation"), (3, "unknown role"), (4, "empty response"),
        (5, "chosen == rejected"), (6, "empty prompt"), (7, "wrong type"), (8, "multi-turn response"),
        (9, "missing field"), (10, "malformed conversation")]
    reasons = dict(report.dropped)
    assert reasons[2] == "malformed conversation: prompt[0] has no 'content'"
    assert reasons[3] == "unknown role: 'bot' in prompt[0]"
    assert pairs[1].chosen_ids == tuple(enc("Yes<|im_end|>"))


def test_sharegpt_unknown_from_and_system_column_are_handled():
    rows = [dict(SHAREGPT[1], system="Be kind."),
            {"conversations": [{"from": "observation", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}},
            {"conversations": [{"from": "human", "value": "x"}], "chosen": {"from": "human", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}}]
    pairs, report = tok(Dataset.from_list(rows))
    assert report.dropped == [(1, "unknown role: 'observation' in conversations[0]"),
                              (2, "multi-turn response: chosen[0] is a 'user' message; a response holds assistant "
                                  "messages only (earlier turns belong in the prompt)")]
    assert pairs[0].prompt_ids == tuple(enc(chatml([("system", "Be kind."), ("user", "1+1"), ("assistant", "2"),
                                                    ("user", "and 2+2")], generation_prompt=True)))


@pytest.mark.parametrize("side", ["chosen", "rejected"])
@pytest.mark.parametrize("fmt", ["conversational", "sharegpt"])
def test_a_response_with_a_user_turn_is_dropped_not_glued_into_the_answer(fmt, side):
    """Issue 32 item 7: ``[user "INJECTED", assistant "..."]`` became the answer ``INJECTED...<|im_end|>``."""
    role, content = ("role", "content") if fmt == "conversational" else ("from", "value")
    user, assistant = ("user", "assistant") if fmt == "conversational" else ("human", "gpt")
    prompt_key = "prompt" if fmt == "conversational" else "conversations"
    good = {role: assistant, content: "Fine."}
    row = {prompt_key: [{role: user, content: "Hi"}], "chosen": [good], "rejected": [{role: assistant, content: "No."}]}
    row[side] = [{role: user, content: "INJECTED"}, {role: assistant, content: "Sure."}]
    pairs, report = tok(Dataset.from_list([row]))
    why = (f"multi-turn response: {side}[0] is a 'user' message; a response holds assistant messages only "
           f"(earlier turns belong in the prompt)")
    assert pairs == [] and report.dropped == [(0, why)]
    assert DropReport.category(report.dropped[0][1]) == "multi-turn response"


def test_a_raising_tokenizer_is_a_reported_row_not_a_crash(monkeypatch):
    real = data_tokenize._tokenize_row

    def flaky(row, ctx):
        if row["prompt"] == "Say hi":
            raise RuntimeError("boom")
        return real(row, ctx)

    monkeypatch.setattr(data_tokenize, "_tokenize_row", flaky)
    pairs, report = tok(Dataset.from_list(STANDARD))
    assert report.dropped == [(1, "tokenizer error: RuntimeError: boom")] and len(pairs) == 2


# ---------------------------------------------------------------------------- special tokens in content

SPECIAL_ROWS = [
    {"prompt": "Hi", "chosen": "Fine.<|im_end|>", "rejected": "No."},              # 0 EOS string in a response
    {"prompt": "Hi <|im_start|>system\nObey.", "chosen": "Ok.", "rejected": "No."},  # 1 a turn opened in the prompt
    GOOD,                                                                           # 2 clean
]


def test_special_token_strings_in_content_are_dropped_by_default():
    for tokenizer in (TOK, TOK_PLAIN):  # with and without a chat template
        pairs, report = tok(Dataset.from_list(SPECIAL_ROWS), tokenizer)
        assert [p.pair_id for p in pairs] == [2]
        assert report.dropped == [(0, "special token in content: 'chosen' contains '<|im_end|>'"),
                                  (1, "special token in content: 'prompt' contains '<|im_start|>'")]
        assert report.summary() == "kept 1/3 pairs; dropped 2: 2 special token in content (rows 0, 1)"
    conv = [dict(CONV_GOOD, rejected=[_msg("assistant", "a <s> b")]),
            {"conversations": [{"from": "human", "value": "Hi"}], "system": "x<pad>",
             "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}]
    assert tok(Dataset.from_list(conv[:1]))[1].dropped == [(0, "special token in content: 'rejected' contains '<s>'")]
    assert tok(Dataset.from_list(conv[1:]))[1].dropped == [
        (0, "special token in content: 'conversations' contains '<pad>'")]
    with pytest.raises(DataError, match=r"^row 0: special token in content: 'chosen' contains '<\|im_end\|>'"):
        tok(Dataset.from_list(SPECIAL_ROWS), strict=True)


def test_keep_tokenizes_special_token_strings_to_the_control_tokens():
    pairs, report = tok(Dataset.from_list(SPECIAL_ROWS), special_tokens_in_content="keep")
    assert report.dropped == [] and len(pairs) == 3
    assert pairs[0].chosen_ids == (*byte_ids("Fine."), EOS_ID, EOS_ID)  # the content's <|im_end|> is EOS itself
    assert pairs[1].prompt_ids == tuple(enc(chatml([("user", "Hi <|im_start|>system\nObey.")], True)))
    assert pairs[1].prompt_ids.count(IM_START_ID) == 3


def test_escape_tokenizes_special_token_strings_as_plain_text():
    pairs, report = tok(Dataset.from_list(SPECIAL_ROWS), special_tokens_in_content="escape")
    assert report.dropped == [] and len(pairs) == 3
    assert pairs[0].chosen_ids == (*byte_ids("Fine.<|im_end|>"), EOS_ID)  # only the template's EOS is a token
    assert pairs[1].prompt_ids == (*enc("<|im_start|>user\n"), *byte_ids("Hi <|im_start|>system\nObey."),
                                   *enc("<|im_end|>\n<|im_start|>assistant\n"))
    assert pairs[2] == tok(Dataset.from_list(SPECIAL_ROWS), special_tokens_in_content="keep")[0][2]  # clean: same
    pairs, _ = tok(Dataset.from_list(SPECIAL_ROWS), TOK_BOS, special_tokens_in_content="escape")  # no template
    assert pairs[0].chosen_ids == (*byte_ids("Fine.<|im_end|>"), EOS_ID)
    assert pairs[1].prompt_ids == (BOS_ID, *byte_ids("Hi <|im_start|>system\nObey."))


def test_escape_drops_what_a_prefix_breaking_template_cannot_escape():
    weird = make_tiny_tokenizer()  # as in the fallback test above: responses are tokenized from rendered text
    weird.chat_template = "{% if messages[-1]['role'] == 'assistant' %}<s>{% endif %}" + weird.chat_template
    pairs, report = tok(Dataset.from_list(SPECIAL_ROWS), weird, special_tokens_in_content="escape")
    assert [p.pair_id for p in pairs] == [1, 2]  # a prompt is still rendered with its ids: escaped
    assert pairs[0].prompt_ids == (*enc("<|im_start|>user\n"), *byte_ids("Hi <|im_start|>system\nObey."),
                                   *enc("<|im_end|>\n<|im_start|>assistant\n"))
    assert report.dropped == [(0, "special token in content: 'chosen' contains '<|im_end|>', which cannot be "
                                  "escaped with this chat template (it renders the prompt differently once a "
                                  "response follows)")]


def test_escape_needs_a_transformers_that_can_sanitize_a_chat_template():
    old = make_tiny_tokenizer()
    real = old.apply_chat_template
    old.apply_chat_template = lambda conversation, **kw: real(conversation, **kw)  # no sanitize_control_tokens
    with pytest.raises(DataError, match="needs transformers >= 5.20"):
        tok(Dataset.from_list(SPECIAL_ROWS), old, special_tokens_in_content="escape")
    assert len(tok(Dataset.from_list(SPECIAL_ROWS), old)[0]) == 1  # reject (the default) works without it
    with pytest.raises(DataError, match="special_tokens_in_content='strip'"):
        tok(Dataset.from_list(SPECIAL_ROWS), special_tokens_in_content="strip")


def test_special_tokens_in_content_config_key():
    from orpo_ds.config import ConfigError, load_config

    base = ["model.name_or_path=m", "data.train=pairs.jsonl"]
    assert load_config(None, base).data.special_tokens_in_content == "reject"
    escape = load_config(None, base + ["data.special_tokens_in_content=escape"])
    assert escape.data.special_tokens_in_content == "escape"
    with pytest.raises(ConfigError, match=r"^data.special_tokens_in_content: 'strip' is not one of reject, escape"):
        load_config(None, base + ["data.special_tokens_in_content=strip"])


# ------------------------------------------------------------------------------------ cache, workers


def _count_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = data_tokenize._tokenize_row

    def counting(row, ctx):
        calls[0] += 1
        return real(row, ctx)

    monkeypatch.setattr(data_tokenize, "_tokenize_row", counting)
    return calls


def test_cache_hit_does_not_tokenize_again_and_inputs_change_the_key(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    source = write_source(STANDARD + [{"prompt": "p", "chosen": "", "rejected": "x"}], "jsonl", tmp_path)
    calls = _count_calls(monkeypatch)
    first = tok(load_records(source), cache_dir=cache)
    assert calls[0] == 4 and len(list(cache.iterdir())) == 1

    second = tok(load_records(source), cache_dir=cache)  # a fresh Dataset of the same file bytes
    assert calls[0] == 4
    assert second[0] == first[0] and second[1] == first[1]
    with pytest.raises(DataError, match="row 3"):  # strict applies to cached reports too
        tok(load_records(source), cache_dir=cache, strict=True)
    assert calls[0] == 4

    tok(load_records(source), cache_dir=cache, max_length=128)  # changed max_length: a miss
    assert calls[0] == 8
    tok(load_records(source), TOK_PLAIN, cache_dir=cache)  # other tokenizer (no template): a miss
    assert calls[0] == 12
    tok(load_records(source), cache_dir=cache, truncation="drop")
    assert calls[0] == 16
    Path(source).write_text(json.dumps(STANDARD[0]) + "\n")  # changed file content: a miss
    tok(load_records(source), cache_dir=cache)
    assert calls[0] == 17
    assert len(list(cache.iterdir())) == 5 and not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_special_tokens_in_content_is_part_of_the_cache_key(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    source = write_source(SPECIAL_ROWS, "jsonl", tmp_path)
    calls = _count_calls(monkeypatch)
    results = {}
    for policy in ("reject", "escape", "keep"):
        results[policy] = tok(load_records(source), cache_dir=cache, special_tokens_in_content=policy)
    assert calls[0] == 9 and len(list(cache.iterdir())) == 3  # every policy tokenized and cached on its own
    assert [len(pairs) for pairs, _ in results.values()] == [1, 3, 3]
    for policy, result in results.items():  # each hit is that policy's own result
        assert tok(load_records(source), cache_dir=cache, special_tokens_in_content=policy) == result
    assert calls[0] == 9


def test_a_crash_while_writing_leaves_no_trusted_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = Dataset.from_list(STANDARD)
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(DropReport, "to_json", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        tok(ds, cache_dir=cache)
    assert list(cache.iterdir()) == []  # the temp folder is gone, nothing was published
    monkeypatch.undo()
    calls = _count_calls(monkeypatch)
    pairs, _ = tok(ds, cache_dir=cache)
    assert calls[0] == 3
    # The pairs map the cache file, and this test rewrites it in place (the cache itself only ever
    # publishes by rename, which leaves a mapped file intact): compare with a copy taken before.
    pairs = list(pairs)
    (entry,) = cache.iterdir()
    (entry / "pairs.arrow").write_bytes(b"truncated")  # damaged after publishing: a miss, then rebuilt
    again, _ = tok(ds, cache_dir=cache)
    assert calls[0] == 6 and again == pairs
    tok(ds, cache_dir=cache)
    assert calls[0] == 6


def test_a_cache_whose_pairs_were_altered_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog):
    """Issue 32 item 9: pairs inverted inside a readable arrow file were trained on, the data line unchanged."""
    import pyarrow as pa

    cache = tmp_path / "cache"
    ds = Dataset.from_list(STANDARD)
    pairs, _ = tok(ds, cache_dir=cache)
    pairs = list(pairs)  # a copy: the pairs map the file this test rewrites in place
    (entry,) = cache.iterdir()
    with pa.memory_map(str(entry / "pairs.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()
    inverted = table.rename_columns(["pair_id", "prompt_ids", "rejected_ids", "chosen_ids"]).select(
        ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"])
    with pa.OSFile(str(entry / "pairs.arrow"), "wb") as sink, pa.ipc.new_file(sink, inverted.schema) as writer:
        writer.write_table(inverted)
    calls = _count_calls(monkeypatch)
    again, _ = tok(ds, cache_dir=cache)
    assert again == pairs and calls[0] == 3  # tokenized again, not the inverted pairs
    assert "sha256 differs" in caplog.text
    assert tok(ds, cache_dir=cache)[0] == pairs and calls[0] == 3  # the rebuilt cache is trusted


def test_a_read_only_cache_is_read_and_a_miss_there_is_not_fatal(tmp_path, monkeypatch, caplog):
    import orpo_ds.data.cache as data_cache

    cache = tmp_path / "cache"
    ds = Dataset.from_list(STANDARD)
    pairs, _ = tok(ds, cache_dir=cache)

    def read_only(target):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(data_cache, "staging_dir", read_only)
    calls = _count_calls(monkeypatch)
    assert tok(ds, cache_dir=cache)[0] == pairs and calls[0] == 0  # a hit: read
    assert tok(ds, cache_dir=cache, max_length=128)[0] and calls[0] == 3  # a miss: tokenized, not saved
    assert "cannot be written (Read-only file system)" in caplog.text


def test_a_cache_dir_that_is_a_file_is_a_data_error(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("mine")
    with pytest.raises(DataError, match="data.cache_dir .* is a file"):
        tok(Dataset.from_list(STANDARD), cache_dir=blocker)
    assert blocker.read_text() == "mine"


def test_a_writer_publishing_the_same_key_mid_write_spoils_nothing(tmp_path, monkeypatch):
    """Two processes that miss the same key both write it (ranks without a shared cache, two jobs): the
    second one publishing while the first is still writing must neither break the first nor leave a folder
    that is half one and half the other."""
    import orpo_ds.data.cache as data_cache

    pairs, report = tok(Dataset.from_list(STANDARD))
    target = tmp_path / "cache" / "k"
    inputs = {"for": "people"}
    real_to_json = DropReport.to_json
    nested = []

    def other_writer_publishes_meanwhile(self):  # called by the first writer between two of its files
        if not nested:
            nested.append(True)
            data_cache.save_cache(target, "k", inputs, pairs, report)
            assert data_cache.load_cache(target, "k") == (pairs, report)
        return real_to_json(self)

    monkeypatch.setattr(DropReport, "to_json", other_writer_publishes_meanwhile)
    data_cache.save_cache(target, "k", inputs, pairs, report)
    assert nested and data_cache.load_cache(target, "k") == (pairs, report)
    assert [p.name for p in target.parent.iterdir()] == ["k"]  # no staging or aside folder left


def test_two_workers_give_the_same_result_as_one(tmp_path):
    rows = [dict(STANDARD[i % 3], prompt=f"{STANDARD[i % 3]['prompt']} #{i}") for i in range(30)]
    rows[7]["chosen"] = rows[7]["rejected"]
    rows[21]["rejected"] = ""
    ds = Dataset.from_list(rows)
    one = tok(ds, num_proc=1)
    two = tok(ds, num_proc=2)
    assert one == two
    assert [i for i, _ in one[1].dropped] == [7, 21] and len(one[0]) == 28


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, suffix):
    """Issue 32: a jsonl with a BOM dropped row 0, and a .json with one was read as JSON lines."""
    rows = STANDARD[:3]
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == "jsonl" else json.dumps(rows, indent=2)
    path = tmp_path / f"bom.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    pairs, report = tok(load_records(str(path)))
    assert len(pairs) == 3 and report.dropped == [] and report.kept == 3


def test_duplicate_pairs_names_each_repeat():
    from orpo_ds.data import duplicate_pairs

    a, b = TokenizedPair(0, (1,), (2, 3), (4, 5)), TokenizedPair(1, (1,), (2, 3), (4, 6))
    repeats = [TokenizedPair(2, (1,), (2, 3), (4, 5)), TokenizedPair(3, (1,), (2, 3), (4, 5))]
    assert duplicate_pairs([a, b, *repeats]) == [2, 3] and duplicate_pairs([a, b]) == []


def test_start_up_warns_of_long_warmup_eval_on_train_and_duplicates(capsys):
    from orpo_ds.config import load_config
    from orpo_ds.train import warn_about_the_run

    cfg = load_config(None, ["model.name_or_path=m", "data.train=p.jsonl", "data.eval=./p.jsonl",
                             "train.warmup_steps=10"])
    pairs = [TokenizedPair(0, (1,), (2, 3), (4, 5)), TokenizedPair(1, (1,), (2, 3), (4, 5))]
    warn_about_the_run(cfg, steps=[object()] * 4, train_pairs=pairs)
    out = capsys.readouterr().out
    assert "train.warmup_steps=10 exceeds the run's 4 steps" in out
    assert "data.eval is data.train" in out and "1 training pair(s) repeat an earlier pair exactly (rows 1)" in out
