"""The one chip table (vlm_jax.hardware.CHIPS): the MFU denominator looks chips up by JAX's device_kind, the TPU
planner (vlm_jax.plan) by Cloud TPU slice name; both must read the same figures."""

import pytest

from vlm_jax import hardware, plan


@pytest.mark.parametrize("slice_name,device_kind", [("v5litepod-16", "TPU v5 lite"), ("v5e-8", "TPU v5e"),
                                                    ("v5p-32", "TPU v5"), ("v5p-8", "TPU v5p"),
                                                    ("v4-16", "TPU v4"), ("v6e-8", "TPU v6 lite")])
def test_a_slice_and_its_chips_device_kind_read_the_same_row(slice_name, device_kind):
    chip = plan.parse_slice(slice_name).chip
    assert chip is hardware.chip_of(device_kind)
    assert hardware.vendor_peak(device_kind) == chip.peak_bf16


def test_plan_reads_the_tpu_rows_of_the_table():
    assert plan.CHIPS == {c.name: c for c in hardware.CHIPS if c.dims}
    assert sorted(plan.CHIPS) == ["v4", "v5e", "v5p", "v6e"]
    assert plan.ALIASES == {"v5litepod": "v5e", "v5lite": "v5e"}
    v5e = plan.parse_slice("v5litepod-4").chip
    assert (v5e.hbm_bytes, v5e.peak_bf16) == (16 * plan.GiB, 197e12)


@pytest.mark.parametrize("device_kind,peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12), ("TPU v3", 123e12),
])
def test_gpus_and_older_tpus_have_their_dense_bf16_peak(device_kind, peak):
    assert hardware.vendor_peak(device_kind) == peak


@pytest.mark.parametrize("device_kind", ["cpu", "", "TPU v9 turbo", "NVIDIA L40S", "NVIDIA A1000"])
def test_an_unknown_device_kind_has_no_vendor_peak(device_kind):
    assert hardware.chip_of(device_kind) is None
    assert hardware.vendor_peak(device_kind) is None


def test_a_configured_peak_wins():
    assert hardware.peak_flops_per_device(1e12) == (1e12, "config")
