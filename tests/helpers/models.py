"""Tiny random causal LMs saved as real transformers folders, so tests load them through from_pretrained
exactly like a user's model (and ZeRO-3 partitions them at load)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(out_dir: str | Path, tokenizer, *, hidden_size: int = 32, layers: int = 2, seed: int = 0,
                    tie_word_embeddings: bool = False, heads: int = 4, kv_heads: int = 2) -> Path:
    """A 2-layer Llama over ``tokenizer``'s vocabulary, saved with the tokenizer into ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_tiny_moe(out_dir: str | Path, tokenizer, family: str, *, coef: float = 0.05, seed: int = 0) -> Path:
    """A 2-layer mixture of experts (4 experts, top-2) of ``family`` (``mixtral`` or ``qwen3_moe``) over
    ``tokenizer``'s vocabulary, its router loss on (``output_router_logits``, ``router_aux_loss_coef=coef``),
    saved with the tokenizer into ``out_dir``."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config_cls, model_cls, experts = {
        "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 4}),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, {"num_experts": 4, "moe_intermediate_size": 16}),
    }[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                        output_router_logits=True, router_aux_loss_coef=coef, max_position_embeddings=2048,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **experts)
    out_dir = Path(out_dir)
    model_cls(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
