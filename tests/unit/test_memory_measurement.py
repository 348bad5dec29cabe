"""The test helper that splits a step's peak memory into tensors and GEMM-private buffers
(tests/helpers/memory.py), against allocations whose sizes are known."""

import pytest
import torch

from tests.helpers.memory import GEMM_OPS, measure_peak


@torch.library.custom_op("orpo_ds_test::matmul_with_scratch", mutates_args=())
def matmul_with_scratch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A GEMM kernel with private buffers, as oneDNN's emulated bf16 GEMM has: wider copies of both
    inputs and a wider accumulator, all freed before it returns its ``[M, N]`` output."""
    a_wide, b_wide = a.double(), b.double()
    accumulator = a_wide @ b_wide
    del a_wide, b_wide
    return accumulator.to(a.dtype)


M, K, N = 64, 32, 48
A_WIDE, B_WIDE, ACC, OUT = 8 * M * K, 8 * K * N, 8 * M * N, 4 * M * N


def _inputs():
    torch.manual_seed(0)
    return torch.randn(M, K), torch.randn(K, N)


def test_a_gemm_kernels_private_buffers_are_split_from_the_tensors_it_returns():
    a, b = _inputs()
    kept = []
    peak = measure_peak(lambda: kept.append(matmul_with_scratch(a, b)),
                        gemm_ops=GEMM_OPS | {"orpo_ds_test::matmul_with_scratch"})
    assert peak.total == A_WIDE + B_WIDE + ACC  # both copies and the accumulator live at once
    assert peak.gemm_private == A_WIDE + B_WIDE + ACC
    assert peak.tensors == OUT


def test_without_the_kernel_named_nothing_is_private():
    a, b = _inputs()
    kept = []
    peak = measure_peak(lambda: kept.append(matmul_with_scratch(a, b)))
    assert peak.gemm_private == 0 and peak.tensors == peak.total == A_WIDE + B_WIDE + ACC


def test_a_gemm_output_that_outlives_the_call_is_a_tensor():
    a, b = _inputs()
    kept = []
    peak = measure_peak(lambda: kept.append(torch.mm(a, b)))
    assert peak == type(peak)(total=OUT, gemm_private=0, tensors=OUT)


def test_a_materialised_input_freed_inside_mm_is_private():
    """An expanded (stride 0) operand is copied to a dense one inside ``aten::mm`` (ATen's own check of the
    strides, the same on every CPU) and freed before it returns."""
    a = torch.randn(M, 1).expand(M, K)
    _, b = _inputs()
    kept = []
    peak = measure_peak(lambda: kept.append(torch.mm(a, b)))
    assert peak == type(peak)(total=4 * M * K + OUT, gemm_private=4 * M * K, tensors=OUT)


def test_the_measured_steps_run_with_onednn_gemms_off_and_the_switch_is_restored():
    from tests.unit.test_plan_memory import onednn_matmuls

    before = torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError), onednn_matmuls(False):
        assert not torch._C._get_mkldnn_enabled()  # what ATen's use_mkldnn_bf16_matmul() reads
        raise RuntimeError("a failing step")
    assert torch.backends.mkldnn.enabled == before
