"""The policy: a causal LM body plus the chunked log-prob head, in one module the engine wraps.

Under ZeRO-3 the LM head weight is partitioned (numel 0) outside a forward that the engine hooks. So
the head runs *inside* :meth:`PolicyWithChunkedHead.forward`, and ``engine.register_external_parameter``
tells ZeRO-3 that this forward reads ``lm_head.weight``. The head is the torch chunked kernel, or on CUDA
Liger's fused linear cross-entropy (``model.liger_kernels``, :mod:`orpo_ds.liger`); both read that
gathered weight inside this forward.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn

from orpo_ds import attention
from orpo_ds import distributed as dist_lib
from orpo_ds import engine as eng_lib
from orpo_ds import liger as liger_lib
from orpo_ds import lora as lora_lib
from orpo_ds.config import ConfigError, ModelConfig
from orpo_ds.ds_config import zero_stage
from orpo_ds.logps import auto_chunk_size, chunked_token_logps
from orpo_ds.router import RouterLoss, expert_token_counts, resolve_router_loss


def final_logit_scale(config) -> float:
    """The factor a model's causal-LM forward multiplies its logits by: Cohere's ``logit_scale``, or one
    over Granite's ``logits_scaling`` (its forward divides by it); 1.0 for most models."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    return scale / float(getattr(config, "logits_scaling", None) or 1.0)


def train_top_layers_only(causal_lm: nn.Module, num_layers: int) -> None:
    """Freeze everything except the last ``num_layers`` decoder layers and the final norm (freeze tuning).

    The embeddings and the output head stay frozen (tied in most small models, so freezing one freezes
    both). Autograd then stops below the lowest trainable layer, so the backward pass and the optimizer
    state shrink with the trainable share. Raises :class:`ConfigError` (the CLI's config-error exit) for a
    count the model cannot satisfy.
    """
    layers = getattr(causal_lm.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"model.trainable_layers: {type(causal_lm).__name__} has no decoder `layers` list "
                         "to choose from; leave it unset (train every layer)")
    if not 1 <= num_layers <= len(layers):
        raise ConfigError(f"model.trainable_layers: the model has {len(layers)} decoder layers, "
                         f"got {num_layers}; pick 1..{len(layers)} or leave it unset")
    causal_lm.requires_grad_(False)
    for layer in layers[len(layers) - num_layers:]:
        layer.requires_grad_(True)
    final_norm = getattr(causal_lm.get_decoder(), "norm", None)
    if final_norm is not None:
        final_norm.requires_grad_(True)


