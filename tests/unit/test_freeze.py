"""Freeze tuning (``model.trainable_layers``): which parameters train, and that freezing leaves the
gradients of the trainable ones exactly what full fine-tuning computes for them."""

from __future__ import annotations

import pytest
import torch

from orpo_ds.config import ConfigError, load_config
from orpo_ds.model import train_top_layers_only


def _tiny_llama(layers: int = 3, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_only_the_top_layers_and_final_norm_train(tie):
    model = _tiny_llama(layers=3, tie=tie)
    train_top_layers_only(model, 2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, _ in model.named_parameters()
                if name.startswith(("model.layers.1.", "model.layers.2.")) or name == "model.norm.weight"}
    assert trainable == expected
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad


def test_trainable_gradients_equal_those_of_full_fine_tuning():
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    full = _tiny_llama(layers=3)
    full(input_ids=ids, labels=ids).loss.backward()

    frozen = _tiny_llama(layers=3)  # the same seed: the same weights
    train_top_layers_only(frozen, 1)
    frozen(input_ids=ids, labels=ids).loss.backward()

    full_grads = dict(full.named_parameters())
    for name, p in frozen.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, full_grads[name].grad, rtol=1e-5, atol=1e-7)
        else:
            assert p.grad is None, name  # autograd never reached it: no wasted backward work
    assert frozen.model.layers[0].self_attn.q_proj.weight.grad is None


@pytest.mark.parametrize("count", [0, 4])
def test_a_layer_count_the_model_lacks_is_an_error_naming_the_key(count):
    with pytest.raises(ConfigError, match=r"model\.trainable_layers.*3 decoder layers"):
        train_top_layers_only(_tiny_llama(layers=3), count)


def test_config_rejects_a_non_positive_layer_count():
    with pytest.raises(ConfigError, match="model.trainable_layers"):
        load_config(None, ["model.name_or_path=m", "data.train=t.jsonl", "model.trainable_layers=0"])
    cfg = load_config(None, ["model.name_or_path=m", "data.train=t.jsonl", "model.trainable_layers=2"])
    assert cfg.model.trainable_layers == 2
