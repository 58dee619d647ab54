"""The paper's stage-2 train step on this machine's accelerator: step time, tokens/s, MFU and peak memory at the
largest batch that fits.

    python -m benchmarks.bench_accelerator [--llm=qwen1.5-0.5b] [--tokens=16] [--size=full|small] [--steps=5]
        [--batch=0] [--json=PATH] [--check_attention] [--attention=auto|xla]

`--size=full` (default): `configs/llava.py` stage 2 (compressor + projector + LLM train, CLIP ViT-L/14-336 frozen),
the named Qwen1.5 preset, QueCC with V visual tokens, sequences of 2048 + V and QueCC's 512 question tokens, bf16
compute with f32 master weights, the LLM's layers scanned and rematerialised and the output layer + loss 512
positions at a time, all as the config sets them. `--size=small`: the smoke presets' tiny tower and a tiny LLM
(`--llm`, default `tiny`) through the same config, state, step and timing code, on sequences of 48 + V: it runs on
a CPU in seconds. Random weights (`state.create_state`) and one synthetic batch of random tokens with every
position's next token in the loss (so the output layer runs everywhere, as the FLOPs count charges it).

The per-device batch (`--batch`, 0 = search): the step is compiled, not run, at two probe batches (`--probes`,
4 and 16 per device) and XLA's memory analysis (arguments + outputs - donated + temporaries) gives a linear estimate
of where the device's memory limit (`memory_stats()['bytes_limit']` less what is in use, times `--memory_margin`; on
a CPU, the host's available memory) is reached; from the largest power of two below it, the batch doubles while
the next one fits, or bisects down where it does not (`search_batch`); compilations run two at a time. The chosen
step then runs; an out-of-memory error at run time halves it again. On an H200 each compilation of the 0.5B step
took ~50 s (jax 0.11.2; two side by side ~50 s, the 256-per-device one ~100 s as XLA tried to rematerialise it
into memory): a search costs minutes, and `--batch` skips it.

Prints the device, the step time (median of `--steps` timed steps after `--warmup` untimed ones, each ended by
block_until_ready), tokens/s (global batch x sequence length / step time), MFU (`state.step_flops`, what the
training loop's logged MFU divides, over the step time and the devices' bf16 peak from `vlm_jax.hardware`'s table,
or a measured matmul peak where the table has no entry, e.g. a CPU) and the peak device memory
(`memory_stats()['peak_bytes_in_use']`; n/a where the backend keeps none, e.g. a CPU). `--json` writes the same
numbers. `--check_attention` first compares the attention kernel the layers choose (`layers.attention`: cuDNN's
fused kernel on NVIDIA GPUs where it takes the shapes) against `jax.nn.dot_product_attention`'s XLA path in float32,
forward and gradients, at the LLM's and the vision tower's shapes. `--attention=xla` keeps the step off cuDNN
(VLM_JAX_CUDNN_ATTENTION=0), for a comparison.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform as platform_lib
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import llava, models, smoke
from vlm_jax import hardware, sharding
from vlm_jax import state as state_lib
from vlm_jax.models import layers
from vlm_jax.models import llm as llm_lib
from vlm_jax.scaling import units

SMALL_SEQ_LEN, SMALL_QUESTION_LEN, SMALL_LOSS_CHUNK = 48, 16, 32


def bench_config(llm: str, tokens: int, size: str, compressor: str = "quecc"):
    """The stage-2 config this benchmark runs (unlocked; the batch is set per search step)."""
    if size not in ("full", "small"):
        raise ValueError(f"--size must be full or small, got {size!r}")
    config = llava.get_config(f"llm={llm if size == 'full' else 'qwen1.5-0.5b'},compressor={compressor},"
                              f"tokens={tokens},stage=2")
    config.unlock()
    if size == "small":   # the smoke presets' model, set up as the full-size config sets its own
        full = config.model
        config.model = smoke.get_config(f"llm={llm},compressor={compressor},tokens={tokens}").model
        config.model.unlock()
        config.model.dtype, config.model.head_init = full.dtype, full.head_init
        config.model.llm.remat, config.model.llm.scan_layers = full.llm.remat, full.llm.scan_layers
        config.data.seq_len, config.data.question_len = SMALL_SEQ_LEN, SMALL_QUESTION_LEN
        config.train.loss_chunk = SMALL_LOSS_CHUNK
    config.train.batch_size = 1
    return config


def with_batch(config, global_batch: int):
    config = config.copy_and_resolve_references()
    config.train.batch_size = global_batch
    return config


def synthetic_batch(config, mesh, seed: int = 0) -> dict:
    """One batch of `state.abstract_batch`'s shapes on the batch sharding: random pixels and tokens, every row's V
    image slots right after its first token, every real position (image slots aside) predicting a random next
    token, so that each output-layer chunk runs (the FLOPs count charges them all)."""
    rng = np.random.default_rng(seed)
    m = config.model
    vocab, v = m.llm.vocab_size, m.compressor.num_tokens
    host = {}
    for key, spec in state_lib.abstract_batch(config, mesh).items():
        shape = spec.shape
        if key == "pixels":
            host[key] = rng.normal(size=shape).astype(np.float32)
        elif key in ("tokens", "targets", "question_tokens"):
            host[key] = rng.integers(0, vocab, shape).astype(np.int32)
        elif key in ("attention_mask", "question_mask"):
            host[key] = np.ones(shape, np.int32)
        elif key == "image_positions":
            host[key] = np.broadcast_to(1 + np.arange(shape[-1], dtype=np.int32), shape).copy()
        elif key == "loss_mask":
            mask = np.ones(shape, np.float32)
            mask[:, 1:1 + v] = 0.0   # the image slots predict nothing
            host[key] = mask
        else:
            raise ValueError(f"synthetic_batch: no rule for batch key {key!r}")
    return sharding.put_batch(host, mesh)


def bytes_needed(compiled) -> int:
    """Device bytes one run of a compiled step holds at its peak, from XLA's memory analysis: arguments and
    outputs (less the donated buffers outputs reuse) and temporaries."""
    a = compiled.memory_analysis()
    return int(a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes)


def search_batch(bytes_at: Callable[[int], int], limit: int, max_batch: int = 1024,
                 prefetch: Callable[[list[int]], None] | None = None, probes: tuple[int, int] = (1, 2)) -> int:
    """The largest power of two b <= max_batch with bytes_at(b) <= limit (bytes_at growing with b); 0 if not even
    1 fits. Asks bytes_at (a compilation each) for few batches: the two `probes` (powers of two) give a linear
    estimate of where the limit lies; from the largest power of two below it, the batch doubles while the next
    one fits, or, where the estimate overshot (memory growing faster than linearly), bisects the powers of two
    between the largest that fits and the smallest that does not (below the first probe: halving). `prefetch`,
    if given, is told the batches about to be asked for (the probes, then the estimate and its double), so that
    their compilations can run side by side."""
    known: dict[int, int] = {}

    def fits(b: int) -> bool:
        if b not in known:
            known[b] = bytes_at(b)
        return known[b] <= limit

    def floor_pow2(x: float) -> int:
        return 1 << (max(int(x), 1).bit_length() - 1)

    def bisect(lo: int, hi: int) -> int:   # lo fits, hi does not
        while hi > 2 * lo:
            mid = 1 << ((lo.bit_length() + hi.bit_length() - 2) // 2)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    p2 = min(floor_pow2(probes[1]), floor_pow2(max_batch))
    p1 = min(floor_pow2(probes[0]), max(p2 // 2, 1))
    if prefetch:
        prefetch(sorted({p1, p2}))
    if not fits(p1):
        b = p1 // 2
        while b and not fits(b):
            b //= 2
        return b
    if p2 == p1:
        return p1
    if not fits(p2):
        return bisect(p1, p2)
    per_example = max((known[p2] - known[p1]) / (p2 - p1), 1.0)
    b = floor_pow2(max(p2, min(max_batch, p2 + (limit - known[p2]) / per_example)))
    lo, hi = p2, None   # the largest power of two known to fit, the smallest known not to
    if b > lo:
        if prefetch:
            prefetch([b] + ([2 * b] if 2 * b <= max_batch else []))
        lo, hi = (b, None) if fits(b) else (lo, b)
    if hi is None:
        while 2 * lo <= max_batch and fits(2 * lo):
            lo *= 2
        return lo
    return bisect(lo, hi)


def memory_limit() -> tuple[int, str]:
    """(bytes a step may use on device 0, where the figure comes from)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), "memory_stats bytes_limit - in use"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host available memory"


