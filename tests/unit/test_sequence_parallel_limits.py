"""What ``check_sequence_parallel`` refuses from the declared config, before any model loads (exit 2 through
the CLI: tests/distributed/test_sequence_parallel.py runs the world and head cases end to end)."""

import pytest
from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

from orpo_ds.config import ConfigError
from orpo_ds.distributed import check_sequence_parallel


def _llama(heads, kv_heads):
    return LlamaConfig(hidden_size=8 * heads, num_attention_heads=heads, num_key_value_heads=kv_heads)


@pytest.mark.parametrize("config", [MixtralConfig(num_local_experts=4, num_experts_per_tok=2),
                                    Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2)],
                         ids=["mixtral", "qwen3-moe"])
def test_a_mixture_of_experts_is_refused_from_its_config(config):
    with pytest.raises(ConfigError, match=r"train.sequence_parallel_size: 2 with a mixture of experts \(\d+ experts, "
                                          r"top-2\).*use train.sequence_parallel_size=1"):
        check_sequence_parallel(2, 2, config)
    check_sequence_parallel(1, 2, config)  # without sequence parallelism it trains


@pytest.mark.parametrize("size, world, heads, kv_heads", [(2, 2, 4, 2), (4, 8, 8, 2), (2, 4, 2, 1)])
def test_sizes_that_split_the_world_and_the_heads_pass(size, world, heads, kv_heads):
    check_sequence_parallel(size, world, _llama(heads, kv_heads))


@pytest.mark.parametrize("size, world, heads, kv_heads, words", [
    (3, 4, 6, 6, "3 does not divide the 4 ranks"),
    (2, 2, 3, 3, "2 cannot split the model's 3 attention heads and 3 KV heads"),
])
def test_sizes_the_world_or_the_heads_cannot_take_are_refused(size, world, heads, kv_heads, words):
    with pytest.raises(ConfigError, match=words):
        check_sequence_parallel(size, world, _llama(heads, kv_heads))
