"""Peak host memory while loading a Hugging Face LLM checkpoint onto a mesh, next to its size on disk.

    python -m benchmarks.bench_hf_load_memory [--llm=qwen1.5-1.8b] [--dir=/tmp/hf-bench] [--devices=8]

Writes a random checkpoint of the preset's real shapes (bf16 safetensors shards + index + config.json, as the hub
ships Qwen1.5) in a process of its own, then loads it in a fresh process through `config.init` onto `--devices`
fake CPU devices (fsdp over all of them, parameters stored bf16) and reports, from /proc/self/status: the
process's own (anonymous) memory before loading and at its peak, the bytes of the loaded arrays, and the peak of
mapped file pages. On CPU the "devices" live in host memory, so the arrays themselves count; the loader's own cost
is peak - before - arrays.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kib() -> dict:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("RssAnon", "RssFile"))}


class PeakMemory:
    """Polls /proc/self/status: the peaks of anonymous memory (the process's own) and of file-backed pages (here
    the safetensors files mapped by the reader: page cache the kernel can drop, not memory the loader holds)."""

    def __init__(self, interval=0.01):
        import threading
        self.peak = _status_kib()
        self._interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            for k, v in _status_kib().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self._interval)

    def __enter__(self):
        self.peak = _status_kib()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_checkpoint(llm: str, out: str) -> None:
    """Random bf16 tensors of the preset's HF shapes (from our model's abstract parameters through the key table)."""
    import jax
    import ml_dtypes
    import numpy as np

    from configs import models
    from vlm_jax import sharding
    from vlm_jax.weights import convert, export, families, load

    model = models.model_config("tiny", llm, "avgpool", 1)
    abstract = convert.abstract_params(model, sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), jax.devices()[:1]))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, entries in load.expand(families.QWEN2, set(abstract), model.llm.num_layers).items():
        if name not in abstract:
            continue       # the tied output layer
        shape = abstract[name].shape[1:] if load.is_stacked(name, entries) else abstract[name].shape
        for hf, layout in entries:
            tensors[hf] = rng.standard_normal(layout.hf_shape(shape), np.float32).astype(ml_dtypes.bfloat16)
    export.write_directory(out, tensors, export.qwen2_config(model.llm, "bfloat16"), "bfloat16",
                           max_shard_bytes=2**30)


def load_and_measure(llm: str, path: str) -> dict:
    import jax

    from configs import common, models
    from vlm_jax import sharding
    from vlm_jax import state as state_lib

    model = models.model_config("tiny", llm, "avgpool", 1)
    model.param_dtype = "bfloat16"
    tcfg = common.train_config(stage="projector", steps=1, batch_size=8, lr=1e-3, warmup_ratio=0.0)
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    before = _status_kib()
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        state, _, _ = state_lib.create_state(model, tcfg, mesh, jax.random.key(0), [(path, "llm/.*")])
        jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    llm_bytes = sum(x.nbytes for x in jax.tree.leaves(state.frozen["llm"]))
    all_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return dict(anon_before_mib=before["RssAnon"] / 1024, anon_peak_mib=mem.peak["RssAnon"] / 1024,
                file_peak_mib=mem.peak["RssFile"] / 1024, llm_array_mib=llm_bytes / 2**20,
                state_array_mib=all_bytes / 2**20, seconds=seconds, devices=jax.device_count())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="qwen1.5-1.8b")
    ap.add_argument("--dir", default="/tmp/hf-bench")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--_role", default="")
    args = ap.parse_args()
    path = os.path.join(args.dir, args.llm)
    if args._role == "write":
        write_checkpoint(args.llm, path)
        return
    if args._role == "load":
        print(json.dumps(load_and_measure(args.llm, path)))
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        subprocess.run([sys.executable, "-m", "benchmarks.bench_hf_load_memory", f"--llm={args.llm}",
                        f"--dir={args.dir}", "--_role=write"], cwd=ROOT, check=True)
    disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_hf_load_memory", f"--llm={args.llm}",
                          f"--dir={args.dir}", "--_role=load"], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    overhead = r["anon_peak_mib"] - r["anon_before_mib"] - r["state_array_mib"]
    print(f"{args.llm}: {disk / 2**20:,.0f} MiB of bf16 safetensors on disk, loaded onto {r['devices']} devices "
          f"in {r['seconds']:.1f} s")
    print(f"  process memory before {r['anon_before_mib']:,.0f} MiB, peak {r['anon_peak_mib']:,.0f} MiB; loaded "
          f"arrays {r['state_array_mib']:,.0f} MiB (LLM {r['llm_array_mib']:,.0f} MiB); mapped file pages at most "
          f"{r['file_peak_mib']:,.0f} MiB (page cache)")
    print(f"  loader overhead (peak - before - arrays): {overhead:,.0f} MiB = {overhead / (disk / 2**20):.2f} x "
          f"the checkpoint")

if __name__ == "__main__":
    main()
