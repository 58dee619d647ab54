"""Train-step throughput and MFU of a small-but-real configuration, against this machine's matmul peak.

    python -m benchmarks.bench_train_step [--llm=tiny-l] [--batch=8] [--steps=10] [--remat=none]

Prints achieved FLOP/s of the full step (forward + backward + AdamW, FLOPs from vlm_jax.flops) as a ratio to the
measured f32 matmul peak of the same process, and the step-time ratio of remat 'full' to 'none' and of scanned to
looped layers: ratios measured in one run, so they are comparable across machines where absolute times are not.
"""

import argparse
import time

import flax.linen as nn
import jax

from configs import smoke
from vlm_jax import flops, hardware, sharding
from vlm_jax import state as state_lib
from vlm_jax.data import pipeline


def step_time(config, steps):
    mesh = sharding.make_mesh(config.mesh)
    layout = state_lib.state_layout(config.model, config.train, mesh)
    state, _, _ = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0), layout=layout)
    step = state_lib.jit_train_step(config, mesh, layout)
    tok = pipeline.make_tokenizer(config.data)
    it = pipeline.make_train_iterator(config.data, tokenizer=tok, num_visual_tokens=config.model.compressor.num_tokens,
                                      image_size=config.model.vision.image_size,
                                      batch_size=config.train.batch_size, seed=0)
    batches = [sharding.put_batch(next(it), mesh) for _ in range(2)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state, m = step(state, batches[0])
        jax.block_until_ready(m)
        best = float("inf")
        for i in range(steps):
            t = time.perf_counter()
            state, m = step(state, batches[i % 2])
            jax.block_until_ready(m)
            best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="tiny-l")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    config = smoke.get_config(f"llm={args.llm},tokens={args.tokens}")
    with config.unlocked():
        config.train.batch_size = args.batch
    peak = hardware.measured_matmul_peak()
    seq = config.data.seq_len + config.model.compressor.num_tokens
    fl = flops.train_step_flops(config.model, batch_size=args.batch, seq_len=seq, train_llm=True, train_vision=True)
    base = step_time(config, args.steps)
    print(f"config: llm={args.llm} V={args.tokens} batch={args.batch} seq={seq}; {fl:.3g} FLOPs/step")
    print(f"matmul peak (f32, measured): {peak / 1e9:.0f} GFLOP/s")
    print(f"train step: {base * 1e3:.1f} ms -> {fl / base / 1e9:.1f} GFLOP/s = {fl / base / peak:.3f} of matmul peak")
    # The default leaves scan_layers unset: a loop on the CPU, a scan elsewhere (vlm_jax/models/llm.py).
    for label, key, value in (("remat=full", "remat", "full"), ("scan_layers=True", "scan_layers", True)):
        with config.unlocked():
            config.model.llm[key] = value
        t = step_time(config, args.steps)
        print(f"step time ratio {label} / default: {t / base:.2f}")
        with config.unlocked():
            config.model.llm[key] = {"remat": "none", "scan_layers": None}[key]


if __name__ == "__main__":
    main()
