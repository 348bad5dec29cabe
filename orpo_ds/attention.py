"""Attention over packed rows that computes only the blocks each sequence needs.

A packed row holds S sequences back to back. Given no attention mask and restarting ``position_ids``,
transformers hands sdpa a dense ``[1, 1, T, T]`` block-diagonal mask, and the CPU kernel evaluates every
cell of it: ``T^2`` cells where the sequences need ``sum L_i^2 / 2``. This module's backend instead runs
causal sdpa on each sequence's slice of the row, so no ``[T, T]`` mask exists and cost does not grow with
the row budget.

Backends (``model.attn_implementation``):

* ``flash_attention_2`` / ``flash_attention_3``: flash-attn varlen, from ``cu_seqlens`` (CUDA only).
* :data:`SEGMENTED_SDPA`: registered with transformers' ``AttentionInterface`` on import; the default
  wherever flash-attn is not usable (CPU included), and the one backend for a shared prompt. It runs sdpa
  per :class:`Segment`, or on CUDA with flash-attn one varlen call over all of them, with the keys of
  each segment gathered as its context followed by its own (separate ``cu_seqlens_q`` / ``cu_seqlens_k``;
  flash-attn's causal mask is aligned to the bottom right when a segment has more keys than queries).
* :data:`VARLEN_ATTN`: PyTorch's own varlen flash attention (``torch.nn.attention.varlen``, torch >= 2.10,
  CUDA and bf16/fp16 only): the segments in one call, as above, with no flash-attn build. ``auto`` picks it
  on CUDA where flash-attn is absent, for rows without a shared prompt (its causal alignment for a segment
  with more keys than queries has not been checked on a GPU yet).
* ``sdpa`` / ``eager``: transformers' own, with the dense mask (the reference the tests compare against).

The segment metadata is host-side, built once per micro-batch from the packer's lengths, so no layer
reads the device to find the boundaries. A segment can also attend to a *context* span elsewhere in the
row before its own tokens: the shape prefix sharing needs (a response attending to the prompt it shares
with the other response of its pair).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from orpo_ds.config import ConfigError
from orpo_ds.devices import to_device

SEGMENTED_SDPA = "segmented_sdpa"
VARLEN_ATTN = "varlen_attn"
# Backends that take a packed row's boundaries as flash-attn varlen arguments.
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3"}


@dataclass(frozen=True)
class Segment:
    """Queries ``[start, end)`` of a row attend causally to keys ``[start, end)``, and before those to
    every key of ``[context_start, context_end)`` (empty by default: a plain packed sequence)."""

    start: int
    end: int
    context_start: int = 0
    context_end: int = 0

    @property
    def context_length(self) -> int:
        return self.context_end - self.context_start


def segments_from_lengths(lengths: Sequence[int]) -> tuple[Segment, ...]:
    """One plain segment per sequence of a row packed back to back with these lengths."""
    segments, start = [], 0
    for length in lengths:
        segments.append(Segment(start, start + int(length)))
        start += int(length)
    return tuple(segments)


def ulysses_sizes(heads: int, kv_heads: int, up_to: int) -> list[int]:
    """The sequence-parallel sizes (2..``up_to``) DeepSpeed's Ulysses can split these heads over: each rank
    gets ``heads / N`` query heads, and the KV heads split evenly, or are replicated when ``N`` is a
    multiple of their count."""
    return [n for n in range(2, up_to + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]


def resolve_attn_implementation(requested: str, *, share_prompt: bool = False,
                                dtype: torch.dtype | None = None) -> str:
    """``auto`` -> on CUDA in bf16/fp16, flash_attention_2 where flash-attn is installed, else
    :data:`VARLEN_ATTN` where torch has it; otherwise :data:`SEGMENTED_SDPA`. With a shared prompt always
    :data:`SEGMENTED_SDPA` (the backend whose context alignment is tested; on CUDA with flash-attn it makes
    one varlen call itself). Neither flash kernel has an fp32 kernel, so an fp32 run never gets one.
    ``dtype`` None: the run's dtype is not known yet (an early check), so only the installation is checked.
    A backend asked for by name that cannot run here is a :class:`ConfigError` that says why."""
    half = dtype is None or dtype in (torch.bfloat16, torch.float16)
    if requested in ("flash_attention_2", VARLEN_ATTN):
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            why = "the flash-attn package is not installed (pip install 'orpo-ds[flash]')"
        elif requested == VARLEN_ATTN and torch_varlen_attn() is None:
            why = f"torch {torch.__version__} has no torch.nn.attention.varlen (it needs torch >= 2.10)"
        elif not torch.cuda.is_available():
            why = "there is no CUDA device"
        elif not half:
            why = f"it has no {dtype} kernel (train.precision=bf16)"
        else:
            return requested
        raise ConfigError(f"model.attn_implementation={requested}: {why}; it runs in bf16 or fp16 on CUDA only. "
                          f"Use auto, {SEGMENTED_SDPA} or sdpa")
    if requested != "auto":
        return requested
    if share_prompt or not half or not torch.cuda.is_available():
        return SEGMENTED_SDPA
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return VARLEN_ATTN if torch_varlen_attn() is not None else SEGMENTED_SDPA


def torch_varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn``, or None in a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def backend_kwargs(implementation: str, segments: tuple[Segment, ...], cu_seqlens: torch.Tensor | None,
                   max_seqlen: int | None) -> dict:
    """The extra keyword arguments the decoder body passes down to ``implementation`` for one row."""
    if implementation in (SEGMENTED_SDPA, VARLEN_ATTN):
        return {"attention_segments": segments}
    if segments and any(seg.context_length for seg in segments):
        # The dense backends would read the continuing position ids as one long sequence, and varlen gets
        # one set of boundaries: either way a rejected response would attend to the chosen one.
        raise ValueError(f"a row with a shared prompt needs attn_implementation={SEGMENTED_SDPA!r}, not "
                         f"{implementation!r}")
    if implementation in VARLEN_ATTENTION and cu_seqlens is not None:
        return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_seqlen,
                "max_length_k": max_seqlen}
    return {}


def segmented_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, *, attention_segments: tuple[Segment, ...] | None = None,
                   scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: each segment's queries against its own keys (and its context's).

    Args:
        query: ``[1, H, T, D]``; key and value ``[1, H_kv, T, D]`` (grouped-query heads allowed).
        attention_segments: the row's :class:`Segment` s, covering ``[0, T)`` in order.
    Returns:
        ``([1, T, H, D], None)``, as transformers' attention functions do.
    """
    if attention_segments is None:
        raise ValueError(f"attn_implementation={SEGMENTED_SDPA!r} needs the row's attention_segments; run the "
                         "model through orpo_ds.model.PolicyWithChunkedHead, or load it with 'sdpa'")
    for unsupported in ("sliding_window", "softcap"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"attn_implementation={SEGMENTED_SDPA!r} has no {unsupported}; use 'sdpa' or "
                             "flash_attention_2 for this model")
    if query.shape[0] != 1:
        raise ValueError(f"{SEGMENTED_SDPA} takes one packed row, got a batch of {query.shape[0]}")
    # flash-attn: CUDA, half precision, no dropout; anything else takes the sdpa loop below.
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0 \
            and _flash_varlen() is not None:
        return _flash_segments(query, key, value, attention_segments, scaling), None
    gqa = query.shape[1] != key.shape[1]
    # split, not slicing: the backward of a split is one cat, where each slice's backward would zero-fill a
    # whole [1, H, T, D] gradient (S of them per layer).
    lengths = [seg.end - seg.start for seg in attention_segments]
    outputs = []
    for seg, q, k, v in zip(attention_segments, query.split(lengths, dim=2), key.split(lengths, dim=2),
                            value.split(lengths, dim=2), strict=True):
        if seg.context_length == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                 enable_gqa=gqa)
        else:
            # The context in full, then the own keys causally: a [L, C + L] mask, small next to [T, T].
            context = slice(seg.context_start, seg.context_end)
            k = torch.cat([key[:, :, context], k], dim=2)
            v = torch.cat([value[:, :, context], v], dim=2)
            length = seg.end - seg.start
            own = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
            mask = torch.cat([own.new_ones(length, seg.context_length), own], dim=1)
            out = masked_attention(q, k, v, mask, dropout=dropout, scale=scaling, expand_kv=gqa and query.is_cuda)
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, dropout: float,
                     scale: float | None, expand_kv: bool) -> torch.Tensor:
    """sdpa of ``q`` ``[1, H, L, D]`` over ``k``, ``v`` ``[1, H_kv, S, D]`` under a boolean ``mask``
    ``[L, S]``. ``expand_kv`` repeats each KV head over its query group first: on CUDA the flash kernel
    refuses an explicit mask and the memory-efficient one refuses grouped heads, so without it sdpa falls
    to the math kernel, which builds the full score matrix."""
    groups = q.shape[1] // k.shape[1]
    if expand_kv and groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _flash_varlen():
    """flash-attn's ``flash_attn_varlen_func``, or None where flash-attn is not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@dataclass(frozen=True)
class VarlenArgs:
    """One flash-attn varlen call for a row's segments. ``Tq = T`` queries in row order; ``Tk`` keys: each
    segment's context positions, then its own."""

    key_index: torch.Tensor  # [Tk] int64 row position of each gathered key
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    cu_seqlens_k: torch.Tensor  # [S + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int