def peak_memory() -> int | None:
    """The largest `peak_bytes_in_use` over the local devices, or None where the backend reports none."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


class Step:
    """The config's train step over one mesh, compiled per global batch (ahead of time, so that each compilation's
    memory analysis can be read and its executable run). `prefetch` starts compilations in threads (XLA compiles
    without holding Python's lock): a batch search on a GPU pays for its compilations two at a time."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.layout = state_lib.state_layout(config.model, config.train, mesh)
        self.jitted = state_lib.jit_train_step(config, mesh, self.layout)
        self.compile_s: dict[int, float] = {}
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

    def _compile(self, global_batch: int):
        start = time.perf_counter()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
            batch = state_lib.abstract_batch(with_batch(self.config, global_batch), self.mesh)
            compiled = self.jitted.lower(self.layout[1], batch).compile()
        self.compile_s[global_batch] = time.perf_counter() - start
        return compiled

    def prefetch(self, global_batches) -> None:
        for b in global_batches:
            if b not in self._futures:
                self._futures[b] = self._pool.submit(self._compile, b)

    def compile(self, global_batch: int):
        self.prefetch([global_batch])
        return self._futures[global_batch].result()


def time_steps(step: Step, global_batch: int, warmup: int, steps: int) -> tuple[list[float], float]:
    """(seconds of each timed step, last loss): a fresh state, `warmup` untimed steps, then `steps` timed ones."""
    config = with_batch(step.config, global_batch)
    compiled = step.compile(global_batch)
    progress(f"step compiled for a global batch of {global_batch} ({step.compile_s[global_batch]:.1f} s)")
    state, _, _ = state_lib.create_state(config.model, config.train, step.mesh, jax.random.key(0),
                                         layout=step.layout)
    batch = synthetic_batch(config, step.mesh)
    jax.block_until_ready((state, batch))
    progress("state and batch created")
    times = []
    with jax.set_mesh(step.mesh), nn.logical_axis_rules(sharding.RULES):
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            seconds = time.perf_counter() - start
            progress(f"step {i + 1} of {warmup + steps}{' (warm-up)' if i < warmup else ''}: {seconds:.3f} s")
            if i >= warmup:
                times.append(seconds)
    return times, float(metrics["loss"])


_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"  [{time.perf_counter() - _START:6.1f} s] {message}", flush=True)


