"""Throughput of the LLaVA pipeline with real JPEG decoding at 336 px (examples/s), per worker/thread count.

    python -m benchmarks.bench_pipeline [--images 300] [--batch 16] [--batches 10] [--repeats 5]

Writes a few hundred 640x480 JPEGs (smooth gradients plus noise, ~quality 90, a COCO-like size) and a LLaVA JSON of
multi-turn records to a temp dir, then times `make_train_iterator` (pad to square, bicubic resize to 336, V=576
slots, L=2048, a ChatML tokenizer.json) after one warm-up batch. The first line is the reference: the same
per-record work (decode + pad + resize + normalise + tokenize) in a plain single-threaded loop.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from vlm_jax.data import features, images, pipeline
from tests.tokenizer_fixtures import build_tokenizer_json
from vlm_jax.data.tokenize import HFTokenizer

QUESTION = "What is the man doing in the image? Describe the scene in detail."
ANSWER = ("The man is riding a bicycle along a street next to parked cars, with trees and buildings behind him. "
          "It is a sunny day and he is wearing a helmet.")


def write_data(root: str, n: int) -> str:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    records = []
    for i in range(n):
        base = np.stack([(xx * (i % 7 + 1) // 5) % 256, (yy * (i % 5 + 1) // 3) % 256, (xx + yy + 20 * i) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, f"{i}.jpg"), quality=90)
        records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": ANSWER},
            {"from": "human", "value": "Why?"}, {"from": "gpt", "value": ANSWER}]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def config(root: str, json_path: str, tokenizer_path: str, workers: int, threads: int):
    cfg = pipeline.default_config()
    cfg.source = "llava"
    cfg.llava.json_path, cfg.llava.image_dir = json_path, root
    cfg.tokenizer.path = tokenizer_path
    cfg.seq_len, cfg.question_len = 2048 - 576, 64
    cfg.worker_count, cfg.read_threads = workers, threads
    return cfg


def reference_rate(root: str, json_path: str, tok, n: int) -> float:
    """Examples/s of the per-record work alone, on one thread."""
    with open(json_path) as f:
        records = json.load(f)[:n]
    layout = features.TextLayout(seq_len=2048 - 576, question_len=64, num_visual_tokens=576)
    start = time.perf_counter()
    for r in records:
        images.normalize(images.preprocess(os.path.join(root, r["image"]), 336, "pad"))
        turns = [("user" if t["from"] == "human" else "assistant", t["value"]) for t in r["conversations"]]
        features.encode_conversation(tok, turns, layout, has_image=True)
    return len(records) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=10, help="batches per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per setting")
    parser.add_argument("--settings", default="0x1,0x2,0x4,0x8,1x2,2x2,3x2",
                        help="comma-separated WORKERSxREAD_THREADS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        json_path = write_data(root, args.images)
        tok_path = build_tokenizer_json(os.path.join(root, "tokenizer.json"), corpus=[QUESTION, ANSWER, "Why?",
                                                                                     "system\nuser\nassistant\n"])
        tok = HFTokenizer(tok_path)
        print(f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}); {args.images} JPEGs 640x480 -> "
              f"336x336 pad, V=576, L=2048, {args.repeats} windows of {args.batches} batches of {args.batch}")
        print(f"reference (one thread, no pipeline): {reference_rate(root, json_path, tok, 100):7.1f} examples/s")
        for setting in args.settings.split(","):
            workers, threads = (int(v) for v in setting.split("x"))
            cfg = config(root, json_path, tok_path, workers, threads)
            it = pipeline.make_train_iterator(cfg, tokenizer=tok, num_visual_tokens=576, image_size=336,
                                              batch_size=args.batch, seed=0)
            next(it)  # warm-up: worker start-up and first fills are not throughput
            rates = []
            for _ in range(args.repeats):  # a shared machine is noisy: report the median and best window
                start = time.perf_counter()
                for _ in range(args.batches):
                    batch = next(it)
                rates.append(args.batches * args.batch / (time.perf_counter() - start))
            assert batch["pixels"].shape == (args.batch, 336, 336, 3) and it.bad_input.total == 0
            print(f"workers={workers} read_threads={threads}: median {np.median(rates):6.1f}, "
                  f"best {max(rates):6.1f} examples/s")
            it.close()


if __name__ == "__main__":
    main()
