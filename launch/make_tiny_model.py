"""Make a tiny random Llama (with a byte-level tokenizer) and a learnable preference data set, for smoke runs.

    python launch/make_tiny_model.py --model OUT/tiny-model --pairs OUT/pairs.jsonl [--num-pairs 128]

Nothing is downloaded. The model folder loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` like any other. The data: prompts mix all letters, chosen responses use
only a-m and rejected ones only n-z, so the ORPO loss of a model that learns this falls within a few dozen
steps. Standalone on purpose: launch/ must not import from tests/.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer():
    """A 260-token byte-level BPE without merges: 4 special tokens, then one token per byte."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(byte_chars)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", chat_template=CHATML, model_max_length=1 << 20)


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(ch) in printable:
        return ord(ch)
    missing = [b for b in range(256) if b not in printable]
    return missing[ord(ch) - 256]


def save_tiny_model(out: Path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    first, second = "abcdefghijklm", "nopqrstuvwxyz"

    def text(alphabet: str, lo: int, hi: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))

    rows = [{"prompt": text(first + second, 4, 12) + "?", "chosen": text(first, 3, 10),
             "rejected": text(second, 3, 10)} for _ in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="folder to write the tiny model + tokenizer to")
    p.add_argument("--pairs", type=Path, help="jsonl file to write prompt/chosen/rejected pairs to")
    p.add_argument("--num-pairs", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.model:
        print(f"model: {save_tiny_model(args.model, hidden_size=args.hidden_size, seed=args.seed)}")
    if args.pairs:
        print(f"pairs: {write_pairs(args.pairs, args.num_pairs, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
