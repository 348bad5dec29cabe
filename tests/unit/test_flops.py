"""The FLOP count behind the ``mfu`` metric, against the model's real weights and torch's FLOP counter."""

from __future__ import annotations

import random

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_ds.batch import micro_batch_loss, prepare_micro_batch
from orpo_ds.data import TokenizedPair
from orpo_ds.flops import decoder_matmul_params, peak_flops, step_flops
from orpo_ds.model import PolicyWithChunkedHead
from orpo_ds.packing import build_row

V = 97


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                        num_attention_heads=6, num_key_value_heads=2, attn_implementation="sdpa"))


def test_decoder_matmul_params_equal_the_linear_weights_of_the_layers():
    model = _model()
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert decoder_matmul_params(model.config) == linear


def test_matmul_flops_equal_torchs_count_of_a_training_step():
    """Dense and head terms against FlopCounterMode's matmul FLOPs of one real forward + backward of the
    policy on a packed row (sdpa on the CPU runs no matmul op that the counter sees for attention)."""
    model = _model()
    rng = random.Random(0)
    ids = lambda lo, hi: tuple(rng.randrange(3, V) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    pairs = [TokenizedPair(i, ids(3, 11), ids(2, 7) + (2,), ids(2, 7) + (2,)) for i in range(4)]
    row = build_row(pairs)
    mb = prepare_micro_batch(row, nll_on_prompt=False)
    policy = PolicyWithChunkedHead(model, chunk_size=16)
    with FlopCounterMode(display=False) as counter:
        loss, _ = micro_batch_loss(policy(**mb.model_inputs()), mb, beta=0.1, global_nll_tokens=1, global_pairs=1)
        loss.backward()
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if op.__name__.split(".")[0] in ("mm", "addmm", "bmm", "matmul"))
    cfg, head = model.config, mb.head_positions.numel()
    lengths = row.seq_lengths.tolist()
    assert head == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    attention_term = 6 * cfg.num_hidden_layers * cfg.hidden_size * sum(s * s for s in lengths)
    assert step_flops(cfg, lengths, head) - attention_term == matmul


def test_peak_comes_from_the_override_or_the_table_and_never_for_the_cpu():
    assert peak_flops("NVIDIA H200", None) == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3", 500.0) == 500e12
    assert peak_flops(None, None) is None and peak_flops("Some Future GPU", None) is None


def test_the_peak_matches_the_exact_device_name_not_a_substring():
    """Issue 34 item 6: H100 PCIe and NVL got the SXM part's peak because their names contain "H100"."""
    assert peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", None) == 756e12 and peak_flops("NVIDIA H100 NVL", None) == 835e12
    assert peak_flops("NVIDIA H200 NVL", None) == 835e12
    assert peak_flops("NVIDIA H100 something new", None) is None


def test_attention_term_is_half_of_an_independent_count_of_full_attention():
    """The attention term, checked against torch's own count rather than its own formula: eager attention
    on each sequence alone runs QK^T and AV as ``bmm`` over the full ``[s, s]`` score matrix, 12 * d * s^2
    FLOPs per layer for forward + backward. ``step_flops`` counts the causal half that flash-attention
    does, so it must be exactly half of the counted figure, for any lengths."""
    model = _model()
    model.config._attn_implementation = "eager"
    cfg, lengths = model.config, [5, 9, 14, 1]
    counted = 0
    for s in lengths:
        ids = torch.randint(3, V, (1, s))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, use_cache=False).logits.sum().backward()
        counts = counter.get_flop_counts()["Global"]
        counted += sum(v for op, v in counts.items() if op.__name__.split(".")[0] == "bmm")
    attention_term = step_flops(cfg, lengths, 0) - 6 * decoder_matmul_params(cfg) * sum(lengths)
    assert counted > 0 and attention_term * 2 == counted
