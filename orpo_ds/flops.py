"""Model FLOPs of an optimizer step and the accelerator's peak, for the ``mfu`` metric.

MFU (model FLOPs utilisation) counts the FLOPs the model needs, not the ones the hardware ran: no
recomputation from activation checkpointing, no padding. Per step of a decoder-only transformer, with
``N`` the parameters of the matmuls in the decoder layers that one token multiplies through (embeddings
and head excluded), ``L`` layers, query/key width ``q`` and value width ``v`` (heads x head dim: both are
the width ``d`` on Llama-style models), vocabulary ``V``:

    6 * N * T                     every token through every layer (forward 2, backward 4 FLOPs per weight)
  + 3 * L * (q + v) * sum(s_i**2) causal attention scores and values, per packed sequence of length s_i
                                  (QK^T is 2 * s^2 * q and AV 2 * s^2 * v in full, half of that causally;
                                  6 * L * d * sum(s_i**2) when q = v = d)
  + 6 * V * d * M                 the head, on the M positions that carry a label only

A mixture-of-experts layer counts what one token runs (:func:`decoder_matmul_params`): its ``k`` routed
experts of ``E``, the router, and the shared experts of the families that have them; the other ``E - k``
experts are held (memory, ZeRO-3's gathers) but do not compute for that token.

With ``train.share_prompt`` the count is still that of both full sequences, the work of the same step
without a shared prompt, so MFU then reads as an effective rate that sharing can push up.

Parameters that do not train still cost their forward and the backward through them, so freeze tuning
reads as a lower MFU rather than a higher one (its backward skips the weight gradients of frozen layers).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the FLOP count needs no packing code
    from orpo_ds.data import TokenizedPair, TokenizedPairs
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


@dataclass(frozen=True)
class ExpertLayout:
    """Where a mixture-of-experts config puts its experts; widths are MLP intermediate sizes.

    Attributes:
        experts: ``E``, the routed experts of each MoE layer.
        experts_per_token: ``k``, the routed experts each token runs (top-k).
        expert_width: one routed expert's intermediate size (gate, up and down: three ``[d, w]`` weights).
        shared_width: the intermediate size of the shared expert(s) every token runs, 0 where the family
            has none (DeepSeek: ``n_shared_experts * moe_intermediate_size``; Qwen2-MoE:
            ``shared_expert_intermediate_size``).
        shared_gate: Qwen2-MoE's ``[1, d]`` sigmoid gate on its shared expert.
        moe_layers: indices of the decoder layers that have experts; the others have a dense MLP of
            ``intermediate_size``.
        normalizes_top_k: whether the router rescales a token's ``k`` weights to sum to 1 (Mixtral always;
            Qwen-MoE and DeepSeek by ``norm_topk_prob``).
    """

    experts: int
    experts_per_token: int
    expert_width: int
    shared_width: int
    shared_gate: bool
    moe_layers: tuple[int, ...]
    normalizes_top_k: bool = True

    def mlp_params(self, d: int, all_experts: bool) -> int:
        """Weights of one MoE layer's MLP: router ``[E, d]``, shared expert(s), and the routed experts one
        token runs (``k``) or, with ``all_experts``, every one of them (``E``)."""
        routed = self.experts if all_experts else self.experts_per_token
        shared = gated_mlp_params(d, self.shared_width) + (d if self.shared_gate else 0)
        return d * self.experts + shared + routed * gated_mlp_params(d, self.expert_width)


def expert_layout(config) -> ExpertLayout | None:
    """The experts of a transformers config (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3 and families
    with the same attribute names), or None for a dense model."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not experts:
        return None
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared_experts = getattr(config, "n_shared_experts", None) or 0
    qwen2_shared = getattr(config, "shared_expert_intermediate_size", None)
    return ExpertLayout(experts=experts, experts_per_token=config.num_experts_per_tok, expert_width=width,
                        shared_width=qwen2_shared or shared_experts * width,
                        shared_gate=qwen2_shared is not None, moe_layers=_moe_layer_indices(config),
                        normalizes_top_k=bool(getattr(config, "norm_topk_prob", True)))


def _moe_layer_indices(config) -> tuple[int, ...]:
    """The layers transformers builds with experts. DeepSeek: every layer from ``first_k_dense_replace``
    on (transformers does not read ``moe_layer_freq``, 1 in the published V3 config, so neither do we:
    the count follows the model that trains). Qwen-MoE: layers not in ``mlp_only_layers`` whose number
    (from 1) is a multiple of ``decoder_sparse_step``. Others (Mixtral): every layer."""
    layers = range(config.num_hidden_layers)
    first_moe = getattr(config, "first_k_dense_replace", None)
    if first_moe is not None:
        return tuple(i for i in layers if i >= first_moe)
    step = getattr(config, "decoder_sparse_step", None)
    if step is not None:
        dense = set(getattr(config, "mlp_only_layers", None) or ())
        return tuple(i for i in layers if i not in dense and (i + 1) % step == 0)
    return tuple(layers)


