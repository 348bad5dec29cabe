"""Liger-Kernel on CUDA: its RMSNorm / SwiGLU / RoPE kernels patched into the model, and its fused linear
cross-entropy as the head's per-token log-prob kernel (``model.liger_kernels``).

This is the only module that imports ``liger_kernel``, and it does so only once the run's device is CUDA:
on a CPU run, or with ``model.liger_kernels=off``, nothing of liger-kernel is imported. The torch chunked
head (:func:`orpo_ds.logps.chunked_token_logps`) stays the reference and the CPU path.

What Liger-Kernel 0.8.5 offers and what it lacks, read from its source:

* ``_apply_liger_kernel_to_instance(model, **kw)`` dispatches on ``config.model_type`` to
  ``apply_liger_kernel_to_<arch>(model=..., **kw)``. Given a model it rebinds the forward of the existing
  RMSNorm / MLP modules, but RoPE is a module-level function: it and the RMSNorm / MLP classes of
  ``transformers.models.<arch>.modeling_<arch>`` are replaced for the whole process. Every architecture's
  own defaults decide which layers it patches (DeepSeek and Qwen3-Next keep their RoPE, Qwen3-VL its MLP,
  Gemma gets GEGLU); only Liger's loss patches are switched off, because the head is our own.
* ``liger_fused_linear_cross_entropy(..., reduction="none")`` returns the fp32 per-token cross-entropy,
  ``-log p(label)``, 0 at ``ignore_index``. It takes a bias and ``softcap`` (``softcap * tanh(z /
  softcap)``) and gives gradients for the hidden states, the weight and the bias, recomputing the logits
  chunk by chunk in backward (as our torch head does). It has no logit scale (Cohere's ``logit_scale``,
  Granite's ``logits_scaling``): such a model keeps the torch head, and the start-up line says so.
  It reads the number of labelled tokens back to the host (``.item()``) in forward and again in backward.
  It saves ``weight.detach()`` for backward: under ZeRO-3 that alias keeps the forward's gathered
  ``lm_head.weight`` alive until backward (DeepSpeed gathers into fresh buffers and only rebinds
  ``param.data`` on release, so its values stay right), one extra ``[V, H]`` copy at the backward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from orpo_ds.config import ConfigError
from orpo_ds.logps import IGNORE_INDEX, _check_inputs

# Activations Liger's SwiGLU kernel computes (silu(gate) * up); its instance patch does not check this.
SWIGLU_ACTIVATIONS = ("silu", "swish")


@dataclass(frozen=True)
class LigerChoice:
    """What a policy runs: Liger's layer kernels (``layers``), its fused head (``head``), and why."""

    layers: bool
    head: bool
    note: str

    def __str__(self) -> str:
        if not (self.layers or self.head):
            return f"off ({self.note})"
        head = "Liger fused linear cross-entropy" if self.head else "torch chunked"
        return f"{'RMSNorm/SwiGLU/RoPE kernels' if self.layers else 'no layer kernels'}, head {head} ({self.note})"


LIGER_OFF = LigerChoice(layers=False, head=False, note="not asked for")


