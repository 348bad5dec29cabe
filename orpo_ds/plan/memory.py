"""Bytes one GPU holds during an orpo-ds step, term by term.

Model states (parameters, gradients, optimizer) follow what DeepSpeed 0.19 allocates, checked against
the engine's own tensors (:meth:`orpo_ds.engine.Engine.state_bytes`; the state-bytes tests of
tests/distributed/test_trainer.py):

=========  ===============================  ==================================================
stage      parameters / gradients            optimizer (fp32 master + AdamW's two moments)
=========  ===============================  ==================================================
0          ``b*P`` / ``b*Pt``                ``12*Pt`` (``8*Pt`` in fp32: no master copy)
1          ``b*P`` / ``b*Pt``                ``12*Pt / n``
2          ``b*P`` / ``b*Pt / n``            ``12*Pt / n``
3          ``b*P / n`` / ``b*Pt / n``        ``12*Pt / n``
=========  ===============================  ==================================================

with ``b`` the bytes of the training dtype, ``P`` all parameters, ``Pt`` the trainable ones and ``n``
the data-parallel ranks. ZeRO-3 also keeps parameters below ``stage3_param_persistence_threshold`` whole,
and at the optimizer step makes an fp32 copy of each sub-group's gradients (``sub_group_size``).

Activations are per token of a packed row, for the Llama-style layer orpo-ds runs (measured on the CPU
with ``saved_tensors_hooks``, exact for fp32 and bf16; tests/unit/test_plan_memory.py), width ``d``,
``q`` = heads x head_dim, ``k`` = the key/value width, ``f`` the MLP width:

    per trained layer   8d + 4b*d   two RMSNorms (an fp32 upcast and two dtype copies each)
                      + 3b*q + 2b*k attention: query, key, value, output and its reshaped copy
                      + 4b*f        gate, up, their SiLU and product
                      + 8 + 4*heads the norms' rsqrt, attention's log-sum-exp
    with Qwen3's q/k norms      + (4 + b)(q + k) + 4(heads + kv heads)
    in an MoE layer     f = k*w + shared width, and :func:`routing_bytes_per_token`
    once                4d + b*d    the final norm, plus RoPE's cos/sin (2b*head_dim) and 16 B of ids

With activation checkpointing a layer keeps only its input (``b*d``) and one layer is recomputed at a
time. Frozen layers (``model.trainable_layers``) save nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from orpo_ds.ds_config import ZeroSetup
from orpo_ds.flops import ExpertLayout
from orpo_ds.logps import auto_chunk_size
from orpo_ds.plan.shapes import ModelShape

ADAM_MOMENT_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, fp32
MASTER_BYTES = 4  # DeepSpeed's fp32 master copy of each trained parameter
INDEX_BYTES = 8  # int64 ids, positions, row indices


@dataclass(frozen=True)
class ModelStates:
    """Bytes of parameters, gradients and optimizer states per GPU (and what offload moves to the host)."""

    parameters: int
    gradients: int
    optimizer: int
    host: int  # on the CPU with offload: parameters and/or optimizer states

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def model_states(shape: ModelShape, zero: ZeroSetup, ranks: int, dtype_bytes: int) -> ModelStates:
    """Per-GPU model states under ``zero`` on ``ranks`` data-parallel GPUs (see the module table)."""
    b, total, trained = dtype_bytes, shape.total_params, shape.trainable_params
    if zero.stage == 3:
        persistent = shape.persistent_params(zero.persistence_threshold)
        params = b * ((total - persistent) / ranks + persistent)
    else:
        params = b * total
    grads = b * (trained / ranks if zero.stage >= 2 else trained)
    master = 0 if (zero.stage == 0 and b == MASTER_BYTES) else MASTER_BYTES
    optimizer = (master + ADAM_MOMENT_BYTES) * trained / (ranks if zero.stage >= 1 else 1)
    host = 0.0
    if zero.offload_optimizer:
        host, optimizer = host + optimizer, 0.0
    if zero.offload_param and zero.stage == 3:
        host, params = host + params, 0.0
    return ModelStates(parameters=int(params), gradients=int(grads), optimizer=int(optimizer), host=int(host))


def optimizer_step_transient(shape: ModelShape, zero: ZeroSetup, ranks: int, dtype_bytes: int) -> int:
    """ZeRO-3 flattens one sub-group's gradients and copies them to fp32 before stepping it: at most
    ``sub_group_size`` elements at a time (nothing on the GPU when the optimizer is offloaded)."""
    if zero.stage != 3 or zero.offload_optimizer:
        return 0
    elements = min(zero.sub_group_size, shape.trainable_params / ranks)
    return int(elements * (MASTER_BYTES + (dtype_bytes if dtype_bytes != MASTER_BYTES else 0)))


def gathered_parameters(shape: ModelShape, zero: ZeroSetup, dtype_bytes: int) -> int:
    """ZeRO-3's working set of whole parameters: the largest module being computed (usually the
    embedding or the head) plus the prefetched next one, capped by ``stage3_prefetch_bucket_size``."""
    if zero.stage != 3:
        return 0
    largest = max(shape.largest_module_params, shape.decoder_layer_params)
    return int(dtype_bytes * (largest + min(zero.prefetch_bucket_size, shape.decoder_layer_params)))


def communication_buffers(zero: ZeroSetup, dtype_bytes: int) -> int:
    """Gradient reduction bucket (and ZeRO-1/2's all-gather bucket), in the training dtype."""
    if zero.stage == 0:
        return 0
    gather = zero.allgather_bucket_size if zero.stage in (1, 2) else 0
    return int(dtype_bytes * (zero.reduce_bucket_size + gather))


def routing_bytes_per_token(layout: ExpertLayout, hidden: int, dtype_bytes: int) -> int:
    """What an MoE layer saves per token beyond its experts' MLP intermediates, as transformers 5's
    ``grouped_mm`` experts (its default) and top-k routers do. Per token and expert it runs: the token's
    gathered input and the expert's output (``b*d`` each), its routing weight (fp32 at most) and three
    int64 indices (the gather, the sort, its inverse). Per token: the router's fp32 probabilities ``[E]``
    and top-k indices, and where the top-k weights are renormalised their fp32 values and sum."""
    k = layout.experts_per_token
    per_assignment = 2 * dtype_bytes * hidden + 4 + 3 * INDEX_BYTES
    router = 4 * layout.experts + INDEX_BYTES * k + ((4 * k + 4) if layout.normalizes_top_k else 0)
    return k * per_assignment + router


def layer_activation_bytes_per_token(shape: ModelShape, dtype_bytes: int, *, moe: bool = False) -> int:
    """Bytes one trained decoder layer saves for backward per token (module docstring); ``moe``: one of the
    layers with experts."""
    b, d = dtype_bytes, shape.hidden
    q = shape.heads * shape.head_dim
    norms = 8 * d + 4 * b * d
    attention = 3 * b * q + 2 * b * shape.kv_width
    if shape.qk_norm:  # an fp32 upcast and a dtype copy of q and k, and each head's rsqrt
        attention += (4 + b) * (q + shape.kv_width) + 4 * (shape.heads + shape.kv_heads)
    mlp = 4 * b * shape.mlp_width(moe)
    if moe and shape.experts is not None:
        mlp += routing_bytes_per_token(shape.experts, d, b)
    return norms + attention + mlp + 8 + 4 * shape.heads


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of one packed row's forward-and-backward working set beyond the model states.

    Attributes:
        saved: what the forward pass keeps for backward (decoder layers, final norm, the head's inputs).
        head_backward: the chunked head's backward buffers (fp32 weight-gradient accumulator, chunk logits).
        layer_backward: one layer's backward at a time (its recomputation too, with checkpointing).
        full_logits: what the head would take with full ``[M, V]`` logits instead (a comparison).
    """

    saved: int
    head_backward: int
    layer_backward: int
    full_logits: int

    @property
    def peak(self) -> int:
        """Saved tensors plus the larger of the two backward phases, which run one after the other."""
        return self.saved + max(self.head_backward, self.layer_backward)


def head_backward_bytes(shape: ModelShape, head_positions: int, dtype_bytes: int, chunk_size: int | None,
                        softcap: bool = False) -> int:
    """The chunked head's backward (orpo_ds.logps): an fp32 ``[V, d]`` weight-gradient accumulator,
    ``1`` (``2`` with soft-capping) fp32 ``[C, V]`` chunk buffers, and the ``[M, d]`` input gradient.
    Below fp32 also one dtype ``[C, V]`` buffer and three dtype ``[V, d]`` tensors: the matmul output
    buffer, the gradient cast back, and the one autograd hands to the parameter (the CPU measurement's
    peak holds all three)."""
    b, v, d = dtype_bytes, shape.vocab, shape.hidden
    chunk = min(chunk_size or auto_chunk_size(v), head_positions)
    low = b != 4
    weight = (4 * v * d + (3 * b * v * d if low else 0)) if shape.head_trainable else 0
    chunks = chunk * v * (4 * (2 if softcap else 1) + (b if low else 0))
    return int(weight + chunks + b * head_positions * d)


def activation_estimate(shape: ModelShape, tokens: int, head_positions: int, dtype_bytes: int, *,
                        checkpointing: bool, chunk_size: int | None = None) -> ActivationEstimate:
    """One packed row of ``tokens`` tokens whose ``head_positions`` reach the head."""
    b, d = dtype_bytes, shape.hidden
    moe_layers = shape.trained_moe_layers
    dense_layers = shape.trainable_layers - moe_layers
    dense, moe = layer_activation_bytes_per_token(shape, b), layer_activation_bytes_per_token(shape, b, moe=True)
    per_layer = max(dense if dense_layers else 0, moe if moe_layers else 0)  # the largest one recomputed
    kept = b * d * shape.trainable_layers if checkpointing else dense_layers * dense + moe_layers * moe
    once = 4 * d + b * d + 2 * b * shape.head_dim + 2 * INDEX_BYTES
    head_inputs = head_positions * (b * d + 4 + 2 * INDEX_BYTES)  # hidden rows, log-sum-exp, rows, labels
    saved = tokens * (kept + once) + head_inputs
    # A layer's backward holds gradients of one MLP intermediate and one hidden state, and in an MoE layer
    # those of each token's k gathered inputs and expert outputs; with checkpointing it first recomputes
    # that layer's activations.
    routed = 2 * b * d * shape.experts.experts_per_token if moe_layers else 0
    layer_backward = tokens * (b * shape.ffn + b * d + routed + (per_layer if checkpointing else 0))
    # Full logits, as a trainer without the chunked head keeps them: dtype logits and their fp32
    # log-softmax saved, then an fp32 and a dtype gradient of the same size in backward; plus, for a
    # trained head, its weight gradient and the copy autograd accumulates it from.
    full_logits = head_positions * shape.vocab * (2 * b + 8) + (2 * b * shape.vocab * d if shape.head_trainable else 0)
    return ActivationEstimate(saved=int(saved), head_backward=head_backward_bytes(shape, head_positions, b, chunk_size),
                              layer_backward=int(layer_backward), full_logits=int(full_logits))