def attention_kinds(config) -> dict[str, str]:
    """The kernel `layers.attention` picks on this backend for the step's attention calls."""
    m = config.model
    platform, capability = layers.attention_platform()
    dtype = jnp.dtype(m.dtype)
    t = config.data.seq_len + m.compressor.num_tokens
    vision_t = (m.vision.image_size // m.vision.patch_size) ** 2 + 1
    pick = lambda head_dim, length, kind: layers.attention_implementation(   # noqa: E731
        platform, dtype, head_dim, length, length, kind, capability)
    return {"llm": pick(m.llm.head_dim, t, "causal"),
            "llm_question": pick(m.llm.head_dim, config.data.question_len, "causal"),
            "vision": pick(m.vision.width // m.vision.num_heads, vision_t, "none")}


def check_attention(config, batch: int = 2) -> list[dict]:
    """`layers.attention` (whatever kernel it picks here) against `jax.nn.dot_product_attention`'s XLA path in
    float32, forward and the gradients of q, k, v, at the LLM's shapes (causal mask, each row's last eighth padding)
    and the vision tower's (no mask); only the non-padding query rows count."""
    m = config.model
    t = config.data.seq_len + m.compressor.num_tokens
    vision_t = (m.vision.image_size // m.vision.patch_size) ** 2 + 1
    dtype = jnp.dtype(m.dtype)
    cases = [("llm", t, m.llm.num_heads, m.llm.num_kv_heads, m.llm.head_dim, True),
             ("vision", vision_t, m.vision.num_heads, m.vision.num_heads, m.vision.width // m.vision.num_heads, False)]
    rows = []
    for name, length, heads, kv_heads, head_dim, causal in cases:
        keys = jax.random.split(jax.random.key(1), 4)
        q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32)
        k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.float32)
        v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.float32)
        cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
        valid = jnp.ones((batch, length), jnp.int32)
        if causal:
            valid = valid.at[:, length - length // 8:].set(0)
            mask = llm_lib.causal_mask(jnp.arange(length), valid, q_segments=valid)
        else:
            mask = None
        rows_valid = valid.astype(bool)[:, :, None, None]

        def loss(fn, q, k, v):
            out = fn(q, k, v)
            return jnp.sum(jnp.where(rows_valid, out.astype(jnp.float32) * cotangent, 0.0)), out

        ours = lambda q, k, v: layers.attention(q, k, v, mask, causal=causal)   # noqa: E731
        reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask,   # noqa: E731
                                                                 implementation="xla")
        run_ours = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2), has_aux=True))
        run_ref = jax.jit(jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2), has_aux=True))
        low = [x.astype(dtype) for x in (q, k, v)]
        kind = "causal" if causal else "none"
        platform, capability = layers.attention_platform()
        impl = layers.attention_implementation(platform, dtype, head_dim, length, length, kind, capability)
        row = dict(case=name, implementation=impl, dtype=str(dtype), shape=[batch, length, heads, kv_heads, head_dim])
        try:
            (grads, out) = run_ours(*low)
        except Exception as error:   # pylint: disable=broad-except  (recorded: the step would meet it too)
            rows.append(dict(row, error=f"{type(error).__name__}: {error}"[:2000]))
            continue
        (ref_grads, ref_out) = run_ref(q, k, v)
        jax.block_until_ready((grads, out, ref_grads, ref_out))
        start = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(run_ours(*low))
        seconds = (time.perf_counter() - start) / 5
        err = lambda a, b: float(jnp.max(jnp.where(rows_valid, jnp.abs(a.astype(jnp.float32) - b), 0.0)))  # noqa
        scale = lambda b: float(jnp.max(jnp.where(rows_valid, jnp.abs(b), 0.0)))   # noqa: E731
        rows.append(dict(
            row, out_max_abs_err=err(out, ref_out), out_max_abs=scale(ref_out),
            dq_max_abs_err=float(jnp.max(jnp.abs(grads[0].astype(jnp.float32) - ref_grads[0]))),
            dq_max_abs=float(jnp.max(jnp.abs(ref_grads[0]))),
            dk_max_abs_err=float(jnp.max(jnp.abs(grads[1].astype(jnp.float32) - ref_grads[1]))),
            dv_max_abs_err=float(jnp.max(jnp.abs(grads[2].astype(jnp.float32) - ref_grads[2]))),
            fwd_bwd_ms=seconds * 1e3))
    return rows


