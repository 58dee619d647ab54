"""One LLaVA-style training step of a mid-size VLM: vlm-jax against the same step in PyTorch + transformers.

    python -m benchmarks.bench_torch_step [--steps=5] [--batch=4] [--length=512] [--loss_chunk=128] [--scan_layers]

The configuration (both sides built from it): a CLIP-style tower (224 px, patch 14, width 384, 6 layers, frozen,
LLaVA's penultimate layer), avgpool to V = 64, the mlp2x_gelu projector, a Qwen2-style LLM (hidden 768, 12 layers,
12 heads, MLP 2048, vocabulary 32,000 untied: 134.1 M parameters); batch 4 x 512 tokens, float32, AdamW on the LLM
and the projector, loss on each row's last quarter (vlm-jax: the output layer 128 positions at a time, skipping
chunks without answer tokens, `train.loss_chunk`; `--loss_chunk=0` computes it everywhere, as the reference
does). The LLM's layers run as the project's default has them on the CPU (`llm.scan_layers` unset: a loop, as
PyTorch runs them); `--scan_layers` runs them under `nn.scan`, which on the CPU costs the slicing of stacked weights
and residuals and the zeroing of stacked gradients (benchmarks/README.md). The reference is transformers'
CLIPVisionModel and Qwen2ForCausalLM (its default attention, SDPA) with torch.optim.AdamW (fused where available).

vlm-jax allocates through glibc's malloc on transparent huge pages, as the launchers run (launch/runtime.py); the
reference runs in a process of its own with malloc as suits it best on this machine (one arena that keeps freed
memory: 8.1-8.5 s a step, against 10.9 s with glibc's defaults and 12.0 s on huge pages). Prints each side's best
step time, the step FLOPs (vlm_jax.flops, the same model) as a fraction of the f32 matmul peak JAX measures in this
process, and the ratio PyTorch time / vlm-jax time; then where vlm-jax's step goes
(forward + backward with the step's loss, the output layer + loss alone, AdamW alone), each timed as its own jitted
program.
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks.fresh_process import run_python
from configs import common, models
from launch import runtime
from vlm_jax import flops, hardware, optim, sharding
from vlm_jax import state as state_lib
from vlm_jax.models import layers
from vlm_jax.models import llm as llm_lib
from vlm_jax.models import vlm

VISION = dict(image_size=224, patch_size=14, width=384, depth=6, num_heads=6, mlp_dim=1536, layer_norm_eps=1e-5)
LLM = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=12,
           tie_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=2048)
V = 64


def jax_config(batch: int, length: int, loss_chunk: int, scan_layers: bool = False) -> ml_collections.ConfigDict:
    """The project's defaults (`scan_layers` unset: a loop on the CPU), or the layers scanned when asked."""
    model = models.model_config("tiny", "tiny", "avgpool", V)
    model.vision = models.vision_config("tiny", **VISION)
    model.llm = models.llm_config("tiny", **LLM)
    if scan_layers:
        model.llm.scan_layers = True
    return ml_collections.ConfigDict(dict(
        model=model, mesh=common.mesh_config(), data=dict(seq_len=length - V, question_len=16),
        train=common.train_config(stage="full", batch_size=batch, warmup_ratio=0.0, loss_chunk=loss_chunk)))


def make_batch(batch: int, length: int, rng) -> dict[str, np.ndarray]:
    tokens = rng.integers(3, LLM["vocab_size"], (batch, length)).astype(np.int32)
    loss_mask = np.zeros((batch, length), np.float32)
    loss_mask[:, -length // 4:-1] = 1
    return dict(pixels=rng.normal(size=(batch, 224, 224, 3)).astype(np.float32), tokens=tokens,
                targets=np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], 1), loss_mask=loss_mask,
                attention_mask=np.ones((batch, length), np.int32),
                image_positions=np.broadcast_to(1 + np.arange(V, dtype=np.int32), (batch, V)).copy(),
                question_tokens=np.ones((batch, 16), np.int32), question_mask=np.ones((batch, 16), np.int32))


