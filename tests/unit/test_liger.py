"""model.liger_kernels on the CPU: the option, its resolution and refusals, the instance patch, the head's
dispatch to Liger's fused linear cross-entropy (a torch stand-in here, and Liger's real Triton kernel run
by Triton's CPU interpreter), and that nothing of liger-kernel is imported when it is off.

The kernels themselves run on a GPU only: tests/gpu/test_liger_gpu.py compares them there.
"""

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CohereConfig, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

from orpo_ds import liger as liger_lib
from orpo_ds.config import ConfigError, load_config
from orpo_ds.logps import chunked_token_logps
from orpo_ds.model import PolicyWithChunkedHead, build_policy, final_logit_scale
from tests.unit.test_logps import FP32_TOL, make_inputs, values_and_grads

REPO = Path(__file__).resolve().parents[2]
BASE = ["model.name_or_path=some/model", "data.train=pairs.jsonl"]
V = 61


def _llama_config(**kw):
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", **kw)


def _llama(seed=0, **kw):
    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config(**kw)).float()


# --- the option ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, want", [(None, "auto"), ("model.liger_kernels=auto", "auto"),
                                            ("model.liger_kernels=true", "on"), ("model.liger_kernels=on", "on"),
                                            ("model.liger_kernels=false", "off"), ("model.liger_kernels=off", "off")])
def test_option_values(override, want):
    assert load_config(None, BASE + ([override] if override else [])).model.liger_kernels == want


def test_yaml_booleans_map_to_on_and_off(tmp_path):
    path = tmp_path / "run.yaml"
    for text, want in (("true", "on"), ("false", "off"), ("auto", "auto")):
        path.write_text(f"model:\n  name_or_path: m\n  liger_kernels: {text}\ndata:\n  train: t.jsonl\n")
        assert load_config(path).model.liger_kernels == want


def test_an_unknown_value_names_the_key():
    with pytest.raises(ConfigError, match=r"^model\.liger_kernels: 'fast' is not one of auto, on, off"):
        load_config(None, BASE + ["model.liger_kernels=fast"])


# --- resolution ----------------------------------------------------------------------------------------

def test_auto_is_off_without_cuda():
    choice = liger_lib.resolve("auto", _llama_config(), device_type="cpu", logit_scale=1.0)
    assert (choice.layers, choice.head) == (False, False)
    assert "cpu" in str(choice) and str(choice).startswith("off")


def test_on_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^model\.liger_kernels=on, but the run's device is cpu") as err:
        liger_lib.resolve("on", _llama_config(), device_type="cpu", logit_scale=1.0)
    assert "model.liger_kernels=auto" in str(err.value)  # it says how to fix it


def test_off_is_off_everywhere():
    choice = liger_lib.resolve("off", _llama_config(), device_type="cuda", logit_scale=1.0)
    assert (choice.layers, choice.head, choice.note) == (False, False, "model.liger_kernels=off")


def test_liger_kernel_that_does_not_import(monkeypatch):
    # None in sys.modules makes `from liger_kernel.transformers.monkey_patch import ...` raise ImportError.
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    with pytest.raises(ConfigError, match="model.liger_kernels=on, but liger-kernel does not import here"):
        liger_lib.resolve("on", _llama_config(), device_type="cuda", logit_scale=1.0)
    assert not liger_lib.resolve("auto", _llama_config(), device_type="cuda", logit_scale=1.0).layers


def test_an_architecture_liger_does_not_patch_is_refused_clearly():
    cohere = CohereConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ConfigError, match=r"model\.liger_kernels=on, but liger-kernel has no patch for "
                                          r"model_type 'cohere' \(it patches .*llama"):
        liger_lib.resolve("on", cohere, device_type="cuda", logit_scale=final_logit_scale(cohere))
    auto = liger_lib.resolve("auto", cohere, device_type="cuda", logit_scale=final_logit_scale(cohere))
    assert not (auto.layers or auto.head) and "model_type 'cohere'" in auto.note


def test_a_swiglu_patch_on_a_model_that_does_not_use_silu_is_refused():
    # Liger's instance patch would silently swap a gelu MLP for silu(gate) * up.
    with pytest.raises(ConfigError, match="hidden_act is 'gelu'"):
        liger_lib.resolve("on", _llama_config(hidden_act="gelu"), device_type="cuda", logit_scale=1.0)


def test_llama_on_cuda_gets_the_layer_kernels_and_the_fused_head():
    choice = liger_lib.resolve("auto", _llama_config(), device_type="cuda", logit_scale=1.0)
    assert (choice.layers, choice.head) == (True, True)
    assert str(choice).startswith("RMSNorm/SwiGLU/RoPE kernels, head Liger fused linear cross-entropy")


