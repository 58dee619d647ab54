"""Sequence packing against padding, on record lengths like LLaVA-558K's and LLaVA-665K's.

    python -m benchmarks.bench_packing [--records=4096] [--rows=8] [--steps=3]

1. Useful-token fraction (real tokens over the slots a step computes on) at the full-size layout, L = 2048 + V, for
   V = 1 and 576: every record padded to L, against rows packed first-fit (data/packing.py) with up to K examples.
2. Training throughput on this machine: the same jitted train step (tiny LLM and tower, L = 2048 + 1) on padded
   rows and on packed rows of the same records; useful tokens/s of each and their ratio, and the loss of the packed
   and the padded batches of the same records at the same parameters (equal up to float rounding).

No LLaVA data is on this machine, so record lengths (text tokens, image slots apart) are drawn to the published
shape of the two sets: 558K is one BLIP caption per image (about 10-15 words: lognormal, median 15 tokens with the
template), 665K mixes short multi-turn VQA (median 120), longer LLaVA-Instruct dialogues (median 350) and text-only
ShareGPT conversations (median 900), capped at 2048.
"""

import argparse
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from configs import common, models
from vlm_jax import optim, sharding
from vlm_jax import state as state_lib
from vlm_jax.data import packing
from vlm_jax.models import vlm

TEXT = 2048
PACK_EXAMPLES = {"558k": 160, "665k": 16}   # K per row: enough that rows fill before K binds (at V = 1)


