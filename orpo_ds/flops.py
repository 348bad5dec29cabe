"""Model FLOPs of an optimizer step and the accelerator's peak, for the ``mfu`` metric.

MFU (model FLOPs utilisation) counts the FLOPs the model needs, not the ones the hardware ran: no
recomputation from activation checkpointing, no padding. Per step of a decoder-only transformer, with
``N`` the parameters of the matmuls in the decoder layers (embeddings and head excluded), ``L`` layers,
width ``d``, vocabulary ``V``:

    6 * N * T                     every token through every layer (forward 2, backward 4 FLOPs per weight)
  + 6 * L * d * sum(s_i ** 2)     causal attention scores and values, per packed sequence of length s_i
                                  (QK^T and AV are 2 * s^2 * d each in full, half of that causally)
  + 6 * V * d * M                 the head, on the M positions that carry a label only

With ``train.share_prompt`` the count is still that of both full sequences, the work of the same step
without a shared prompt, so MFU then reads as an effective rate that sharing can push up.

Parameters that do not train still cost their forward and the backward through them, so freeze tuning
reads as a lower MFU rather than a higher one (its backward skips the weight gradients of frozen layers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the FLOP count needs no packing code
    from orpo_ds.data import TokenizedPair
    from orpo_ds.packing import ScheduledStep

# Dense bf16 tensor-core peaks, FLOP/s, of the SXM parts the planner's --gpu names.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
# Dense bf16 tensor-core peaks, FLOP/s, by the exact name ``torch.cuda.get_device_name`` returns. Source:
# NVIDIA's H100, H200 and A100 datasheets, whose bf16 figures are "with sparsity": dense is half of them
# (H100 SXM 1,979 -> 989; H100 PCIe 1,513 -> 756; H100 NVL 1,671 -> 835; H200 SXM 1,979 -> 989; H200 NVL
# 1,671 -> 835; A100 312 dense). The PCIe and NVL parts run at lower clocks and power than the SXM ones,
# so a substring match (the name contains "H100") would give them the SXM peak and understate their MFU.
DEVICE_BF16_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
}


def decoder_matmul_params(config) -> int:
    """Weights of the attention and MLP projections of all decoder layers, from a transformers config
    (Llama-style: grouped KV heads, a gated MLP). ``[d, d]`` for q and o, ``[d, d_kv]`` for k and v,
    three ``[d, d_ff]`` for gate, up and down."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    mlp = 3 * d * config.intermediate_size
    return layers * (attention + mlp)


def step_flops(config, sequence_lengths: Iterable[int], head_positions: int) -> float:
    """Model FLOPs of forward + backward over packed sequences of ``sequence_lengths`` tokens, of which
    ``head_positions`` reach the head (see the module docstring)."""
    lengths = list(sequence_lengths)
    tokens = sum(lengths)
    d = config.hidden_size
    dense = 6 * decoder_matmul_params(config) * tokens
    attention = 6 * config.num_hidden_layers * d * sum(s * s for s in lengths)
    head = 6 * config.vocab_size * d * head_positions
    return float(dense + attention + head)


def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    """The per-device peak MFU divides by: ``train.peak_tflops`` when set, else the bf16 peak of a GPU
    named exactly in :data:`DEVICE_BF16_PEAK_FLOPS`; None (no MFU) on the CPU or an unknown device, rather
    than an invented peak (set ``train.peak_tflops`` for those)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    return DEVICE_BF16_PEAK_FLOPS.get(device_name.strip())


def step_shape(plan: ScheduledStep, pairs: list[TokenizedPair], nll_on_prompt: bool) -> tuple[list[int], int]:
    """Sequence lengths of the whole step (every rank) and the positions that reach the head, from the
    plan on the host: what :func:`orpo_ds.flops.step_flops` needs, with no collective."""
    lengths, head_positions = [], 0
    for row in plan.filled_rows():
        for p in (pairs[i] for i in row):
            prompt = len(p.prompt_ids)
            lengths += [prompt + len(p.chosen_ids), prompt + len(p.rejected_ids)]
            head_positions += len(p.chosen_ids) + len(p.rejected_ids) + (prompt if nll_on_prompt else 0)
    return lengths, head_positions