def test_a_scaled_head_keeps_the_torch_head_and_says_why():
    granite = GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)
    choice = liger_lib.resolve("on", granite, device_type="cuda", logit_scale=final_logit_scale(granite))
    assert (choice.layers, choice.head) == (True, False)
    assert "head torch chunked" in str(choice) and "scales its logits by 0.25" in str(choice)
    with pytest.raises(ValueError, match="no logit scale"):
        PolicyWithChunkedHead(GraniteForCausalLM(granite), liger=liger_lib.LigerChoice(True, True, "forced"))


def test_granite_logits_scaling_is_part_of_the_torch_head():
    """Granite's forward divides its logits by ``logits_scaling``: the head's log-probs must too."""
    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             logits_scaling=4.0, attn_implementation="sdpa")).float()
    ids = torch.randint(0, V, (1, 11))
    labels = torch.cat([ids[0, 1:], torch.tensor([-100])])
    mask = labels != -100
    got = PolicyWithChunkedHead(model, chunk_size=4)(ids, torch.arange(11)[None], mask.nonzero().squeeze(1),
                                                        labels[mask]).token_logps
    want = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)[mask].gather(
        1, labels[mask][:, None]).squeeze(1)
    torch.testing.assert_close(got, want, **FP32_TOL)


# --- the instance patch (real liger-kernel; the patched forwards need a GPU, so none runs here) ----------

def test_patch_model_rebinds_rmsnorm_and_mlp_and_replaces_rope(restore_llama_module):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    model = _llama()
    assert liger_lib.patch_model(model) == 2 * 3 + 1  # per layer 2 norms + the MLP, and the final norm
    body = model.model
    assert body.norm._get_name() == "LigerRMSNorm"
    assert {layer.mlp._get_name() for layer in body.layers} == {"LigerSwiGLUMLP"}
    assert restore_llama_module.apply_rotary_pos_emb is liger_rotary_pos_emb
    assert model.lm_head._get_name() == "Linear"  # the head is our own: Liger's loss patches stay off
    assert "forward" not in vars(model)


def test_build_policy_patches_the_body_when_liger_resolves_on(tmp_path, monkeypatch, restore_llama_module):
    import orpo_ds.model as model_lib
    from orpo_ds.config import ModelConfig

    _llama().save_pretrained(tmp_path / "m")
    # Pretend the run's device is CUDA: resolution and patching happen on the host and run no kernel.
    monkeypatch.setattr(model_lib.dist_lib, "comm_device", lambda: torch.device("cuda", 0))
    policy, _ = build_policy(ModelConfig(name_or_path=str(tmp_path / "m"), liger_kernels="on"), {},
                             torch.float32, chunk_size=8)
    assert (policy.liger.layers, policy.liger.head) == (True, True)
    assert "7 modules patched" in str(policy.liger)
    assert policy.causal_lm.model.norm._get_name() == "LigerRMSNorm"


# --- the head's dispatch -------------------------------------------------------------------------------

