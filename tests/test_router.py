"""Adaptive V: answer confidences, the escalation policy and its sweep (hand-computed cases), and the live router on
a tiny elastic model against the policy computed from every question answered at every V."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import smoke
from vlm_jax import elastic
from vlm_jax.data import pipeline
from vlm_jax.evaluation import Answerer, generate, router, synthetic_benchmarks
from vlm_jax.models import vlm

# A hand-made ladder of three V: FLOPs of one answer at each, and four questions' confidences and credits.
FLOPS = [10.0, 20.0, 40.0]
CONF = np.array([[0.95, 0.5, 0.2, 0.9],     # V_1
                 [0.99, 0.92, 0.3, 0.2],    # V_2
                 [0.99, 0.99, 0.4, 0.1]])   # V_3
CREDIT = np.array([[1, 0, 0, 0],
                   [1, 1, 0, 1],
                   [1, 1, 1, 1]])


def test_confidence_is_the_geometric_mean_probability_of_the_answer_and_its_stop_token():
    logprobs = np.log([[0.5, 0.8, 1.0, 1.0], [0.9, 0.9, 0.9, 0.9], [0.25, 1.0, 1.0, 1.0]])
    logprobs[0, 2:] = 0.0   # after the stop token (written as 0 by generation)
    got = router.confidence(logprobs, lengths=[1, 4, 0])   # stop at 1; no stop in 4 tokens; stop first
    np.testing.assert_allclose(got, [np.sqrt(0.5 * 0.8), 0.9, 0.25], rtol=1e-12)


@pytest.mark.parametrize("threshold, error, flops, share", [
    (0.0, 0.75, 10.0, [1.0, 0.0, 0.0]),            # never escalate: everything at V_1
    (0.9, 0.25, (10 + 30 + 70 + 10) / 4, [0.5, 0.25, 0.25]),   # q3 stays at V_1 (0.9 >= 0.9) and is wrong
    (0.95, 0.0, (10 + 70 + 70 + 70) / 4, [0.25, 0.0, 0.75]),   # q2, q3 unsure everywhere: the largest V answers
    (1.01, 0.0, 70.0, [0.0, 0.0, 1.0]),            # always escalate: every V tried
])
def test_policy_by_hand(threshold, error, flops, share):
    p = router.policy(CREDIT, CONF, FLOPS, threshold)
    assert p["error"] == pytest.approx(error)
    assert p["flops"] == pytest.approx(flops)   # every V up to the chosen one is paid for
    assert p["share"] == pytest.approx(share)


def test_tries_give_the_flops_at_any_cost_per_v():
    p = router.policy(CREDIT, CONF, FLOPS, 0.9)
    assert p["tried"] == pytest.approx([1.0, 0.5, 0.25])   # q1, q2 try V_2; q2 alone tries V_3
    other = [1.0, 2.0, 3.0]
    assert np.dot(p["tried"], other) == pytest.approx(router.policy(CREDIT, CONF, other, 0.9)["flops"])


def test_ladders_run_from_the_smallest_to_the_largest_v_through_every_subset():
    assert router.ladders((16, 1, 64, 4)) == [(1, 64), (1, 4, 64), (1, 16, 64), (1, 4, 16, 64)]
    assert router.ladders((1, 4)) == [(1, 4)]
    assert len(router.ladders((1, 4, 9, 16, 36, 64, 144))) == 2 ** 5


def test_pareto_keeps_the_points_no_other_beats_in_cost_and_error():
    points = [{"flops": 1, "error": 0.5}, {"flops": 2, "error": 0.6}, {"flops": 2, "error": 0.3},
              {"flops": 3, "error": 0.3}, {"flops": 4, "error": 0.1}]
    assert [(p["flops"], p["error"]) for p in router.pareto(points)] == [(1, 0.5), (2, 0.3), (4, 0.1)]


def test_matching_is_the_cheapest_threshold_at_or_below_the_target_error():
    curve = router.sweep(CREDIT, CONF, FLOPS, thresholds=(0.0, 0.9, 0.95, 1.01))
    assert router.matching(curve, 0.25)["threshold"] == 0.9
    assert router.matching(curve, 0.0)["threshold"] == 0.95   # 0.95 and 1.01 both reach 0; 0.95 is cheaper
    assert router.matching(curve, -0.1) is None


def test_generation_records_each_emitted_tokens_log_probability():
    config, params, tok = _elastic_model()
    model_cfg = elastic.fixed_model(config.model, 4)
    gen = generate.Generator(vlm.VLM(model_cfg), generate.GenerationConfig(
        max_new_tokens=4, stop_ids=(tok.eos_id,), vocab_limit=tok.vocab_size, return_logits=True))
    items = _items(config, 3)
    batch = pipeline.make_prompt_batch([it.image for it in items], [it.prompt for it in items], tokenizer=tok,
                                       data_cfg=config.data, num_visual_tokens=4,
                                       image_size=config.model.vision.image_size)
    out = jax.device_get(gen(params, batch))
    logits = np.asarray(out.logits, np.float64)[..., :tok.vocab_size]
    want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for b in range(3):
        n = min(int(out.lengths[b]) + 1, 4)
        np.testing.assert_allclose(out.logprobs[b, :n], want[b, np.arange(n), out.tokens[b, :n]], atol=1e-5)
        assert (out.logprobs[b, n:] == 0).all()


# --- a tiny elastic model (avgpool nests without parameters: the fixed-V model has the same weights) -----------

LADDER = (1, 4, 16)


@functools.cache
def _elastic_model():
    config = smoke.get_config("llm=tiny-s,tokens=16,res=32")
    config.unlock()
    config.train.elastic.mode, config.train.elastic.tokens = "mqt", LADDER
    config.model = elastic.model_config(config.model, config.train)
    params = nn.meta.unbox(jax.jit(vlm.init_fn(config.model))(jax.random.key(3)))
    return config, params, pipeline.make_tokenizer(config.data)


def _items(config, n):
    return [it for b in synthetic_benchmarks(config.data, 32, n) for it in b.items][:n]


def _fixed_config(config, v):
    fixed = config.copy_and_resolve_references()
    fixed.model = elastic.fixed_model(config.model, v)
    return fixed


def test_an_elastic_model_answers_at_v_as_the_fixed_v_model_with_the_same_weights():
    config, params, tok = _elastic_model()
    items = _items(config, 6)
    for v in LADDER:
        got = Answerer(config, params, tok, batch_size=4, max_new_tokens=3, num_tokens=v).answer(items)
        want = Answerer(_fixed_config(config, v), params, tok, batch_size=4, max_new_tokens=3).answer(items)
        assert got[0] == want[0], v
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    with pytest.raises(ValueError, match="answers with V in"):
        Answerer(config, params, tok, num_tokens=9)


def test_the_live_router_escalates_exactly_the_unsure_answers():
    config, params, tok = _elastic_model()
    items = _items(config, 8)
    asked: dict = {}

    def at(v):
        answerer = Answerer(config, params, tok, batch_size=4, max_new_tokens=3, num_tokens=v)

        def answer(batch):
            asked[v] = [it.question_id for it in batch]
            return answerer.answer(batch)
        return answer, answerer.answer(items)

    fns, everywhere = {}, {}
    for v in LADDER:
        fns[v], everywhere[v] = at(v)
    conf = np.stack([everywhere[v][1] for v in LADDER])
    threshold = float(np.median(conf[0]))   # about half the questions are unsure at V=1
    answers, used = router.AdaptiveAnswerer(fns, threshold)(items)
    chosen = router.choose(conf, threshold)
    assert used.tolist() == [LADDER[k] for k in chosen]
    assert answers == [everywhere[LADDER[k]][0][q] for q, k in enumerate(chosen)]
    # Only the questions unsure at V=1 were asked again, and only those unsure at V=4 a third time.
    unsure_1 = [it.question_id for it, c in zip(items, conf[0]) if c < threshold]
    assert asked[4] == unsure_1 and 0 < len(unsure_1) < len(items)
    assert asked.get(16, []) == [it.question_id for it, c0, c1 in zip(items, conf[0], conf[1])
                                 if c0 < threshold and c1 < threshold]
