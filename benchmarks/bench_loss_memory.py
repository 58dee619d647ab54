"""Memory of the train step with and without the chunked output layer + loss, at a real vocabulary size.

    python -m benchmarks.bench_loss_memory [--vocab=151936] [--seq=2048] [--batch=2] [--chunks=0,1024,512,256]

Compiles (does not run) the full jitted train step of the tiny VLM with Qwen1.5's 151,936-token vocabulary at
sequence length 2048, once per `train.loss_chunk`, and prints XLA's temporary-buffer bytes for each as a ratio to the
unchunked step. The whole-sequence float32 logits alone are batch x seq x vocab x 4 bytes (1.24 GB per example here).
"""

import argparse

import jax

from configs import smoke
from vlm_jax import sharding
from vlm_jax import state as state_lib


def temp_bytes(config) -> int:
    mesh = sharding.make_mesh(config.mesh)
    layout = state_lib.state_layout(config.model, config.train, mesh)
    step = state_lib.jit_train_step(config, mesh, layout)
    with jax.set_mesh(mesh):
        compiled = step.lower(layout[1], state_lib.abstract_batch(config, mesh)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--chunks", default="0,1024,512,256")
    args = ap.parse_args()
    config = smoke.get_config("tokens=16")
    with config.unlocked():
        config.model.llm.vocab_size = args.vocab
        config.data.seq_len = args.seq - config.model.compressor.num_tokens
        config.train.batch_size = args.batch
    logits_gb = args.batch * args.seq * args.vocab * 4 / 1e9
    print(f"tiny VLM, vocab {args.vocab}, sequence {args.seq}, batch {args.batch}: "
          f"whole-sequence f32 logits {logits_gb:.2f} GB")
    base = None
    for chunk in (int(c) for c in args.chunks.split(",")):
        with config.unlocked():
            config.train.loss_chunk = chunk
        t = temp_bytes(config)
        base = base or t
        print(f"loss_chunk={chunk:<5} temporary buffers {t / 1e9:6.2f} GB  ({t / base:.3f} of unchunked)")


if __name__ == "__main__":
    main()