def skipped_output_flops(loss_mask: np.ndarray, chunk: int) -> float:
    """Output-layer FLOPs (forward + backward) of the chunks that hold no answer token, which the step skips."""
    if not chunk:
        return 0.0
    b, t = loss_mask.shape
    holds = np.pad(loss_mask, ((0, 0), (0, -t % chunk))).reshape(b, -1, chunk).any(axis=(0, 2))
    return 6.0 * b * chunk * float((~holds).sum()) * LLM["hidden_size"] * LLM["vocab_size"]


def best_time(fn, steps: int) -> float:
    jax.block_until_ready(fn())   # compile / warm up
    best = float("inf")
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def jax_times(config, batch, steps: int) -> dict[str, float]:
    """The whole step, and its parts each as its own jitted program."""
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    layout = state_lib.state_layout(config.model, config.train, mesh)
    state, _, tx = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0), layout=layout)
    model = vlm.VLM(config.model)
    step = state_lib.jit_train_step(config, mesh, layout, donate_state=False)
    params = optim.merge(state.params, state.frozen)
    times = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        times["step"] = best_time(lambda: step(state, batch), steps)

        def head_loss(h, w):   # the output layer + loss as the step computes them
            if config.train.loss_chunk:
                return state_lib.chunked_cross_entropy(h, w, batch["targets"], batch["loss_mask"],
                                                   config.train.loss_chunk)[0]
            return state_lib.masked_cross_entropy(layers.contract(h, w, 1), batch["targets"],
                                              batch["loss_mask"])[0]

        def loss(trainable, b):
            p = optim.merge(trainable, state.frozen)
            h = model.apply({"params": p}, **state_lib.model_inputs(b), method=vlm.VLM.hidden_states)
            return head_loss(h, llm_lib.output_weights(p["llm"], config.model.llm))
        grads = jax.jit(jax.grad(loss))
        times["forward + backward"] = best_time(lambda: grads(state.params, batch), steps)
        hidden = jax.jit(lambda p, b: model.apply({"params": p}, **state_lib.model_inputs(b),
                                                  method=vlm.VLM.hidden_states))(params, batch)
        w = llm_lib.output_weights(params["llm"], config.model.llm)
        head = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
        times["output layer + loss (fwd + bwd)"] = best_time(lambda: head(hidden, w), steps)
        g = jax.tree.map(jnp.ones_like, state.params)
        update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
        times["AdamW update"] = best_time(lambda: update(g, state.opt_state, state.params), steps)
    return times


