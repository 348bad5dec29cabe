"""The planner's memory terms against measurements: activations and the head against the peak of real
CPU steps (dense Llamas, and mixtures of experts of two families with transformers' grouped_mm experts),
parameter counts and model states against DeepSpeed's own estimator."""

import contextlib
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen3MoeConfig

from orpo_ds.batch import micro_batch_loss, prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.ds_config import ZeroSetup
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row
from orpo_ds.plan.memory import activation_estimate, model_states
from orpo_ds.plan.shapes import load_model_config, model_shape
from tests.helpers.machine import PLAN_MEMORY_RECORD
from tests.helpers.memory import measure_peak

SHAPES = {  # name: (hidden, layers, ffn, vocab, heads, kv_heads)
    "tiny": (64, 2, 176, 512, 4, 2),
    "small": (256, 4, 688, 8192, 4, 2),
}
# Mixtures of experts, d 128, V 2048: Mixtral (8 experts of 256, top-2, renormalised top-k weights kept in
# fp32), Qwen3-MoE (16 of 64, top-4, q/k norms, weights in the model's dtype), and Qwen3-MoE with a dense
# layer before each MoE one (decoder_sparse_step 2).
MOE_SHAPES = {
    "mixtral": lambda: MixtralConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2),
    "qwen3-moe": lambda: Qwen3MoeConfig(vocab_size=2048, hidden_size=128, intermediate_size=256,
                                        moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4),
    "qwen3-moe-mixed": lambda: Qwen3MoeConfig(vocab_size=2048, hidden_size=128, intermediate_size=256,
                                              moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
                                              decoder_sparse_step=2),
}


def small_config(name):
    """A config of ``SHAPES`` (a Llama) or ``MOE_SHAPES`` by name."""
    if name in MOE_SHAPES:
        return MOE_SHAPES[name]()
    d, layers, ffn, vocab, heads, kv = SHAPES[name]
    return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv)


def packed_row(tokens, vocab, seed=0):
    """Pairs of prompt 40-120 and responses 20-80 tokens, packed up to ``tokens``."""
    rng = random.Random(seed)
    pairs, used = [], 0
    while True:
        p, c, r = rng.randint(40, 120), rng.randint(20, 80), rng.randint(20, 80)
        if used + 2 * p + c + r > tokens:
            return build_row(pairs)
        ids = lambda n: tuple(rng.randrange(3, vocab) for _ in range(n))  # noqa: E731
        pairs.append(TokenizedPair(pair_id=len(pairs), prompt_ids=ids(p), chosen_ids=ids(c - 1) + (2,),
                                   rejected_ids=ids(r - 1) + (2,)))
        used += 2 * p + c + r


@contextlib.contextmanager
def onednn_matmuls(enabled: bool):
    """PyTorch's oneDNN switch for the duration: off, a bf16 GEMM takes PyTorch's own CPU kernel on every
    x86 CPU, as it does anyway on one without AVX-512 (``use_mkldnn_bf16_matmul`` in ATen's
    ``mkldnn/Matmul.cpp`` asks for ``userEnabledMkldnn()`` and a CPU with bf16 support)."""
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


