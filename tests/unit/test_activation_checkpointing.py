"""``model.enable_activation_checkpointing``: under ``model.trainable_layers`` the backward pass, and each
checkpointed layer's recomputation, stop below the lowest trained layer, and the trained layers' gradients
equal those of the same step without checkpointing (the naive reference)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds.model import enable_activation_checkpointing, train_top_layers_only


def _step(trainable_layers, checkpointing):
    """Forward calls of each decoder layer over one forward and backward, and the trained gradients."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    if trainable_layers is not None:
        train_top_layers_only(model, trainable_layers)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(3, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return calls, grads


@pytest.mark.parametrize("trainable_layers", [1, 3, None])
def test_checkpointing_recomputes_only_the_trained_layers_and_keeps_their_gradients(trainable_layers):
    calls, grads = _step(trainable_layers, checkpointing=True)
    trained = 4 if trainable_layers is None else trainable_layers
    assert calls == [1] * (4 - trained) + [2] * trained  # frozen layers: forward only, never recomputed
    _, reference = _step(trainable_layers, checkpointing=False)
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)
