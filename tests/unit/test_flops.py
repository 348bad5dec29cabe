"""The FLOP count behind the ``mfu`` metric, against the model's real weights and torch's FLOP counter."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds.batch import micro_batch_loss, prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.flops import decoder_matmul_params, expert_layout, idle_expert_params, peak_flops, step_flops
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row

V = 97


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                        num_attention_heads=6, num_key_value_heads=2, attn_implementation="sdpa"))


def test_decoder_matmul_params_equal_the_linear_weights_of_the_layers():
    model = _model()
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert decoder_matmul_params(model.config) == linear


def test_matmul_flops_equal_torchs_count_of_a_training_step():
    """Dense and head terms against FlopCounterMode's matmul FLOPs of one real forward + backward of the
    policy on a packed row (sdpa on the CPU runs no matmul op that the counter sees for attention)."""
    model = _model()
    rng = random.Random(0)
    ids = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    pairs = [TokenizedPair(i, ids(3, 11), ids(2, 7) + (2,), ids(2, 7) + (2,)) for i in range(4)]
    row = build_row(pairs)
    mb = prepare_micro_batch(row, nll_on_prompt=False)
    policy = PolicyWithChunkedHead(model, chunk_size=16)
    with FlopCounterMode(display=False) as counter:
        loss, _ = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=0.1, global_nll_tokens=1,
                                   global_pairs=1)
        loss.backward()
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if op.__name__.split(".")[0] in ("mm", "addmm", "bmm", "matmul"))
    cfg, head = model.config, mb.head_positions.numel()
    lengths = row.seq_lengths.tolist()
    assert head == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    attention_term = 6 * cfg.num_hidden_layers * cfg.hidden_size * sum(s * s for s in lengths)
    assert step_flops(cfg, lengths, head) - attention_term == matmul


def test_peak_comes_from_the_override_or_the_table_and_never_for_the_cpu():
    assert peak_flops("NVIDIA H200", None) == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3", 500.0) == 500e12
    assert peak_flops(None, None) is None and peak_flops("Some Future GPU", None) is None


def test_the_peak_matches_the_exact_device_name_not_a_substring():
    """Issue 34 item 6: H100 PCIe and NVL got the SXM part's peak because their names contain "H100"."""
    assert peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", None) == 756e12 and peak_flops("NVIDIA H100 NVL", None) == 835e12
    assert peak_flops("NVIDIA H200 NVL", None) == 835e12
    assert peak_flops("NVIDIA H100 something new", None) is None


def test_attention_term_is_half_of_an_independent_count_of_full_attention():
    """The attention term, checked against torch's own count rather than its own formula: eager attention
    on each sequence alone runs QK^T and AV as ``bmm`` over the full ``[s, s]`` score matrix, 12 * d * s^2
    FLOPs per layer for forward + backward. ``step_flops`` counts the causal half that flash-attention
    does, so it must be exactly half of the counted figure, for any lengths."""
    model = _model()
    model.config._attn_implementation = "eager"
    cfg, lengths = model.config, [5, 9, 14, 1]
    counted = 0
    for s in lengths:
        ids = torch.randint(3, V, (1, s))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, use_cache=False).logits.sum().backward()
        counts = counter.get_flop_counts()["Global"]
        counted += sum(v for op, v in counts.items() if op.__name__.split(".")[0] == "bmm")
    attention_term = step_flops(cfg, lengths, 0) - 6 * decoder_matmul_params(cfg) * sum(lengths)
    assert counted > 0 and attention_term * 2 == counted


# Mixture of experts (issue 37 item 3): active parameters for FLOPs, every parameter for memory. Each hand
# count below is arithmetic from the published config.json; the model built on the meta device (no
# weights) must hold exactly the hand total, and its decoder matrices exactly what the config-derived
# count says every expert holds.

def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _total_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _decoder_matrix_params(model) -> int:
    """Decoder-layer weights of two or more dims: projections, routers, fused ``[E, ., .]`` experts (not
    norms or biases)."""
    return sum(p.numel() for p in model.get_decoder().layers.parameters() if p.dim() >= 2)


def _mixtral_8x7b():
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                         tie_word_embeddings=False)


def _deepseek_v3():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                            n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3,
                            q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                            v_head_dim=128, n_group=8, topk_group=4, vocab_size=129280, tie_word_embeddings=False)


def _check_against_the_meta_model(config, hand_active, hand_idle, hand_total):
    model = _meta_model(config)
    assert decoder_matmul_params(config) == hand_active
    assert idle_expert_params(config) == hand_idle
    assert _total_params(model) == hand_total
    assert decoder_matmul_params(config, all_experts=True) == _decoder_matrix_params(model)


def test_mixtral_8x7b_counts_two_experts_per_token_of_eight():
    d, layers, vocab, expert = 4096, 32, 32000, 3 * 4096 * 14336           # an expert: gate, up, down
    attention = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096                # q, k and v (8 KV heads of 128), o
    router = 4096 * 8
    active = layers * (attention + router + 2 * expert)                    # 12,617,515,008
    idle = layers * 6 * expert                                             # 33,822,867,456
    total = active + idle + layers * 2 * d + d + 2 * vocab * d             # norms, embedding, head: 46,702,792,704
    _check_against_the_meta_model(_mixtral_8x7b(), active, idle, total)
    assert total - idle == 12_879_925_248                                  # "12.9B active" (Mistral's figure)


