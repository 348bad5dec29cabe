"""Tiny random causal LMs saved as real transformers folders, so tests load them through from_pretrained
exactly like a user's model (and ZeRO-3 partitions them at load)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(out_dir: str | Path, tokenizer, *, hidden_size: int = 32, layers: int = 2, seed: int = 0,
                    tie_word_embeddings: bool = False) -> Path:
    """A 2-layer Llama over ``tokenizer``'s vocabulary, saved with the tokenizer into ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
