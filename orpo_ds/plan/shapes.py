"""The planner's view of a model: its transformers config and parameter counts, without any weights.

The model is built on the ``meta`` device (no memory, no weights read: a 70B model builds in well under
a second), so the counts are those of the exact module tree ``orpo-ds train`` would load, tied
embeddings and biases included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orpo_ds.config import ConfigError
from orpo_ds.flops import ExpertLayout, expert_layout, idle_expert_params
from orpo_ds.model import train_top_layers_only
from orpo_ds.model_files import read_model_config

# Model shapes by name, for planning a model this machine has no config of. Numbers are those of the
# published config.json files.
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                        tie_word_embeddings=False),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=29568, vocab_size=152064,
                        tie_word_embeddings=False),
    # Mixture of experts: 128 experts of width 768 in each of the 48 layers, 8 per token, no shared expert.
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                          norm_topk_prob=True, vocab_size=151936, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}
# Hub names of those shapes, so a recipe that names the real model plans on a machine without its config.
PRESET_ALIASES = {
    "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3-8b",
    "meta-llama/meta-llama-3-70b-instruct": "llama-3-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3-70b",
    "qwen/qwen2.5-72b-instruct": "qwen2.5-72b", "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
    "qwen/qwen3-30b-a3b-instruct-2507": "qwen3-30b-a3b", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
}


def preset_of(name_or_path: str) -> dict | None:
    """The preset shape a name stands for (a preset's own name or a hub alias), or None."""
    key = name_or_path.lower()
    return PRESETS.get(PRESET_ALIASES.get(key, key))


@dataclass(frozen=True)
class ModelShape:
    """What memory and time depend on. Counts are parameters (elements), not bytes.

    Attributes:
        config: the transformers config (``hidden_size``, ``vocab_size``, ... as the model reads them).
        total_params: every parameter once (tied weights once): what memory holds and ZeRO-3 gathers.
        active_params: those one token runs: the total less the routed experts it skips (mixture of
            experts: ``E - k`` per MoE layer, :func:`orpo_ds.flops.idle_expert_params`); the total when dense.
        trainable_params: those ``model.trainable_layers`` leaves trainable (all, when it is null).
        largest_module_params: the most parameters one module holds directly (usually the embedding):
            what ZeRO-3 gathers at once, the figure DeepSpeed's estimator calls the largest layer.
        decoder_layer_params: one decoder layer's parameters.
        persistent_params: parameters below ZeRO-3's ``stage3_param_persistence_threshold``, which every
            rank keeps whole (norm weights, biases); depends on the threshold, see :func:`persistent_params`.
        trainable_layers: decoder layers that train (and so save activations).
        head_trainable: whether the output head trains (it is frozen with ``model.trainable_layers``).
        numels: every distinct parameter's element count, for thresholds applied later.
        qk_norm: whether attention normalises its queries and keys (Qwen3's per-head ``q_norm``/``k_norm``;
            OLMo2's cover the whole projection, for which the per-head rsqrt term slightly overcounts).
    """

    config: object
    total_params: int
    active_params: int
    trainable_params: int
    largest_module_params: int
    decoder_layer_params: int
    trainable_layers: int
    head_trainable: bool
    numels: tuple[int, ...]
    qk_norm: bool = False

    @property
    def hidden(self) -> int:
        return self.config.hidden_size

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def vocab(self) -> int:
        return self.config.vocab_size

    @property
    def experts(self) -> ExpertLayout | None:
        """The mixture-of-experts layout, None for a dense model."""
        return expert_layout(self.config)

    @property
    def ffn(self) -> int:
        """The widest MLP one token runs through: ``intermediate_size``, or in an MoE layer its ``k``
        routed experts and the shared ones side by side (the activations a token saves there)."""
        layout = self.experts
        if layout is None:
            return self.mlp_width(moe=False)
        all_moe = len(layout.moe_layers) == self.layers
        return self.mlp_width(moe=True) if all_moe else max(self.mlp_width(moe=True), self.mlp_width(moe=False))

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden // self.heads

    @property
    def kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.heads

    @property
    def kv_width(self) -> int:
        """Width of the key (and of the value) projection: ``kv_heads * head_dim``."""
        return self.kv_heads * self.head_dim

    def mlp_width(self, moe: bool) -> int:
        """The MLP intermediate a token runs through in a dense layer (``intermediate_size``) or in an MoE
        layer (its ``k`` routed experts and the shared ones side by side)."""
        layout = self.experts
        if not moe or layout is None:
            return self.config.intermediate_size
        return layout.experts_per_token * layout.expert_width + layout.shared_width

    @property
    def trained_moe_layers(self) -> int:
        """MoE layers among the trained ones (``model.trainable_layers`` trains the top layers)."""
        layout = self.experts
        first_trained = self.layers - self.trainable_layers
        return 0 if layout is None else sum(i >= first_trained for i in layout.moe_layers)

    def persistent_params(self, threshold: int) -> int:
        """Parameters ZeRO-3 does not partition: those with fewer than ``threshold`` elements."""
        return sum(n for n in self.numels if n < threshold)


def load_model_config(name_or_path: str, trust_remote_code: bool = False):
    """A transformers config from a preset name (:data:`PRESETS`), a model folder or a hub name; never
    weights. Raises ConfigError naming ``model.name_or_path`` when none of these resolves
    (:func:`orpo_ds.model_files.read_model_config`)."""
    from transformers import AutoConfig

    preset = preset_of(name_or_path)
    if preset is not None:
        preset = dict(preset)
        return AutoConfig.for_model(preset.pop("model_type"), **preset)
    try:
        return read_model_config(name_or_path, trust_remote_code=trust_remote_code)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; the planner also takes one of the presets {', '.join(PRESETS)}") from exc


def model_shape(config, trainable_layers: int | None = None, lora=None) -> ModelShape:
    """Parameter counts of ``config``'s causal LM, built on the meta device. ``trainable_layers`` as
    ``model.trainable_layers``, frozen by the trainer's own :func:`~orpo_ds.model.train_top_layers_only`;
    ``lora`` (``model.lora``) wraps it in peft's adapters as the trainer does (:func:`orpo_ds.lora.apply_lora`)."""
    from transformers import AutoModelForCausalLM

    from orpo_ds.lora import apply_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if lora is not None:
            model = apply_lora(model, lora, base_name_or_path=config.name_or_path or "planned")
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    decoder = model.get_decoder().layers
    if trainable_layers is not None:
        train_top_layers_only(model, trainable_layers)  # the trainer's own freezing, so the counts match it
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    trained_layers = sum(any(p.requires_grad for p in layer.parameters()) for layer in decoder)
    per_layer = sum(p.numel() for p in decoder[0].parameters())
    head_trainable = model.get_output_embeddings().weight.requires_grad
    return ModelShape(config=config, total_params=total, active_params=total - idle_expert_params(config),
                      trainable_params=trainable,
                      largest_module_params=largest, decoder_layer_params=per_layer,
                      trainable_layers=trained_layers, head_trainable=head_trainable,
                      numels=tuple(p.numel() for p in unique.values()),
                      qk_norm=hasattr(getattr(decoder[0], "self_attn", None), "q_norm"))