def test_qwen3_30b_a3b_counts_eight_experts_of_768_not_the_dense_intermediate_size():
    from orpo_ds.plan.shapes import load_model_config

    d, layers, vocab, expert = 2048, 48, 151936, 3 * 2048 * 768
    attention = 2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 32 * 128 * 2048    # q (32 heads of 128), k and v (4), o
    router = 2048 * 128
    active = layers * (attention + router + 8 * expert)                    # 2,730,491,904
    idle = layers * 120 * expert                                           # 27,179,089,920
    norms = layers * (2 * d + 2 * 128) + d                                 # + q_norm and k_norm per layer
    total = active + idle + norms + 2 * vocab * d                          # 30,532,122,624
    _check_against_the_meta_model(load_model_config("qwen3-30b-a3b"), active, idle, total)
    assert total - idle == 3_353_032_704                                   # "3.3B activated" (Qwen's figure)


def test_deepseek_v3_counts_dense_layers_shared_expert_and_latent_attention():
    d, layers, dense_layers, vocab, heads = 7168, 61, 3, 129280, 128
    attention = (7168 * 1536 + 1536 * heads * (128 + 64)                  # q through its 1536 bottleneck
                 + 7168 * (512 + 64) + 512 * heads * (128 + 128)           # kv latent + rope key, then k and v
                 + heads * 128 * 7168)                                     # o
    expert = 3 * 7168 * 2048
    moe_active = 256 * 7168 + expert + 8 * expert                          # router, 1 shared, 8 of 256 routed
    active = layers * attention + dense_layers * 3 * 7168 * 18432 + (layers - dense_layers) * moe_active
    idle = (layers - dense_layers) * 248 * expert                          # 633,474,121,728
    norms = layers * (2 * d + 1536 + 512) + d
    total = active + idle + norms + 2 * vocab * d                          # 671,026,404,352
    _check_against_the_meta_model(_deepseek_v3(), active, idle, total)
    assert total - idle == 37_552_282_624                                  # "671B total, 37B activated" (DeepSeek)


@pytest.mark.parametrize("kind, shape", [
    ("qwen2_moe", dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                       decoder_sparse_step=2, mlp_only_layers=[3])),
    ("qwen3_moe", dict(moe_intermediate_size=32, num_experts=4, mlp_only_layers=[0], head_dim=24)),
    ("deepseek_v3", dict(moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=2, first_k_dense_replace=1,
                         q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                         n_group=1, topk_group=1)),
])
def test_every_expert_counted_from_the_config_equals_the_models_matrices(kind, shape):
    """Shared experts and their gate, dense layers among the MoE ones, q without its bottleneck: the
    config-derived count of every expert equals the model's own matrices, and a dense layer counts as dense."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(kind, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, vocab_size=100,
                                  **shape)
    assert decoder_matmul_params(config, all_experts=True) == _decoder_matrix_params(_meta_model(config))
    layout = expert_layout(config)
    assert 0 < len(layout.moe_layers) < 4
    assert idle_expert_params(config) == len(layout.moe_layers) * 2 * 3 * 64 * 32  # E - k = 2 idle experts


def test_a_dense_model_has_no_experts_and_no_idle_parameters():
    config = _model().config
    assert expert_layout(config) is None and idle_expert_params(config) == 0
    assert decoder_matmul_params(config, all_experts=True) == decoder_matmul_params(config)


def test_moe_matmul_flops_equal_torchs_count_of_a_mixtral_step():
    """Each token runs exactly ``k`` experts, so the active count is exact: the matmul FLOPs torch counts
    in a tiny Mixtral's forward + backward (eager experts, a matmul per expert that FlopCounterMode sees;
    sdpa attention, which it does not) equal ``step_flops`` less the attention term."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           attn_implementation="sdpa", experts_implementation="eager")  # torch counts no grouped_mm
    model = MixtralForCausalLM(config)
    ids = torch.randint(3, V, (1, 13))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if op.__name__.split(".")[0] in ("mm", "addmm", "bmm", "matmul"))
    attention_term = 6 * config.num_hidden_layers * config.hidden_size * 13 * 13
    assert step_flops(config, [13], 13) - attention_term == matmul


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_step_shape_from_the_offsets_equals_a_count_over_the_pairs(nll_on_prompt):
    """step_shape reads only the columns' offsets; the naive count builds each pair and measures it."""
    from orpo_ds.data import as_tokenized_pairs
    from orpo_ds.flops import step_shape
    from orpo_ds.packing import schedule_epoch

    rng = random.Random(3)
    pairs = [TokenizedPair(i, tuple(range(rng.randint(1, 30))), tuple(range(rng.randint(1, 20))) + (2,),
                           tuple(range(rng.randint(0, 20))) + (2,)) for i in range(60)]
    columns = as_tokenized_pairs(pairs)
    for step in schedule_epoch(columns, 128, 2, 2, seed=0, epoch=0):
        members = [pairs[i] for row in step.filled_rows() for i in row]
        want_lengths = [n for p in members for n in (len(p.prompt_ids) + len(p.chosen_ids),
                                                     len(p.prompt_ids) + len(p.rejected_ids))]
        want_head = sum(len(p.chosen_ids) + len(p.rejected_ids) + (len(p.prompt_ids) if nll_on_prompt else 0)
                        for p in members)
        assert step_shape(step, columns, nll_on_prompt) == (want_lengths, want_head)
        assert step_shape(step, pairs, nll_on_prompt) == (want_lengths, want_head)  # a list of pairs too