def gated_mlp_params(d: int, width: int) -> int:
    """A gated MLP's weights: gate and up ``[width, d]``, down ``[d, width]``."""
    return 3 * d * width


def attention_widths(config) -> tuple[int, int]:
    """Query/key and value widths of one layer's attention (heads x head dim): what QK^T and AV multiply
    over. DeepSeek's multi-head latent attention (``kv_lora_rank``) has its own head dims."""
    heads = config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):
        return heads * (config.qk_nope_head_dim + config.qk_rope_head_dim), heads * config.v_head_dim
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim, heads * head_dim


def attention_params(config) -> int:
    """One layer's attention projections. Llama-style: ``[d, d_q]`` for q and o, ``[d, d_kv]`` for k and v
    (grouped KV heads). Multi-head latent attention (DeepSeek-V2/V3): q through a ``q_lora_rank``
    bottleneck (or one ``[d, d_q]`` without it), keys and values from a ``kv_lora_rank`` latent plus a
    shared rope key, o ``[heads * v_head_dim, d]``."""
    d, heads = config.hidden_size, config.num_attention_heads
    q_width, v_width = attention_widths(config)
    if getattr(config, "kv_lora_rank", None):
        q_rank, kv_rank = config.q_lora_rank, config.kv_lora_rank
        query = (d * q_rank + q_rank * q_width) if q_rank else d * q_width
        key_value = d * (kv_rank + config.qk_rope_head_dim) + kv_rank * heads * (config.qk_nope_head_dim
                                                                                 + config.v_head_dim)
        return query + key_value + v_width * d
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv_width = kv_heads * (q_width // heads)
    return 2 * d * q_width + 2 * d * kv_width


def decoder_matmul_params(config, *, all_experts: bool = False) -> int:
    """Weights of the attention and MLP projections of all decoder layers, from a transformers config.
    A dense layer: attention (:func:`attention_params`) and a gated MLP of ``intermediate_size``. An MoE
    layer (:class:`ExpertLayout`): attention, router, shared experts and the ``k`` routed experts one
    token runs (what its FLOPs are), or every expert with ``all_experts`` (what the model holds)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    layout = expert_layout(config)
    moe_layers = len(layout.moe_layers) if layout else 0
    dense_mlp = gated_mlp_params(d, config.intermediate_size)
    mlp = (layers - moe_layers) * dense_mlp + (moe_layers * layout.mlp_params(d, all_experts) if layout else 0)
    return layers * attention_params(config) + mlp


def idle_expert_params(config) -> int:
    """Routed-expert weights a token does not run: ``(E - k)`` experts in each MoE layer (0 when dense).
    Active parameters are the model's total minus these."""
    return decoder_matmul_params(config, all_experts=True) - decoder_matmul_params(config)


def step_flops(config, sequence_lengths: Iterable[int], head_positions: int) -> float:
    """Model FLOPs of forward + backward over packed sequences of ``sequence_lengths`` tokens, of which
    ``head_positions`` reach the head (see the module docstring)."""
    lengths = list(sequence_lengths)
    tokens = sum(lengths)
    d = config.hidden_size
    dense = 6 * decoder_matmul_params(config) * tokens
    attention = 3 * config.num_hidden_layers * sum(attention_widths(config)) * sum(s * s for s in lengths)
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


def step_shape(plan: ScheduledStep, pairs: TokenizedPairs | Sequence[TokenizedPair],
               nll_on_prompt: bool) -> tuple[list[int], int]:
    """Sequence lengths of the whole step (every rank) and the positions that reach the head, from the
    plan on the host: what :func:`orpo_ds.flops.step_flops` needs, with no collective. Only the pairs'
    offsets are read (``[k]`` gathers for the step's ``k`` pairs), never their token ids."""
    from orpo_ds.data.columns import as_tokenized_pairs  # here: importing flops loads no data code

    pairs = as_tokenized_pairs(pairs)
    members = np.fromiter(itertools.chain.from_iterable(plan.filled_rows()), dtype=np.int64)  # [k] pair indices

    def field_lengths(name: str) -> np.ndarray:  # [k]
        offsets = pairs.columns[name].offsets
        return offsets[members + 1] - offsets[members]

    prompt, chosen, rejected = (field_lengths(name) for name in ("prompt_ids", "chosen_ids", "rejected_ids"))
    lengths = np.stack([prompt + chosen, prompt + rejected], axis=1).reshape(-1)  # chosen, rejected per pair
    head_positions = int(chosen.sum() + rejected.sum() + (prompt.sum() if nll_on_prompt else 0))
    return lengths.tolist(), head_positions
