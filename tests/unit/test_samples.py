"""Greedy answers before/after: the batched, left-padded generation of a model trained with segmented_sdpa
against a naive one-prompt greedy loop without a cache; samples.md's layout."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds.attention import SEGMENTED_SDPA
from orpo_ds.data import TokenizedPair
from orpo_ds.samples import greedy_answers, sample_pairs, samples_markdown
from tests.helpers.tokenizers import byte_ids, make_tiny_tokenizer


def _model(attn, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation=attn, eos_token_id=3, pad_token_id=0)
    return LlamaForCausalLM(cfg).float().eval()


def _naive_greedy(model, prompt, new_tokens, eos):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt):]


def test_greedy_answers_equal_a_naive_greedy_loop_and_restore_the_training_backend():
    tokenizer = make_tiny_tokenizer()
    model = _model(SEGMENTED_SDPA)
    reference = _model("sdpa")
    reference.load_state_dict(model.state_dict())
    prompts = [tuple(byte_ids("Hello there, how are you?")), tuple(byte_ids("Hi")), tuple(byte_ids("A longer one."))]
    answers = greedy_answers(model, tokenizer, prompts, new_tokens=12, synced=False, device="cpu")
    expected = [tokenizer.decode(_naive_greedy(reference, p, 12, tokenizer.eos_token_id), skip_special_tokens=True)
                .strip() for p in prompts]
    assert answers == expected and all(answers)
    assert model.config._attn_implementation == SEGMENTED_SDPA  # training continues on packed rows


def test_sample_pairs_take_the_first_prompts_of_the_file():
    pairs = [TokenizedPair(i, (5,) * (i % 2), (6, 3), (7, 3)) for i in range(8)]  # even ids: no prompt
    assert [p.pair_id for p in sample_pairs(pairs, 3)] == [1, 3, 5]
    assert sample_pairs(pairs, 0) == []


def test_samples_markdown_shows_each_answer_next_to_the_pairs_own():
    tokenizer = make_tiny_tokenizer()
    pair = TokenizedPair(4, tuple(byte_ids("What is 2+2?")), tuple(byte_ids("Four.")) + (3,),
                         tuple(byte_ids("Five.")) + (3,))
    text = samples_markdown([pair], ["I think 5"], ["It is 4" + " and more" * 100], tokenizer, new_tokens=64)
    assert "## Prompt 1 (pair 4)" in text and "> What is 2+2?" in text and "at most 64 new tokens" in text
    order = [text.index(s) for s in ("**Before training:**\n\n> I think 5", "**After training:**\n\n> It is 4",
                                     "chosen answer:**\n\n> Four.", "rejected answer:**\n\n> Five.")]
    assert order == sorted(order)
    short = samples_markdown([pair], ["I think 5"], ["It is 4" + " and more" * 100], tokenizer, new_tokens=64,
                             limit=30)
    assert " [...]" in short and len(short) < len(text) and " [...]" not in text