def _apply_fns() -> dict:
    """Liger's table ``model_type -> apply_liger_kernel_to_<arch>`` (imports liger-kernel)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN


def _why_not_here(device_type: str) -> str | None:
    """Why Liger cannot run in this process (None: it can). Imports liger-kernel only on CUDA."""
    if device_type != "cuda":
        return f"the run's device is {device_type}, and Liger's kernels are Triton GPU kernels that need CUDA"
    try:
        _apply_fns()
    except Exception as exc:  # noqa: BLE001 - ImportError, or a Triton / transformers version liger-kernel rejects
        return f"liger-kernel does not import here ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


def _why_not_architecture(model_config) -> str | None:
    """Why Liger has no patch for this model (None: it has), from its config alone."""
    fns = _apply_fns()
    model_type = getattr(model_config, "model_type", None)
    if model_type not in fns:
        return (f"liger-kernel has no patch for model_type {model_type!r} (it patches "
                f"{', '.join(sorted(fns))})")
    swiglu = inspect.signature(fns[model_type]).parameters.get("swiglu")
    act = getattr(model_config, "hidden_act", None)
    if swiglu is not None and swiglu.default is True and act not in (None, *SWIGLU_ACTIVATIONS):
        return f"Liger's SwiGLU kernel computes silu, and this {model_type} model's hidden_act is {act!r}"
    return None


def resolve(requested: str, model_config, *, device_type: str, logit_scale: float) -> LigerChoice:
    """Resolve ``model.liger_kernels`` for one model, before its weights load.

    Args:
        requested: ``auto`` | ``on`` | ``off`` (:class:`orpo_ds.config.ModelConfig`).
        model_config: the model's transformers config (``model_type``, ``hidden_act``).
        device_type: the run's device (``cuda``, ``cpu``, ...).
        logit_scale: the factor the model applies to its logits (1.0 for most models).
    Returns:
        The :class:`LigerChoice`. ``auto`` turns Liger off, saying why, where it cannot run.
    Raises:
        ConfigError: ``on`` where it cannot run (no CUDA, liger-kernel missing, no patch for the model).
    """
    if requested == "off":
        return LigerChoice(layers=False, head=False, note="model.liger_kernels=off")
    reason = _why_not_here(device_type) or _why_not_architecture(model_config)
    if reason is not None:
        if requested == "on":
            raise ConfigError(f"model.liger_kernels=on, but {reason}; set model.liger_kernels=auto (Liger "
                              f"where it can run) or off")
        return LigerChoice(layers=False, head=False, note=reason)
    if logit_scale != 1.0:
        return LigerChoice(layers=True, head=False, note=f"Liger's fused cross-entropy has no logit scale, and "
                                                          f"this model scales its logits by {logit_scale:g}")
    return LigerChoice(layers=True, head=True, note=f"model.liger_kernels={requested}")


def patch_model(model: torch.nn.Module) -> int:
    """Patch ``model`` (a transformers causal LM) in place with Liger's layer kernels for its architecture.

    Call it before the engine wraps the model: ZeRO-3 gathers a module's parameters around its forward
    whatever that forward is, so the rebound forwards read gathered weights too.

    Returns:
        How many modules now run a Liger forward (RoPE, a function, is not counted).
    Raises:
        RuntimeError: if no module was patched (a transformers layout this liger-kernel does not know).
    """
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model, cross_entropy=False, fused_linear_cross_entropy=False)
    patched = sum(m._get_name().startswith("Liger") for m in model.modules())
    if not patched:
        raise RuntimeError(f"liger-kernel patched no module of this {model.config.model_type} model; "
                           f"set model.liger_kernels=off")
    return patched


def liger_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      bias: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Log-prob of each token's label through Liger's fused linear cross-entropy (CUDA only).

    The same contract as :func:`orpo_ds.logps.chunked_token_logps` with ``logit_scale=1``:

    Args:
        hidden: ``[N, H]`` final hidden states.
        weight: ``[V, H]`` LM head weight (under ZeRO-3: the gathered one, so call this inside the
            engine-hooked forward), same dtype as ``hidden``.
        labels: ``[N]`` class ids in ``[0, V)`` or ``-100``.
        bias: ``[V]`` LM head bias or None.
        softcap: if set, ``logits = softcap * tanh(logits / softcap)``.
    Returns:
        ``[N]`` fp32 ``log P(label)``, 0 where ``labels == -100``; differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``, gradients in their dtypes.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    _check_inputs(hidden, weight, labels, bias, softcap, 1)
    # accum_dtype fp32: the weight and bias gradients add up over chunks in fp32 (as in our torch head);
    # Liger's default would accumulate a bf16 model's in bf16 and lose low bits at every chunk.
    nll = liger_fused_linear_cross_entropy(hidden, weight, labels.long(), bias=bias, ignore_index=IGNORE_INDEX,
                                           reduction="none", softcap=softcap, accum_dtype=torch.float32)
    return -nll