@functools.lru_cache(maxsize=4)
def varlen_args(segments: tuple[Segment, ...], device: torch.device) -> VarlenArgs:
    """The :class:`VarlenArgs` of ``segments`` on ``device``, built on the host once per row (every layer
    of the forward and the backward reuses it: no per-layer copy) and copied without waiting for the
    device (:func:`orpo_ds.devices.to_device`)."""
    keys = [list(range(seg.context_start, seg.context_end)) + list(range(seg.start, seg.end)) for seg in segments]
    q_lengths = [seg.end - seg.start for seg in segments]
    k_lengths = [len(k) for k in keys]

    def cumulative(lengths: list[int]) -> torch.Tensor:
        return to_device(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), device)

    return VarlenArgs(to_device(torch.tensor([i for k in keys for i in k], dtype=torch.long), device),
                      cumulative(q_lengths), cumulative(k_lengths), max(q_lengths), max(k_lengths))


def _flash_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: tuple[Segment, ...],
                    scaling: float | None) -> torch.Tensor:
    """The segments through one ``flash_attn_varlen_func`` call. Shapes as :func:`segmented_sdpa`;
    returns ``[1, T, H, D]``."""
    plan = varlen_args(segments, query.device)
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1).index_select(0, plan.key_index)  # [Tk, H_kv, D]
    v = value[0].transpose(0, 1).index_select(0, plan.key_index)
    out = _flash_varlen()(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q,
                                      plan.max_seqlen_k, softmax_scale=scaling, causal=True)
    return out[None]