class StandIn:
    """Liger's ``liger_fused_linear_cross_entropy`` in plain torch (full logits): records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
                 label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None):
        self.calls.append(dict(input=input, weight=weight, target=target, bias=bias, ce_weight=ce_weight,
                               ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                               accum_dtype=accum_dtype))
        logits = input @ weight.T + (0 if bias is None else bias)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)


@pytest.fixture
def stand_in(monkeypatch):
    import liger_kernel.transformers.functional as functional

    fake = StandIn()
    real = functional.liger_fused_linear_cross_entropy
    monkeypatch.setattr(functional, "liger_fused_linear_cross_entropy", fake)
    yield fake
    for call in fake.calls:  # every call our code made is a valid call of the real function
        inspect.signature(real).bind(**call)


def _packed_row(seed=0):
    """One packed row of three sequences (lengths 7, 12, 4) with labels on part of each."""
    g = torch.Generator().manual_seed(seed)
    lengths = (7, 12, 4)
    ids = torch.randint(0, V, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.randint(0, V, (sum(lengths),), generator=g)
    labels[[0, 1, 7, 8, 9, 19, 22]] = -100
    return ids, position_ids, labels, labels != -100


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_the_policy_hands_the_head_weight_to_liger_and_matches_the_torch_head(stand_in, softcap):
    model = _llama(final_logit_softcapping=softcap)
    ids, position_ids, labels, mask = _packed_row()
    up = torch.randn(int(mask.sum()), generator=torch.Generator().manual_seed(1))

    def run(liger):
        model.zero_grad()
        out = PolicyWithChunkedHead(model, chunk_size=5, liger=liger)(ids, position_ids,
                                                                   mask.nonzero().squeeze(1), labels[mask]).token_logps
        (out * up).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_grads = run(liger_lib.LIGER_OFF)
    assert not stand_in.calls  # off: the torch chunked head, Liger untouched
    got, grads = run(liger_lib.LigerChoice(layers=False, head=True, note="test"))
    (call,) = stand_in.calls
    # The very head parameter (under ZeRO-3: gathered, since this runs inside the policy's forward).
    assert call["weight"] is model.lm_head.weight and call["weight"].shape == (V, 32)
    assert call["input"].shape == (int(mask.sum()), 32)
    assert (call["reduction"], call["softcap"], call["accum_dtype"]) == ("none", softcap, torch.float32)
    torch.testing.assert_close(got, ref, **FP32_TOL)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **FP32_TOL, msg=name)


@pytest.mark.parametrize("n, v, h", [(1, 37, 8), (29, 103, 16), (64, 50, 5)])
def test_liger_token_logps_with_bias_and_ignored_labels(stand_in, n, v, h):
    hidden, weight, labels, bias, up = make_inputs(n, v, h, bias=True, seed=n)
    got, grads = values_and_grads(liger_lib.liger_token_logps, hidden, weight, labels, bias, up, softcap=3.0)
    want, want_grads = values_and_grads(lambda *a, **k: chunked_token_logps(*a, chunk_size=7, **k),
                                        hidden, weight, labels, bias, up, softcap=3.0)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert bool((got[labels == -100] == 0).all())
    torch.testing.assert_close(got, want, **FP32_TOL)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **FP32_TOL)
    assert stand_in.calls[0]["bias"] is bias


def test_liger_token_logps_checks_its_inputs(stand_in):
    hidden, weight, labels, _, _ = make_inputs(4, 11, 8)
    with pytest.raises(RuntimeError, match="labels must be in"):
        liger_lib.liger_token_logps(hidden, weight, torch.tensor([0, 1, 11, 2]))
    with pytest.raises(ValueError, match="share one float dtype"):
        liger_lib.liger_token_logps(hidden, weight.detach().double(), labels)
    assert not stand_in.calls


def _run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_liger_real_kernel_under_the_triton_interpreter_matches_the_torch_head():
    """Liger's own fused linear cross-entropy (its Triton kernel, run by Triton's CPU interpreter) gives
    our torch head's log-probs and gradients: sign, per-token reduction, bias and ignored labels. The
    interpreter cannot run its soft-capping branch (a float scalar argument), so that waits for the GPU."""
    proc = _run_python("""
        import torch
        from orpo_ds.liger import liger_token_logps
        from orpo_ds.logps import chunked_token_logps
        from tests.unit.test_logps import FP32_TOL, make_inputs, values_and_grads
        for n, v, h in ((37, 101, 16), (5, 300, 8)):
            hidden, weight, labels, bias, up = make_inputs(n, v, h, bias=True, seed=n)
            got, grads = values_and_grads(liger_token_logps, hidden, weight, labels, bias, up)
            want, want_grads = values_and_grads(lambda *a, **k: chunked_token_logps(*a, chunk_size=8, **k),
                                                hidden, weight, labels, bias, up)
            torch.testing.assert_close(got, want, **FP32_TOL)
            for g, w in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, **FP32_TOL)
        print("interpreted liger head ok")
    """, env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "interpreted liger head ok" in proc.stdout


def test_off_or_auto_on_the_cpu_imports_nothing_of_liger(tmp_path):
    _llama().save_pretrained(tmp_path / "m")
    proc = _run_python(f"""
        import sys
        import torch
        from orpo_ds.config import ModelConfig
        from orpo_ds.attention import segments_from_lengths
        from orpo_ds.model import build_policy
        for option in ("auto", "off"):
            policy, _ = build_policy(ModelConfig(name_or_path={str(tmp_path / "m")!r}, liger_kernels=option), {{}},
                                     torch.float32, chunk_size=8)
            labels = torch.tensor([5, 6, -100, 7])
            out = policy(torch.tensor([[1, 5, 6, 3]]), torch.arange(4)[None], (labels != -100).nonzero().squeeze(1),
                         labels[labels != -100],
                         segments=segments_from_lengths([4])).token_logps
            out.sum().backward()
            print(option, policy.liger)
        assert not [m for m in sys.modules if m.startswith("liger_kernel")], "liger_kernel was imported"
        print("no liger")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "auto off (the run's device is cpu" in proc.stdout
    assert "off off (model.liger_kernels=off)" in proc.stdout and "no liger" in proc.stdout