def enable_activation_checkpointing(causal_lm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer.

    transformers 5 also hooks the input embeddings so that their output requires grad, which reentrant
    checkpointing and some adapters need. Non-reentrant checkpointing does not, and under
    ``model.trainable_layers`` that hook would carry the backward pass, and each checkpointed layer's
    recomputation, through every frozen layer below the trained ones. The hook is removed, so autograd
    stops below the lowest trainable layer with checkpointing too (adapters in every layer keep the
    gradient flowing on their own)."""
    causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    causal_lm.disable_input_require_grads()


class PolicyOutput(NamedTuple):
    """What the policy returns for one packed row of T tokens with M head targets. A NamedTuple, so that
    ZeRO-3's hooks reach its tensors."""

    token_logps: torch.Tensor  # [M] fp32 log-prob of each head target's label
    # mixture of experts only (None otherwise): the router's balancing loss over the row's T tokens (fp32
    # scalar, differentiable), and the top-k assignments per MoE layer and expert ([L, E] fp32, detached)
    router_aux_loss: torch.Tensor | None = None
    expert_tokens: torch.Tensor | None = None


class PolicyWithChunkedHead(nn.Module):
    """Runs the decoder body on a packed row, then log-probs of the labelled tokens only.

    Only the ``head_positions`` reach the head: with the NLL on responses only that is a minority
    of the tokens, and on a large vocabulary the head dominates the compute.
    """

    # The causal LM is the submodule `causal_lm`: the keys of the policy's (and a checkpoint's) state
    # dict are the model's own keys under this prefix.
    STATE_PREFIX = "causal_lm."

    def __init__(self, causal_lm: nn.Module, chunk_size: int | None = None,
                 liger: liger_lib.LigerChoice = liger_lib.LIGER_OFF, router: RouterLoss | None = None):
        super().__init__()
        self.causal_lm = causal_lm
        config = causal_lm.config
        self.chunk_size = chunk_size or auto_chunk_size(config.vocab_size)
        # Final-logit transforms some architectures define (Gemma-2 soft-capping, Cohere/Granite scales).
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.logit_scale = final_logit_scale(config)
        if liger.head and self.logit_scale != 1.0:
            raise ValueError(f"Liger's fused linear cross-entropy has no logit scale; this model scales its "
                             f"logits by {self.logit_scale:g}")
        self.liger = liger  # the kernels this policy runs (build_policy patched the body's layers)
        self.router = router  # a mixture of experts: its router's loss and load are computed in forward

    @property
    def head(self) -> nn.Linear:
        return self.causal_lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, head_positions: torch.Tensor,
                head_labels: torch.Tensor, segments: tuple[attention.Segment, ...] | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """
        Args:
            input_ids: ``[1, T]`` one packed row.
            position_ids: ``[1, T]`` each sequence's positions; with no attention mask, the dense backends
                (sdpa/eager) derive the sequence boundaries where they restart at 0.
            head_positions: ``[M]`` int64 row positions whose hidden state reaches the head; a position
                may appear twice (a shared prompt's last position predicts both responses).
            head_labels: ``[M]`` the token each of those positions scores.
            segments: the row's attention segments (host metadata), for
                :data:`orpo_ds.attention.SEGMENTED_SDPA`.
            cu_seqlens: ``[S + 1]`` int32 sequence boundaries from the packer, and ``max_seqlen`` the
                longest sequence: handed to flash-attn varlen as ``cu_seq_lens_q/k`` and
                ``max_length_q/k``. Given, transformers skips deriving them from ``position_ids`` in
                every layer, which reads the device each time.
        Returns:
            :class:`PolicyOutput`: ``[M]`` fp32 log-prob of ``head_labels`` at ``head_positions``, and for
            a mixture of experts the router's balancing loss and expert counts over the row.
        """
        body = self.causal_lm.get_decoder()
        row_kwargs = attention.backend_kwargs(self.causal_lm.config._attn_implementation, segments, cu_seqlens,
                                              max_seqlen)
        if self.router is not None:
            row_kwargs["output_router_logits"] = True
        # use_cache=False: with a KV cache the packed logits no longer equal the separate ones.
        outputs = body(input_ids=input_ids, position_ids=position_ids, use_cache=False, **row_kwargs)
        # index_select's backward adds up the gradients of a position selected twice.
        selected = outputs.last_hidden_state[0].index_select(0, head_positions)  # [M, H]
        head = self.head
        if self.liger.head:
            token_logps = liger_lib.liger_token_logps(selected, head.weight, head_labels, bias=head.bias,
                                                      softcap=self.softcap)
        else:
            token_logps = chunked_token_logps(selected, head.weight, head_labels, bias=head.bias,
                                              logit_scale=self.logit_scale, softcap=self.softcap,
                                              chunk_size=self.chunk_size)
        if self.router is None:
            return PolicyOutput(token_logps)
        router_logits = tuple(outputs.router_logits)  # one [T, E] per MoE layer
        r = self.router
        return PolicyOutput(token_logps, r.balancing_loss(router_logits, r.num_experts, r.top_k).float(),
                            expert_token_counts(router_logits, r.num_experts, r.top_k))


def build_policy(m: ModelConfig, ds_config: dict, dtype: torch.dtype, *, chunk_size: int | None,
                 share_prompt: bool = False, router_aux_loss_coef: float | None = None):
    """Load ``model.name_or_path`` (partitioned while loading under ZeRO-3) and wrap it in the policy.

    With ``model.liger_kernels`` resolved on, the body's layers run Liger's kernels and the head its fused
    cross-entropy (``policy.liger`` says which and why). With ``model.lora`` the causal LM is a peft
    ``PeftModel`` whose adapters are the only trainable parameters (:mod:`orpo_ds.lora`). Returns
    ``(policy, keepalive)``: keep ``keepalive`` referenced for the run (see
    :func:`orpo_ds.engine.load_pretrained`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = attention.resolve_attn_implementation(m.attn_implementation, share_prompt=share_prompt, dtype=dtype)
    try:
        # Liger is decided from the config, before the weights load: an impossible model.liger_kernels=on
        # fails in seconds rather than after the load.
        config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
        liger = liger_lib.resolve(m.liger_kernels, config, device_type=dist_lib.comm_device().type,
                                  logit_scale=final_logit_scale(config))
        quantization = lora_lib.quantization_config(m.lora, on_gpu=dist_lib.comm_device().type == "cuda",
                                                    zero_stage=zero_stage(ds_config), dtype=dtype)
        model, keepalive = eng_lib.load_pretrained(lambda: AutoModelForCausalLM.from_pretrained(
            m.name_or_path, dtype=dtype, attn_implementation=attn, trust_remote_code=m.trust_remote_code,
            quantization_config=quantization), ds_config)
    except OSError as exc:  # the tokenizer loaded, but the weights are missing or unreadable
        raise ConfigError(f"model.name_or_path: cannot load the model weights of {m.name_or_path!r} "
                          f"({str(exc).splitlines()[0]})") from exc
    model.config.use_cache = False
    if liger.layers:
        liger = dataclasses.replace(liger, note=f"{liger.note}; {liger_lib.patch_model(model)} modules patched")
    if m.trainable_layers is not None:
        train_top_layers_only(model, m.trainable_layers)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if quantization is not None:
        model = lora_lib.prepare_quantized_base(model, gradient_checkpointing=m.gradient_checkpointing)
    if m.lora is not None:
        model = lora_lib.apply_lora(model, m.lora, m.name_or_path)
    policy = PolicyWithChunkedHead(model, chunk_size=chunk_size, liger=liger,
                                   router=resolve_router_loss(model, router_aux_loss_coef))
    eng_lib.register_external_parameter(policy, policy.head.weight)
    return policy, keepalive
