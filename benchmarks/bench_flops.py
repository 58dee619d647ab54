"""The train-step FLOPs that the logged MFU divides by, against XLA's own count, at the paper's real shapes.

    python -m benchmarks.bench_flops [--llm=qwen1.5-0.5b] [--tokens=1,576] [--compressors=avgpool,quecc]

For each compressor, V and stage of `configs/llava.py` (CLIP ViT-L/14-336 frozen, the named Qwen1.5, sequences of
2048 + V, QueCC's question pass over `data.question_len` = 512), batch 1: the train step is lowered over abstract
inputs (nothing allocated, nothing compiled) and XLA's cost analysis counts its FLOPs. So that XLA counts the model
once, as MaxText's MFU does: the LLM's layers are unrolled (XLA counts a loop body once), without remat (it would
count the recomputed forward), and the output layer runs whole (a chunked loss is a loop too); float32.

Prints our count (`flops.train_step_flops`, what `train.run` logs), XLA's, and the ratio. XLA counts more than the
model: on the CPU the causal attention computes 3/4 of the score square (two query blocks, `layers.attention`) where
our count, as MaxText's, charges the causal half, plus norms, softmaxes and AdamW.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax

from configs import llava
from vlm_jax import sharding
from vlm_jax import state as state_lib


def counts(llm: str, compressor: str, tokens: int, stage: int) -> tuple[float, float]:
    """(our step FLOPs, XLA's) of one llava stage at batch 1, as the module docstring describes."""
    config = llava.get_config(f"llm={llm},compressor={compressor},tokens={tokens},stage={stage}")
    config.unlock()
    m, t = config.model, config.train
    m.dtype, m.llm.scan_layers, m.llm.remat = "float32", False, "none"
    t.batch_size, t.loss_chunk = 1, 0
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    layout = state_lib.state_layout(m, t, mesh)
    step = state_lib.jit_train_step(config, mesh, layout)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        cost = step.lower(layout[1], state_lib.abstract_batch(config, mesh)).cost_analysis()
    return state_lib.step_flops(config, set(layout[1].params)), float(cost["flops"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="qwen1.5-0.5b")
    ap.add_argument("--tokens", default="1,576")
    ap.add_argument("--compressors", default="avgpool,quecc")
    args = ap.parse_args()
    print(f"{'cell':34} {'ours (TFLOPs)':>14} {'XLA (TFLOPs)':>13} {'ours / XLA':>10}")
    for compressor in args.compressors.split(","):
        for tokens in (int(v) for v in args.tokens.split(",")):
            for stage in (1, 2):
                start = time.perf_counter()
                ours, xla = counts(args.llm, compressor, tokens, stage)
                name = f"{args.llm} {compressor} V={tokens} stage {stage}"
                print(f"{name:34} {ours / 1e12:14.3f} {xla / 1e12:13.3f} {ours / xla:10.3f}   "
                      f"({time.perf_counter() - start:.0f} s to lower)", flush=True)


if __name__ == "__main__":
    main()