def write_json(path: str, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def run(args) -> dict:
    if args.attention == "xla":
        os.environ["VLM_JAX_CUDNN_ATTENTION"] = "0"
    llm = args.llm or ("qwen1.5-0.5b" if args.size == "full" else "tiny")
    if llm not in models.LLM_PRESETS:
        raise ValueError(f"--llm={llm!r}; known: {sorted(models.LLM_PRESETS)}")
    config = bench_config(llm, args.tokens, args.size, args.compressor)
    mesh = sharding.make_mesh(config.mesh)
    devices = mesh.size
    kind = jax.devices()[0].device_kind
    result = dict(
        llm=llm, size=args.size, compressor=args.compressor, tokens=args.tokens, device_kind=kind, devices=devices,
        backend=jax.default_backend(), jax_version=jax.__version__, python=platform_lib.python_version(),
        dtype=config.model.dtype, remat=config.model.llm.remat, scan_layers=config.model.llm.scan_layers,
        loss_chunk=config.train.loss_chunk, seq_len=config.data.seq_len + config.model.compressor.num_tokens,
        question_len=config.data.question_len, attention=attention_kinds(config))
    progress(f"{kind} x {devices}, jax {jax.__version__}; {llm} {args.size}")
    if args.check_attention:
        result["attention_check"] = check_attention(config)
        for line in summary_attention(result["attention_check"]):
            print(line, flush=True)
        write_json(args.json, result)

    step = Step(config, mesh)
    limit, limit_source = memory_limit()
    result.update(memory_limit_bytes=limit, memory_limit_source=limit_source)
    search = {}
    if args.batch:
        per_device = args.batch
    else:
        def bytes_at(b: int) -> int:
            search[b] = bytes_needed(step.compile(b * devices))
            progress(f"search: {b} per device -> {search[b] / 2**30:.2f} GiB "
                     f"(compiled in {step.compile_s[b * devices]:.1f} s)")
            return search[b]
        probes = tuple(int(p) for p in args.probes.split(","))
        per_device = search_batch(bytes_at, int(limit * args.memory_margin), args.max_batch,
                                  prefetch=lambda bs: step.prefetch([b * devices for b in bs]), probes=probes)
        if not per_device:
            raise RuntimeError(f"not even one example per device fits: {search[1]} bytes, limit {limit}")
    result["batch_search_bytes"] = {str(b): n for b, n in sorted(search.items())}

    while True:   # what the analysis said fits may still not, at run time: halve
        try:
            times, loss = time_steps(step, per_device * devices, args.warmup, args.steps)
            break
        except Exception as error:   # pylint: disable=broad-except
            if not (is_out_of_memory(error) and per_device > 1 and not args.batch):
                raise
            print(f"  out of memory at {per_device} per device at run time; halving", flush=True)
            result.setdefault("out_of_memory_at", []).append(per_device)
            per_device //= 2

    global_batch = per_device * devices
    run_config = with_batch(config, global_batch)
    median = statistics.median(times)
    tokens = global_batch * result["seq_len"]
    result.update(
        per_device_batch=per_device, global_batch=global_batch, step_times_s=times, step_time_s=median,
        tokens_per_step=tokens, tokens_per_s=tokens / median, loss=loss, compile_s=step.compile_s.get(global_batch),
        predicted_bytes=bytes_needed(step.compile(global_batch)), peak_memory_bytes=peak_memory())
    write_json(args.json, result)   # what was measured is kept whatever follows
    peak, peak_source = hardware.peak_flops_per_device()
    result.update(peak_flops_per_device=peak, peak_source=peak_source)
    try:
        step_flops = state_lib.step_flops(run_config, set(step.layout[1].params))
    except Exception as error:   # pylint: disable=broad-except  (the times stand without it)
        result.update(step_flops=None, flops_per_s=None, mfu=None, step_flops_error=f"{type(error).__name__}: {error}")
    else:
        result.update(step_flops=step_flops, flops_per_s=step_flops / median,
                      mfu=step_flops / median / (peak * devices))
    if not math.isfinite(loss):
        raise RuntimeError(f"the step's loss is not finite: {loss}")
    return result


def summary(r: dict) -> str:
    gib = lambda n: "n/a" if n is None else f"{n / 2**30:.2f} GiB"   # noqa: E731
    lines = [
        f"device: {r['device_kind']} x {r['devices']} ({r['backend']}, jax {r['jax_version']})",
        f"model: {r['llm']} + {r['compressor']} V={r['tokens']} ({r['size']}), {r['dtype']}, remat={r['remat']}, "
        f"sequence {r['seq_len']}; attention: " + ", ".join(f"{k} {v}" for k, v in r["attention"].items()),
        f"batch: {r['per_device_batch']} per device, {r['global_batch']} global"
        + (" (searched)" if r["batch_search_bytes"] else " (given)"),
        f"step time: {r['step_time_s'] * 1e3:.1f} ms (median of {len(r['step_times_s'])}; "
        f"min {min(r['step_times_s']) * 1e3:.1f} ms), loss {r['loss']:.3f}",
        f"tokens/s: {r['tokens_per_s']:,.0f}",
        (f"MFU: n/a ({r.get('step_flops_error')})" if r["mfu"] is None else
         f"MFU: {100 * r['mfu']:.1f}% ({units.flops(r['step_flops'])} per step, "
         f"{units.flops(r['flops_per_s'])}/s; peak {units.flops(r['peak_flops_per_device'])}/s per device, "
         f"{r['peak_source']})"),
        f"peak device memory: {gib(r['peak_memory_bytes'])} (XLA's analysis of the step: "
        f"{gib(r['predicted_bytes'])}; limit {gib(r['memory_limit_bytes'])})",
    ]
    return "\n".join(lines + summary_attention(r.get("attention_check", [])))


def summary_attention(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"attention check {row['case']} ({row['implementation']}) failed: {row['error'][:300]}")
            continue
        lines.append(f"attention check {row['case']} ({row['implementation']}, {row['dtype']}): out err "
                     f"{row['out_max_abs_err']:.3g} of {row['out_max_abs']:.3g}, dq err {row['dq_max_abs_err']:.3g} "
                     f"of {row['dq_max_abs']:.3g}; fwd+bwd {row['fwd_bwd_ms']:.2f} ms")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="", help="an LLM preset (configs/models.py); default qwen1.5-0.5b, small: tiny")
    ap.add_argument("--tokens", type=int, default=16, help="V, visual tokens")
    ap.add_argument("--compressor", default="quecc")
    ap.add_argument("--size", default="full", choices=("full", "small"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=0, help="per-device batch; 0 = the largest that fits")
    ap.add_argument("--max_batch", type=int, default=1024, help="the search's largest per-device batch")
    ap.add_argument("--probes", default="4,16", help="the search's first two per-device batches (powers of two)")
    ap.add_argument("--memory_margin", type=float, default=0.9, help="share of the memory limit the search fills")
    ap.add_argument("--attention", default="auto", choices=("auto", "xla"))
    ap.add_argument("--check_attention", action="store_true")
    ap.add_argument("--json", default="", help="also write the numbers here")
    args = ap.parse_args(argv)
    result = run(args)
    print(summary(result), flush=True)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