def torch_varlen_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          segments: tuple[Segment, ...], scaling: float | None) -> torch.Tensor:
    """The segments through one ``torch.nn.attention.varlen.varlen_attn`` call, keys gathered as
    :func:`_flash_segments` gathers them. Shapes as :func:`segmented_sdpa`; returns ``[1, T, H, D]``.

    The call's signature changed across torch versions: 2.10 takes ``is_causal`` and no ``scale``, later
    ones ``window_size`` (``(-1, 0)`` is causal) and ``scale``, and from 2.12 ``enable_gqa``; without it
    the KV heads are repeated over their query groups here."""
    import inspect

    fn = torch_varlen_attn()
    params = inspect.signature(fn).parameters
    args = varlen_args(segments, query.device)
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1).index_select(0, args.key_index)  # [Tk, H_kv, D]
    v = value[0].transpose(0, 1).index_select(0, args.key_index)
    options = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if scaling is not None and "scale" in params:
        options["scale"] = scaling
    elif scaling is not None:  # 2.10 takes no scale and uses 1/sqrt(D): fold the model's scale into q
        q = q * (scaling * q.shape[-1] ** 0.5)
    groups = q.shape[1] // k.shape[1]
    if "enable_gqa" in params:
        options["enable_gqa"] = groups > 1
    elif groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = fn(q, k, v, args.cu_seqlens_q, args.cu_seqlens_k, args.max_seqlen_q, args.max_seqlen_k, **options)
    return out[None]


def varlen_attn_segments(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, *, attention_segments: tuple[Segment, ...] | None = None,
                         scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function for :data:`VARLEN_ATTN`: the row's segments through PyTorch's own
    varlen flash attention. Arguments and result as :func:`segmented_sdpa`."""
    if attention_segments is None or dropout != 0.0:
        raise ValueError(f"attn_implementation={VARLEN_ATTN!r} needs the row's attention_segments and no dropout; "
                         f"run the model through orpo_ds.model.PolicyWithChunkedHead")
    return torch_varlen_segments(query, key, value, attention_segments, scaling), None


def _register() -> None:
    from transformers import AttentionInterface

    # No mask function is registered under this name on purpose: transformers then builds no mask at all
    # (its mask preprocessing exits early for attention functions without one).
    AttentionInterface.register(SEGMENTED_SDPA, segmented_sdpa)
    AttentionInterface.register(VARLEN_ATTN, varlen_attn_segments)


_register()
