"""Planning for Cloud TPU on this CPU: the real train step compiled for a TPU topology through libtpu."""

import json
import os

import pytest

from vlm_jax import plan

libtpu = pytest.importorskip("libtpu", reason="TPU planning needs the optional extra: pip install -r "
                                               "requirements-tpu.txt")

from configs import smoke  # noqa: E402


def _tiny(batch=8, **model):
    config = smoke.get_config("llm=tiny-s,tokens=4,res=32")
    with config.unlocked():
        config.train.batch_size = batch
        config.model.llm.update(model)
    return config


def test_slice_names_map_to_chips_and_topologies():
    # Cloud TPU names count TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e.
    assert plan.parse_slice("v5p-32") == plan.Slice("v5p-32", "v5p", 16, "v5p:2x2x4")
    assert plan.parse_slice("v5litepod-16").topology == "v5e:4x4"
    assert [s.name for s in plan.larger_slices(plan.parse_slice("v6e-4"))][:2] == ["v6e-8", "v6e-16"]
    assert len(plan.topology_devices("v5p:2x2x4")) == 16       # libtpu agrees on the device count
    with pytest.raises(ValueError, match="unknown TPU slice 'v9x-8'"):
        plan.parse_slice("v9x-8")
    with pytest.raises(ValueError, match="is not a shape this planner knows"):
        plan.parse_slice("v5p-6")


@pytest.fixture(scope="module")
def small_and_large_batch():
    return plan.plan_stage(_tiny(batch=8), "v5litepod-4"), plan.plan_stage(_tiny(batch=64), "v5litepod-4")


@pytest.mark.slow   # ~16 s: two TPU programs compiled ahead of time
def test_memory_figures_are_positive_and_grow_with_batch(small_and_large_batch):
    small, large = small_and_large_batch
    for p in (small, large):
        assert not p.error and p.arguments > 0 and p.temporaries > 0 and p.fits
        assert p.mesh == {"data": 4, "fsdp": 1, "tensor": 1} and p.capacity == 16 * plan.GiB   # data=-1: all 4
    assert large.temporaries > 2 * small.temporaries     # activations scale with the batch
    assert large.arguments > small.arguments             # so does the batch itself
    assert large.step_flops == pytest.approx(8 * small.step_flops, rel=1e-6)


@pytest.mark.slow   # ~30 s: a Qwen-vocabulary step compiled for TPU, and its fixes
def test_an_oversized_stage_is_reported_not_fitting_and_a_larger_slice_is_found():
    # Qwen's 151,936-token vocabulary with the unchunked float32 logits of 64 x 2048 tokens: ~80 GB of logits.
    config = _tiny(batch=64, vocab_size=151936)
    with config.unlocked():
        config.data.seq_len = 2044
        config.train.loss_chunk = 0
    p = plan.plan_stage(config, "v5litepod-4")
    # the TPU compiler itself refuses to assign more than HBM: reported as not fitting, with the size it needed
    assert not p.error and not p.fits and p.out_of_memory and p.total > p.capacity
    assert " OOM " in plan.format_row("big", "full", p)
    fix = plan.suggest(config, p, max_tries=4)
    assert fix is not None and fix[1].fits and fix[1].total < p.total


@pytest.mark.slow   # ~34 s: every stage of two cells compiled for TPU
def test_the_tpu_grid_refuses_a_cell_that_does_not_fit_before_provisioning(tmp_path, monkeypatch):
    from launch import grid as grid_launcher
    from tests import helpers

    g = helpers.tiny_grid(tmp_path, tokens="1+4")
    with g.unlocked():
        g.backend = "tpu"
        g.tpu.accelerator_type = "v5litepod-4"
        g.tpu.accelerator_types = "tiny-xs_v4=v5litepod-4"
        g.cell.data.seq_len = 2040
        # stage 2 of every cell: 4096 sequences of 2044 tokens, whose attention scores alone are ~137 GB
        g.stages.stage2.train.batch_size = 4096
        g.stages.stage1.train.batch_size = 4
    _, cells = helpers.grid_jobs(g)
    with g.unlocked():   # V=1 gets a small stage 2: it fits
        g.stages.stage2.train.batch_size = 4
    _, small = helpers.grid_jobs(g)
    jobs = [next(c for c in small if c.name == "tiny-xs_v1"), next(c for c in cells if c.name == "tiny-xs_v4")]
    kept = grid_launcher.fitting_cells(g, jobs)
    assert [j.name for j in kept] == ["tiny-xs_v1"]
    result = json.load(open(os.path.join(jobs[1].dir, "result.json")))
    assert result["status"] == "failed" and "stage stage2 on v5litepod-4: needs" in result["error"]
    # the verdicts are kept: a re-run does not compile again
    monkeypatch.setattr(plan, "why_unfit", lambda *a, **k: pytest.fail("compiled again"))
    assert [j.name for j in grid_launcher.fitting_cells(g, jobs)] == ["tiny-xs_v1"]


@pytest.mark.parametrize("topology,generation", [("v5p:2x2x1", "v5p"), ("v5e:2x2", "v5e"), ("v6e:2x2", "v6e"),
                                                 ("v4:2x2x1", "v4")])
def test_mfu_denominator_knows_each_generation_by_its_device_kind(topology, generation):
    """The peak the training loop divides by, looked up from the names libtpu gives the devices (a v5p chip is
    'TPU v5', a v5e chip 'TPU v5 lite'), is the chip table's."""
    from vlm_jax import hardware
    kind = plan.topology_devices(topology)[0].device_kind
    assert hardware.vendor_peak(kind) == plan.CHIPS[generation].peak_bf16, kind