def torch_time(batch_np, steps: int) -> float:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=VISION["width"], intermediate_size=VISION["mlp_dim"], num_hidden_layers=VISION["depth"],
        num_attention_heads=VISION["num_heads"], image_size=VISION["image_size"], patch_size=VISION["patch_size"],
        hidden_act="quick_gelu")).eval().requires_grad_(False)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=LLM["vocab_size"], hidden_size=LLM["hidden_size"], intermediate_size=LLM["intermediate_size"],
        num_hidden_layers=LLM["num_layers"], num_attention_heads=LLM["num_heads"],
        num_key_value_heads=LLM["num_kv_heads"], tie_word_embeddings=False, rope_theta=LLM["rope_theta"],
        max_position_embeddings=LLM["max_position_embeddings"]))
    projector = torch.nn.Sequential(torch.nn.Linear(VISION["width"], LLM["hidden_size"]), torch.nn.GELU(),
                                    torch.nn.Linear(LLM["hidden_size"], LLM["hidden_size"]))
    opt = torch.optim.AdamW([*llm.parameters(), *projector.parameters()], lr=1e-4, weight_decay=0.0)
    pixels = torch.from_numpy(batch_np["pixels"]).permute(0, 3, 1, 2).contiguous()
    tokens = torch.from_numpy(batch_np["tokens"]).long()
    labels = torch.where(torch.from_numpy(np.roll(batch_np["loss_mask"], 1, axis=1)) > 0, tokens, -100)
    slots = torch.from_numpy(batch_np["image_positions"]).long()
    rows = torch.arange(tokens.shape[0])[:, None]
    g = VISION["image_size"] // VISION["patch_size"]

    def step():
        with torch.no_grad():   # frozen tower, LLaVA's penultimate layer, patch tokens only
            feats = vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        b, _, d = feats.shape
        pooled = torch.nn.functional.avg_pool2d(feats.transpose(1, 2).reshape(b, d, g, g), g // 8)
        visual = projector(pooled.flatten(2).transpose(1, 2))
        embeds = llm.get_input_embeddings()(tokens).index_put((rows, slots), visual)
        loss = llm(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()
    best = float("inf")
    for _ in range(steps):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return best


# glibc's mallopt parameters (malloc.h): one arena, nothing mapped, nothing trimmed below 2 GiB.
_ONE_ARENA = ((-8, 1), (-4, 0), (-1, 2**31 - 1))   # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD


def keep_freed_memory_in_one_arena() -> None:
    """The malloc settings under which the reference's step ran fastest here: 8.1-8.5 s, against 10.9 s with glibc's
    defaults and 12.0 s with the huge pages vlm-jax's launchers use (benchmarks/README.md)."""
    import ctypes   # pylint: disable=import-outside-toplevel
    libc = ctypes.CDLL("libc.so.6")
    for param, value in _ONE_ARENA:
        libc.mallopt(param, value)


def reference_time(batch: int, length: int, steps: int) -> float:
    """torch_time in a process of its own with malloc as suits it best (above), on the same batch (same seed)."""
    code = (f"from benchmarks import bench_torch_step as b; b.keep_freed_memory_in_one_arena(); "
            f"import numpy as np; "
            f"print(b.torch_time(b.make_batch({batch}, {length}, np.random.default_rng(0)), {steps}))")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    return float(run_python(["-c", code], env, "the PyTorch reference"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--loss_chunk", type=int, default=128, help="train.loss_chunk (0: the whole output layer)")
    ap.add_argument("--scan_layers", action="store_true", help="llm.scan_layers (default: a loop, as PyTorch runs)")
    args = ap.parse_args()
    config = jax_config(args.batch, args.length, args.loss_chunk, args.scan_layers)
    batch = make_batch(args.batch, args.length, np.random.default_rng(0))
    n_llm = flops.count_params(jax.eval_shape(vlm.init_fn(config.model), jax.random.key(0))["llm"])
    step_flops = flops.train_step_flops(config.model, batch_size=args.batch, seq_len=args.length, train_llm=True,
                                        train_vision=False)
    peak = hardware.measured_matmul_peak()
    times = jax_times(config, batch, args.steps)
    t_torch = reference_time(args.batch, args.length, args.steps)
    print(f"config: LLM {n_llm / 1e6:.1f} M parameters, batch {args.batch} x {args.length}, V={V}, f32, "
          f"scan_layers={args.scan_layers}; "
          f"{step_flops / 1e9:.0f} GFLOPs per step; f32 matmul peak (JAX, measured) {peak / 1e9:.0f} GFLOP/s")
    run_flops = step_flops - skipped_output_flops(batch["loss_mask"], args.loss_chunk)
    print(f"vlm-jax step          {times['step']:7.3f} s   {step_flops / times['step'] / peak:.2f} of peak "
          f"(model FLOPs); {run_flops / times['step'] / peak:.2f} counting only the FLOPs it runs "
          f"(loss_chunk={args.loss_chunk})")
    print(f"PyTorch+transformers  {t_torch:7.3f} s   {step_flops / t_torch / peak:.2f} of peak")
    print(f"PyTorch / vlm-jax     {t_torch / times['step']:.2f}x")
    print("vlm-jax parts, each its own program (fraction of the step):")
    for name, t in times.items():
        if name != "step":
            print(f"  {name:34} {t:7.3f} s  {t / times['step']:.2f}")


if __name__ == "__main__":
    runtime.use_huge_pages()   # as the launchers do (re-executes the process)
    main()
