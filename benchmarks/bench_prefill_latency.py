"""Prefill latency of one LLM configuration at V in {1, 4, 16, 36, 144, 576} visual tokens, Q text tokens fixed.

    python -m benchmarks.bench_prefill_latency [--q=32] [--batch=1] [--layers=4] [--width=512] [--repeats=20]
    python -m benchmarks.bench_prefill_latency --llm=qwen1.5-0.5b --dtype=bfloat16 --json=prefill.json   # a GPU

The paper's inference cost is the LLM's prefill over Q + V tokens (the vision tower's cost does not depend on V), so
this times exactly that: a jitted prefill of a Qwen1.5-shaped LLM (embeddings in, KV cache filled, last-token
logits out), the same call `vlm_jax.generate.prefill` makes. Next to each measured time it prints the FLOPs model's
prediction from `vlm_jax.flops` (the paper's 2 N (Q + V), and that plus causal attention), all as ratios to
V = 576: ratios carry across machines, absolute times do not. The vocabulary is Qwen's (151,936), so reading the
weights and the LM head at the last token are a fixed cost the FLOPs model leaves out; it shows up as latency
ratios above the FLOPs ratios at small V. `--llm=PRESET` times a whole preset of configs/models.py instead (on an
accelerator), `--dtype` sets the compute dtype and KV cache (default float32), `--json` also writes the rows, with
the attention kernel each length takes (`layers.attention_implementation`: on a GPU an odd Q + V stays on XLA).
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import models
from vlm_jax import flops
from vlm_jax.models import layers
from vlm_jax.models import llm as llm_lib

VISUAL_TOKENS = (1, 4, 16, 36, 144, 576)


def llm_config(layers: int, width: int):
    """Qwen1.5-0.5B's architecture (vocabulary, MLP ratio, head size 64, RoPE) at a CPU-friendly depth/width."""
    return models.llm_config("qwen1.5-0.5b", num_layers=layers, hidden_size=width, num_heads=width // 64,
                             num_kv_heads=width // 64, intermediate_size=int(width * 2816 / 1024))


def predicted_flops(cfg, q: int, v: int) -> tuple[float, float]:
    """(the paper's 2 N (Q + V), that plus causal attention) for one query, from vlm_jax.flops."""
    model_cfg = models.model_config("clip-vit-l14-336", "qwen1.5-0.5b", "avgpool", v)
    model_cfg.llm = cfg
    parts = flops.inference_breakdown(model_cfg, text_tokens=q, compressor_flops_per_image=0.0)
    return parts.llm, parts.llm + parts.llm_attention


def make_prefill(cfg, batch: int, length: int, dtype=jnp.float32):
    """Jitted (params, x float[B, T, D]) -> last-token logits, filling a fresh KV cache like generation does."""
    model = llm_lib.LLM(cfg, dtype)

    def prefill(params, x):
        mask = jnp.ones((batch, length), jnp.int32)
        positions = llm_lib.positions_from_mask(mask)
        cache = llm_lib.init_cache(cfg, batch, length, dtype)
        hidden, cache = model.apply({"params": params}, x, mask, positions, cache, 0)
        return model.apply({"params": params}, hidden[:, -1:], method=model.logits), cache

    return model, jax.jit(prefill)


def time_prefill(cfg, params, batch: int, length: int, repeats: int, dtype=jnp.float32) -> float:
    """Fastest of `repeats` prefills of `length` tokens, in seconds, after a compile and a warm-up call (the
    minimum is the least disturbed run when other processes share the CPU)."""
    _, prefill = make_prefill(cfg, batch, length, dtype)
    x = jax.random.normal(jax.random.key(length), (batch, length, cfg.hidden_size), dtype)
    jax.block_until_ready(prefill(params, x))
    jax.block_until_ready(prefill(params, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(prefill(params, x))
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--q", type=int, default=32, help="text tokens (fixed)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--llm", default="", help="a whole preset of configs/models.py instead of --layers/--width")
    ap.add_argument("--dtype", default="float32", help="compute dtype and KV cache (bfloat16 on accelerators)")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()

    cfg = models.llm_config(args.llm) if args.llm else llm_config(args.layers, args.width)
    dtype = jnp.dtype(args.dtype)
    model = llm_lib.LLM(cfg)
    one = jnp.ones((1, 1), jnp.int32)
    # Touch every submodule (embedding, layers, head) so that init creates all parameters.
    init = jax.jit(lambda r: model.init(r, method=lambda m: m.logits(m(m.embed_tokens(one), one)[0]))["params"])
    params = nn.meta.unbox(init(jax.random.key(0)))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    name = args.llm or f"Qwen1.5 shape, {args.layers} layers, width {args.width}"
    device = jax.devices()[0].device_kind
    print(f"LLM: {name}, vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params, {dtype.name}; Q={args.q}, "
          f"batch {args.batch}, best of {args.repeats}; {device}")

    platform, capability = layers.attention_platform()
    rows = []
    for v in VISUAL_TOKENS:
        seconds = time_prefill(cfg, params, args.batch, args.q + v, args.repeats, dtype)
        paper, with_attention = predicted_flops(cfg, args.q, v)
        kernel = layers.attention_implementation(platform, dtype, cfg.head_dim, args.q + v, args.q + v, "mask",
                                                 capability)
        rows.append((v, seconds, paper, with_attention, kernel))
    base = rows[-1]
    print("ratios to V=576: measured latency, the paper's 2N(Q+V), and 2N(Q+V) + causal attention")
    print(f"{'V':>5} {'Q+V':>5} {'latency ms':>10} {'latency':>8} {'2N(Q+V)':>8} {'+attn':>8} {'attention':>9}")
    for v, seconds, paper, with_attention, kernel in rows:
        print(f"{v:>5} {args.q + v:>5} {seconds * 1e3:>10.2f} {seconds / base[1]:>8.3f} {paper / base[2]:>8.3f} "
              f"{with_attention / base[3]:>8.3f} {kernel:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(llm=name, device_kind=device, jax_version=jax.__version__, dtype=dtype.name, q=args.q,
                           batch=args.batch, repeats=args.repeats, params=n_params, rows=[
                               dict(v=v, length=args.q + v, latency_s=s, paper_flops=p, flops_with_attention=a,
                                    latency_ratio=s / base[1], paper_ratio=p / base[2],
                                    with_attention_ratio=a / base[3], attention=kernel)
                               for v, s, p, a, kernel in rows]), f, indent=2)


if __name__ == "__main__":
    main()
