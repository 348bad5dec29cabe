"""A tiny, deterministic, in-memory fast tokenizer for tests (nothing is downloaded).

:func:`make_tiny_tokenizer` builds a byte-level tokenizer with **no merges**: every UTF-8 byte is one
token, so any text round-trips and the ids of plain text are known without running the tokenizer::

    id(byte b) = 4 + b                      # e.g. "H" (0x48) -> 76, "\\n" (0x0a) -> 14
    0 <pad>   1 <s>   2 <|im_start|>   3 <|im_end|>      # special tokens, matched before byte splitting

    len(tokenizer) == 260 (<= 300, so tiny models built on it stay tiny)
    eos_token = "<|im_end|>" (3), pad_token = "<pad>" (0), bos_token = "<s>" (1)

With ``chat_template=True`` it carries a ChatML template of the same shape as SmolLM2's (minus SmolLM2's
default system message)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n      per message
    <|im_start|>assistant\\n                          generation prompt

A BOS is only added by ``tokenizer(text)`` when ``add_bos=True`` (SmolLM2-style tokenizers add none).
Use :func:`byte_ids` to write expected ids in tests.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "BYTE_OFFSET", "PAD_ID", "BOS_ID", "IM_START_ID", "EOS_ID",
           "make_tiny_tokenizer", "byte_ids"]

SPECIAL_TOKENS = ("<pad>", "<s>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, IM_START_ID, EOS_ID = 0, 1, 2, 3
BYTE_OFFSET = len(SPECIAL_TOKENS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode char map, the alphabet of the ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def byte_ids(text: str) -> list[int]:
    """The ids the tiny tokenizer gives plain text (text without special-token strings)."""
    return [BYTE_OFFSET + b for b in text.encode("utf-8")]


def make_tiny_tokenizer(chat_template: bool = True, *, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A fresh 260-token byte-level fast tokenizer (see the module docstring for the exact id layout).

    Args:
        chat_template: attach the ChatML template (``tokenizer.chat_template`` is None otherwise).
        add_bos: make ``tokenizer(text)`` (with special tokens) prepend ``<s>``.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = BYTE_OFFSET + b
    # No merges: BPE then splits every pre-token into single bytes, all of which are in the vocab.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    name = "tiny-bytelevel-chatml" if chat_template else "tiny-bytelevel"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        chat_template=CHATML_TEMPLATE if chat_template else None,
        name_or_path=name + ("-bos" if add_bos else ""), model_max_length=1 << 20)
    assert len(tokenizer) == BYTE_OFFSET + 256 and tokenizer.eos_token_id == EOS_ID
    return tokenizer
