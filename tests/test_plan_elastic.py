"""Planning an elastic-V run (vlm_jax/elastic.py): the memory measured is the heaviest program the run compiles."""

import pytest

from vlm_jax import plan

libtpu = pytest.importorskip("libtpu", reason="TPU planning needs the optional extra: pip install -r "
                                               "requirements-tpu.txt")

from configs import smoke  # noqa: E402

SET = (1, 4, 16)   # the tiny tower at 32 px: a 4x4 grid


def _tiny(mode=""):
    config = smoke.get_config(f"llm=tiny-s,tokens={max(SET)},res=32")
    with config.unlocked():
        config.train.batch_size = 8
        config.model.vision.depth = 2   # compiles fast
        if mode:
            config.train.elastic.mode, config.train.elastic.tokens = mode, SET
    return config


@pytest.mark.slow   # ~20 s: three TPU programs compiled ahead of time
def test_elastic_plans_measure_the_heaviest_program():
    fixed, mqt, m3 = (plan.plan_stage(_tiny(mode), "v5litepod-4") for mode in ("", "mqt", "m3"))
    for p in (fixed, mqt, m3):
        assert not p.error and not p.out_of_memory and p.temporaries > 0, p
    # MQT's V_max program is the fixed V_max step: the same buffers (its code differs by the 'visual_tokens' metric)
    assert mqt.total - mqt.code == fixed.total - fixed.code and mqt.total == pytest.approx(fixed.total, rel=1e-3)
    assert m3.temporaries > fixed.temporaries      # one LLM pass per V: more activations than one step at V_max
    assert m3.step_flops > mqt.step_flops          # the sum over the set against the mean of a uniform draw
    assert (fixed.program, mqt.program, m3.program) == ("", "mqt V=16", "m3 over V=(1, 4, 16)")
    assert plan.format_row("m3", "full", m3).endswith("   m3 over V=(1, 4, 16)")
