"""`orpo-ds plan` on a mixture of experts (issue 37 item 3): active and held parameters, ZeRO-3's gathers of
every expert, the expert-parallel what-if; and nothing of it for a dense model."""

import pytest
from transformers import MixtralConfig

from orpo_ds.cli import main
from orpo_ds.config import load_config
from orpo_ds.plan import Cluster, make_plan
from orpo_ds.plan.experts import routed_expert_params
from orpo_ds.plan.shapes import load_model_config, model_shape
from tests.unit.test_plan_cli import _config, _plan_json

QWEN3_TOTAL, QWEN3_ACTIVE = 30_532_122_624, 3_353_032_704  # hand counts: tests/unit/test_flops.py


def test_json_gives_active_and_held_parameters_and_the_gathers_of_every_expert(tmp_path, capsys):
    out = _plan_json(capsys, "--config", _config(tmp_path, model="qwen3-30b-a3b", grad_accum=2),
                     "--gpus-per-node", 8)
    assert out["total_params"] == QWEN3_TOTAL and out["active_params"] == QWEN3_ACTIVE
    e = out["experts"]
    assert (e["experts"], e["experts_per_token"], e["moe_layers"]) == (128, 8, 48)
    assert e["routed_expert_params"] == 48 * 128 * 3 * 2048 * 768
    # every parameter, forward and backward, bf16, 2 micro-batches, 7/8 of it from the other GPUs
    assert e["zero3_gather_bytes_per_step"] == pytest.approx(7 / 8 * 2 * 2 * 2 * QWEN3_TOTAL)
    assert e["zero3_gather_s"] == pytest.approx(e["zero3_gather_bytes_per_step"] / out["bandwidth_bytes_per_s"])
    assert e["zero3_gather_bytes_per_step"] < out["traffic_bytes_per_step"]  # the rest: the gradients' reduce


def test_expert_parallelism_gathers_only_the_experts_a_gpu_holds(tmp_path):
    """On 2 nodes of 8, EP 8: 16 experts per GPU, partitioned over the 2 GPUs (one per node) that hold the
    same ones; the other parameters over all 16 as before."""
    cfg = load_config(_config(tmp_path, model="qwen3-30b-a3b", checkpointing=True))
    plan = make_plan(cfg, Cluster.of("H100", nodes=2, gpus_per_node=8))
    ep, shape = plan.experts.expert_parallel, plan.planner.shape
    experts = routed_expert_params(shape)
    assert (ep.size, ep.experts_per_gpu) == (8, 16)
    assert ep.gather_bytes == pytest.approx(2 * 2 * ((shape.total_params - experts) * 15 / 16 + experts / 8 / 2))
    tokens_per_gpu = plan.rows.tokens_per_step / 16
    # each token to its 8 experts and back, in forward, recomputed forward and backward, 7/8 off the GPU
    assert ep.all_to_all_bytes == pytest.approx(tokens_per_gpu * 48 * 3 * 2 * 8 * 2048 * 2 * 7 / 8)


def test_text_reports_both_counts_the_gathers_and_the_what_if(tmp_path, capsys):
    assert main(["plan", "--config", str(_config(tmp_path, model="qwen3-30b-a3b"))]) == 0
    text = capsys.readouterr().out
    assert "experts 8 of 128 per token in 48/48 layers: 3.35B parameters active" in text
    assert "30.53B held" in text and "ZeRO-3 gathers every expert" in text
    assert "expert parallelism 8 (a what-if" in text and "no MoE step has been measured" in text


def test_a_dense_model_has_no_experts_figures(tmp_path, capsys):
    out = _plan_json(capsys, "--config", _config(tmp_path))
    assert out["experts"] is None and out["active_params"] == out["total_params"]
    assert main(["plan", "--config", str(_config(tmp_path))]) == 0
    text = capsys.readouterr().out
    assert "experts " not in text and "mixture of experts" not in text


def test_one_gpu_gathers_nothing_and_has_no_what_if(tmp_path):
    plan = make_plan(load_config(_config(tmp_path, model="qwen3-30b-a3b")), Cluster.of("H100", gpus_per_node=1))
    assert plan.experts.zero3_gather_bytes == 0 and plan.experts.expert_parallel is None


def test_activations_of_an_moe_layer_are_those_of_the_k_experts_a_token_runs():
    """Mixtral runs 2 experts of 14336 per token: its activations are those of an MLP of 28672, not of
    ``intermediate_size``; Qwen3-30B-A3B's 8 x 768 happens to equal its (unused) ``intermediate_size``."""
    mixtral = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                            num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
    assert model_shape(mixtral).ffn == 2 * 14336
    assert model_shape(load_model_config("qwen3-30b-a3b")).ffn == 8 * 768


def test_trained_moe_layers_follow_the_familys_layer_plan_and_the_top_layers_trained():
    """Qwen-MoE: layers whose number (from 1) is a multiple of decoder_sparse_step, less mlp_only_layers;
    DeepSeek: every layer from first_k_dense_replace on. model.trainable_layers trains the top layers."""
    from transformers import DeepseekV3Config, Qwen3MoeConfig

    qwen = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                          num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                          num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[5])  # MoE: layers 1, 3
    deepseek = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=3,
                                q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                v_head_dim=8)  # MoE: layers 3, 4
    cases = [(qwen, None, 2), (qwen, 3, 1), (qwen, 2, 0), (deepseek, None, 2), (deepseek, 1, 1)]
    for config, trainable, want in cases:
        shape = model_shape(config, trainable)
        assert shape.trained_moe_layers == want, (type(config).__name__, trainable)