def estimates_and_measured_peaks(name, checkpointing, dtype, budgets=(512, 1024, 2048), onednn=False):
    """Forward and backward of one packed row per token budget through the trainer's policy
    (segmented_sdpa, chunked head), measured above the weights and pre-allocated gradients.

    ``onednn``: let PyTorch send bf16 GEMMs to oneDNN where the CPU supports it (its default). Off, the
    GEMMs run the same kernels on every x86 CPU CI may land on (issue 38).

    Returns ``{row_tokens: (ActivationEstimate.peak, PeakMemory)}``."""
    config = small_config(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.config._attn_implementation = "segmented_sdpa"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    policy = PolicyWithChunkedHead(model)
    shape = model_shape(config)
    results = {}
    with onednn_matmuls(onednn):
        for budget in budgets:
            results.update(_measure_one_row(policy, shape, config, budget, dtype, checkpointing))
    return results


def _measure_one_row(policy, shape, config, budget, dtype, checkpointing):
    """``{row_tokens: (estimate, PeakMemory)}`` of one packed row of about ``budget`` tokens."""
    mb = prepare_micro_batch(packed_row(budget, config.vocab_size), nll_on_prompt=False)

    def step():
        loss, _ = micro_batch_loss(policy(**mb.model_inputs()).token_logps, mb, beta=0.1,
                                   global_nll_tokens=mb.num_nll_tokens, global_pairs=mb.num_pairs)
        loss.backward()

    step()  # first-call allocations (caches, lazy state) outside the measurement
    row_tokens = mb.model_inputs()["input_ids"].numel()
    estimate = activation_estimate(shape, row_tokens, mb.head_positions.numel(), dtype.itemsize,
                                   checkpointing=checkpointing).peak
    return {row_tokens: (estimate, measure_peak(step))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize("name", [*SHAPES, *MOE_SHAPES])
def test_activation_and_head_estimate_within_20_percent_of_a_measured_cpu_step(name, checkpointing, dtype,
                                                                             record_property):
    """``ActivationEstimate.peak`` against the peak of the step's tensors, without the buffers a CPU GEMM
    library allocates and frees inside one call (``PeakMemory.tensors``), with PyTorch's oneDNN GEMMs off.

    Why both (issue 38): on a CPU with AVX-512 (Intel Xeon, with or without AMX) PyTorch sends bf16 GEMMs to
    oneDNN (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``). ATen's ``mkldnn_matmul`` copies an operand
    that is not in a layout oneDNN takes (``.contiguous()``), and oneDNN may give the output a buffer of its
    own and reorder it back: buffers inside one GEMM call, which depend on the CPU, not on the model. An
    Intel Xeon without AMX measured the whole peak of the checkpointed bf16 case at 1.26x the estimate at
    1,795 tokens. On an AVX2-only CPU (AMD EPYC here) PyTorch runs those GEMMs itself and they keep nothing.
    With oneDNN off every x86 CPU takes that path, and ``PeakMemory.tensors`` leaves out any GEMM-private
    buffer that remains. A GPU's cuBLAS keeps one fixed workspace per handle, so the planner does not model
    such buffers either. benchmarks/plan_memory_check.py prints both peaks and the CPU that gave them (with
    ``--onednn``, PyTorch's default path), and so does the suite's summary (tests/conftest.py)."""
    results = estimates_and_measured_peaks(name, checkpointing, dtype)
    ratios = {tokens: round(estimate / peak.tensors, 4) for tokens, (estimate, peak) in results.items()}
    whole = {tokens: round(estimate / peak.total, 4) for tokens, (estimate, peak) in results.items()}
    private_mib = max(peak.gemm_private for _, peak in results.values()) / 2**20
    record_property(PLAN_MEMORY_RECORD, f"tensors {ratios}, whole {whole}, GEMM-private {private_mib:.1f} MiB")
    assert all(0.8 <= r <= 1.2 for r in ratios.values()), (ratios, "whole peak:", whole)


@pytest.mark.parametrize("name", [*SHAPES, *MOE_SHAPES])
def test_parameter_counts_equal_deepspeeds_on_the_real_model(name):
    """Total and largest-layer parameters from the meta-device build equal DeepSpeed's ``model_to_params``
    on the same model built with real weights."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    config = small_config(name)
    shape = model_shape(config)
    assert (shape.total_params, shape.largest_module_params) == model_to_params(
        AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("preset", ["llama-3-8b", "llama-3-70b", "qwen2.5-72b"])  # the cluster-sized shapes
@pytest.mark.parametrize("gpus", [8, 64, 512])
def test_model_states_differ_from_deepspeeds_estimator_only_by_its_accounting(preset, gpus):
    """DeepSpeed's ZeRO-3 estimator counts 18 B per parameter (fp32 gradients for the whole partition,
    none in bf16) plus 4 B per largest-layer parameter; ZeRO-3 in bf16 holds 2 + 2 + 12. Swapping those two
    terms, the planner's figure equals the estimator's within 0.1% for the three shapes (the rest is the
    persistent small parameters ZeRO-3 keeps whole)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = model_shape(load_model_config(preset))
    zero = ZeroSetup.from_ds_config(json.loads(open("ds_configs/zero3.json").read()))
    _, deepspeed_gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        shape.total_params, shape.largest_module_params, num_gpus_per_node=8, num_nodes=gpus // 8,
        cpu_offload=False, cpu_offload_params=False)
    ours = model_states(shape, zero, gpus, dtype_bytes=2)
    in_their_accounting = ours.total + (4 - 2) * shape.trainable_params / gpus + 4 * shape.largest_module_params
    assert in_their_accounting == pytest.approx(deepspeed_gpu_bytes, rel=1e-3)
    assert ours.total == pytest.approx(16 * shape.total_params / gpus, rel=1e-2)