def draw_lengths(profile: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(text tokens, has image) of n records like LLaVA-558K ('558k') or LLaVA-665K ('665k')."""
    if profile == "558k":
        return np.clip(rng.lognormal(np.log(15), 0.35, n), 6, 80).astype(int), np.ones(n, bool)
    part = rng.choice(3, n, p=[0.62, 0.32, 0.06])
    median = np.array([120, 350, 900])[part]
    sigma = np.array([0.6, 0.5, 0.6])[part]
    return np.clip(rng.lognormal(np.log(median), sigma), 12, TEXT).astype(int), part != 2


def make_examples(lengths, has_image, v: int, length: int, image_size: int, lq: int, rng):
    """Unpacked examples (features.py layout) of the given text lengths; loss on each record's last quarter."""
    exs = []
    for n_text, image in zip(lengths, has_image):
        n = int(n_text) + (v if image else 0)
        real = np.arange(length) < n
        tokens = rng.integers(3, 128, length).astype(np.int32) * real
        answer = (np.arange(length) >= n - max(n_text // 4, 1) - 1) & (np.arange(length) < n - 1)
        exs.append(dict(pixels=rng.normal(size=(image_size, image_size, 3)).astype(np.float32), tokens=tokens,
                        targets=np.append(tokens[1:], 0).astype(np.int32), loss_mask=answer.astype(np.float32),
                        attention_mask=real.astype(np.int32),
                        image_positions=(2 + np.arange(v) if image else np.full(v, length)).astype(np.int32),
                        question_tokens=np.ones(lq, np.int32), question_mask=np.ones(lq, np.int32)))
    return exs


def pack_all(exs, rows: int, per_row: int) -> list[dict]:
    """Every example packed, batch after batch, as the train iterator packs them."""
    batches, i = [], 0
    while i < len(exs):
        packed = packing.PackedBatch(rows, per_row, exs[i])
        while i < len(exs) and packed.add(exs[i]):
            i += 1
        batches.append(packed.batch())
    return batches


def useful_fraction(lengths, has_image, v, rows, per_row) -> tuple[float, float]:
    """(padded, packed) real tokens over computed slots, from lengths alone (the packer's arithmetic)."""
    n = lengths + np.where(has_image, v, 0)
    length = TEXT + v
    padded = n.sum() / (len(n) * length)
    used, count, slots = np.zeros(rows, int), np.zeros(rows, int), 0
    for x in n:
        fits = np.flatnonzero((used + x <= length) & (count < per_row))
        if not fits.size:
            slots += rows * length
            used[:], count[:] = 0, 0
            fits = [0]
        used[fits[0]] += x
        count[fits[0]] += 1
    slots += rows * length
    return float(padded), float(n.sum() / slots)


def throughput(config, batches, steps):
    """(useful tokens/s, token-weighted loss over all `batches`). Every batch has the same shapes, so the step
    time (best of `steps`, on two batches) is the same for each: it is measured on two and charged to all."""
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    layout = state_lib.state_layout(config.model, config.train, mesh)
    state, _, _ = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0), layout=layout)
    model = vlm.VLM(config.model)
    step = state_lib.jit_train_step(config, mesh, layout, donate_state=False)
    loss_fn = jax.jit(lambda p, b: state_lib.masked_cross_entropy(
        model.apply({"params": p}, **state_lib.model_inputs(b)), b["targets"], b["loss_mask"]))
    params = optim.merge(state.params, state.frozen)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        jax.block_until_ready(step(state, batches[0]))   # compile
        times = []
        for b in batches[:2]:
            best = float("inf")
            for _ in range(steps):
                t = time.perf_counter()
                jax.block_until_ready(step(state, b))
                best = min(best, time.perf_counter() - t)
            times.append(best)
        losses = [loss_fn(params, b) for b in batches]
    tokens = sum(np.count_nonzero(b["attention_mask"]) for b in batches)
    loss = sum(float(x) * float(n) for x, n in losses) / sum(float(n) for _, n in losses)
    return tokens / (np.mean(times) * len(batches)), loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"1. useful-token fraction at L = {TEXT} + V, {args.records} records, {args.rows} rows per batch")
    print("   profile  V    K   padded  packed  ratio")
    for profile, per_row in PACK_EXAMPLES.items():
        lengths, has_image = draw_lengths(profile, args.records, rng)
        for v in (1, 576):
            padded, packed = useful_fraction(lengths, has_image, v, args.rows, per_row)
            print(f"   {profile:7}  {v:<4} {per_row:<3} {padded:6.3f}  {packed:6.3f}  {packed / padded:5.1f}x")

    v = 1
    config = ml_collections.ConfigDict(dict(
        model=models.model_config("tiny", "tiny", "avgpool", v), mesh=common.mesh_config(),
        train=common.train_config(stage="full", batch_size=args.rows), data=dict(question_len=8)))
    config.model.vision.image_size = 32
    print(f"\n2. train step (tiny LLM + tower, L = {TEXT + v}, {args.rows} rows), the same records padded and packed")
    print("   profile  K   batches padded/packed  useful tok/s padded  packed  ratio   loss padded  packed")
    for profile, per_row in PACK_EXAMPLES.items():
        lengths, has_image = draw_lengths(profile, args.rows * per_row * 3, rng)
        exs = make_examples(lengths, has_image, v, TEXT + v, 32, config.data.question_len, rng)
        packed = pack_all(exs, args.rows, per_row)[:2]   # two full batches (the third holds the rest)
        exs = exs[:sum(int(b["attention_mask"].max(axis=1).sum()) for b in packed)]   # their records, in order
        padded = [{k: np.stack([e[k] for e in exs[i:i + args.rows]]) for k in exs[0]}
                  for i in range(0, len(exs) - args.rows + 1, args.rows)]
        packed = pack_all(exs[:len(padded) * args.rows], args.rows, per_row)   # the same records both ways
        tps_pad, loss_pad = throughput(config, padded, args.steps)
        tps_pack, loss_pack = throughput(config, packed, args.steps)
        print(f"   {profile:7}  {per_row:<3} {len(padded):>7}/{len(packed):<7}  {tps_pad:18,.0f}  {tps_pack:7,.0f}  "
              f"{tps_pack / tps_pad:5.1f}x  {loss_pad:11.5f}  {loss_pack:.5f}")


if __name__ == "__main__":
    main()
