"""LoRA (and QLoRA) through peft: adapters on the body's linear layers, a frozen base and a frozen head
unless ``model.lora.train_head`` asks for the head's weight to train too.

The policy wraps the ``PeftModel`` itself, so the engine's state dict, its checkpoints and the gathered
state of :meth:`orpo_ds.engine.Engine.full_state_dict` carry peft's own keys
(``base_model.model.<the model's key>``, with ``base_layer`` / ``lora_A.default`` / ``lora_B.default``
inside adapted layers). Everything that writes an adapter or a merged model goes through peft
(``save_pretrained`` with that state dict, ``merge_and_unload``), so the folders are peft's own format.

Under ZeRO-3 the base weights are already partitioned when peft wraps the layers (peft reads their
``ds_shape``), and the adapters it adds are plain tensors that ``deepspeed.initialize`` partitions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from orpo_ds.config import ConfigError, LoraConfig

ADAPTER_CONFIG = "adapter_config.json"  # peft's name: a folder holding it is an adapter (or names one)


def peft_config(lora: LoraConfig, base_name_or_path: str):
    """peft's ``LoraConfig`` for ``model.lora`` (a causal-LM task, so ``PeftModel.from_pretrained`` of the
    saved folder gives a ``PeftModelForCausalLM``)."""
    import peft

    targets = "all-linear" if lora.target_modules == ("all-linear",) else list(lora.target_modules)
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                           task_type="CAUSAL_LM", base_model_name_or_path=base_name_or_path)


def check_head_untouched(causal_lm: nn.Module, lora: LoraConfig) -> None:
    """The chunked head reads ``lm_head.weight`` directly, so an adapter on the head would be skipped
    silently: a ``target_modules`` entry that names it is refused (ConfigError)."""
    head_names = [name for name, module in causal_lm.named_modules() if module is causal_lm.get_output_embeddings()]
    for target in lora.target_modules:
        for name in head_names:
            if target != "all-linear" and (name == target or name.endswith(f".{target}")):
                raise ConfigError(f"model.lora.target_modules: {target!r} is the output head ({name}); the "
                                  f"chunked head reads its weight directly, so an adapter on it would be "
                                  f"skipped. Remove it, and set model.lora.train_head=true to train the "
                                  f"head's weight itself")


def apply_lora(causal_lm: nn.Module, lora: LoraConfig, base_name_or_path: str) -> nn.Module:
    """Freeze ``causal_lm`` and wrap it in a ``PeftModel`` whose adapters are the trainable parameters.

    The head and the embeddings stay frozen (peft's all-linear skips the output layer), unless
    ``lora.train_head``: then the head's own weight (and bias) trains too. It is the base tensor itself,
    not a copy beside it (peft's ``modules_to_save`` would deep-copy a ZeRO-3-partitioned parameter), so
    in a model with tied embeddings the input embeddings move with it.
    """
    import peft

    check_head_untouched(causal_lm, lora)
    try:
        model = peft.get_peft_model(causal_lm, peft_config(lora, base_name_or_path))
    except ValueError as exc:  # peft's message names the modules it could not find
        raise ConfigError(f"model.lora.target_modules: {exc}") from exc
    if lora.train_head:
        model.get_output_embeddings().requires_grad_(True)
    return model


def prepare_quantized_base(causal_lm: nn.Module, *, gradient_checkpointing: bool) -> nn.Module:
    """QLoRA's 4-bit base made ready for adapters, by peft's ``prepare_model_for_kbit_training``: the base
    frozen, and the embeddings' output requiring grad so that checkpointed layers still pass gradients to
    the adapters.

    peft also upcasts every parameter that is not 4-bit (norms, embeddings, head) to fp32, and the
    adapters apply_lora adds next are fp32. DeepSpeed undoes that: with ``bf16`` on it casts every float
    parameter of the module to bf16 at ``deepspeed.initialize`` (DeepSpeed 0.19 keeps only buffers in
    fp32), so they all compute in bf16, while ZeRO's optimizer keeps the adapters' master weights and
    Adam state in fp32. Tested on the CPU (tests/unit/test_lora.py); docs/configuration.md says the same.
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(causal_lm, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def trains_head(model: nn.Module) -> bool:
    """Whether the output head's weight is trained (``model.lora.train_head``) in the PeftModel ``model``."""
    return model.get_output_embeddings().weight.requires_grad


def is_lora(model: nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def quantization_config(lora: LoraConfig | None, *, on_gpu: bool, zero_stage: int, dtype: torch.dtype):
    """QLoRA's 4-bit NF4 base through bitsandbytes, or None without ``model.lora.load_in_4bit``.

    ConfigError where it cannot run: it needs CUDA and bitsandbytes, and DeepSpeed cannot partition
    bitsandbytes' packed 4-bit weights (ZeRO-3 here); ZeRO 0-2 partition only the adapters' states.
    """
    if lora is None or not lora.load_in_4bit:
        return None
    if not on_gpu:
        raise ConfigError("model.lora.load_in_4bit: QLoRA's 4-bit base runs on CUDA only (bitsandbytes' "
                          "kernels); this run has no GPU. Set model.lora.load_in_4bit=false for LoRA on a "
                          "full-precision base")
    if zero_stage == 3:
        raise ConfigError("model.lora.load_in_4bit: ZeRO-3 cannot partition 4-bit weights; use "
                          "deepspeed.config=ds_configs/zero2.json (the 4-bit base is small; the adapters' "
                          "states are what ZeRO shards)")
    try:
        import bitsandbytes  # noqa: F401 - the extra must be installed, transformers imports it lazily
    except ImportError as exc:
        raise ConfigError("model.lora.load_in_4bit: bitsandbytes is not installed; pip install bitsandbytes") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Write the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) of the
    ``PeftModel`` ``model`` from ``state``, its full gathered state dict (peft keeps the adapter keys).

    With a trained head, peft's ``save_embedding_layers`` adds the head's and the input embeddings'
    weights, which ``PeftModel.from_pretrained`` loads over the base's and ``merge_and_unload`` keeps.
    """
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True,
                          save_embedding_layers=trains_head(model))


def rebuild_from_state(base_config, adapter_dir: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, *,
                       train_head: bool = False):
    """A ``PeftModel`` on the CPU holding ``state`` (a checkpoint's consolidated state dict in peft's
    keys, base weights included), built from the model config and the adapter config in
    ``adapter_dir``: an export needs neither the base model's folder nor a GPU. ``train_head``
    (the run's ``model.lora.train_head``) marks the head as trained, so :func:`save_adapter` writes it."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    adapter_config = peft.PeftConfig.from_pretrained(adapter_dir)
    trained_on = adapter_config.base_model_name_or_path
    model = peft.get_peft_model(base, adapter_config)
    model.get_output_embeddings().requires_grad_(train_head)
    # peft records the model it wrapped (here the checkpoint's hf/ folder); the saved adapter names the
    # base it was trained on, which is what PeftModel.from_pretrained of it should load.
    model.peft_config["default"].base_model_name_or_path = trained_on
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {f"base_model.model.{k}" for k in (getattr(base, "_tied_weights_keys", None) or [])}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"the checkpoint does not match its model and adapter configs: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model
