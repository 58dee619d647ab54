"""Data entry points: the config, the tokenizer, and the grain train iterator for every source.

    data_cfg = pipeline.default_config()                  # embedded as config.data
    tok = pipeline.make_tokenizer(data_cfg)
    it = pipeline.make_train_iterator(data_cfg, tokenizer=tok, num_visual_tokens=16, image_size=64, batch_size=16)
    batch = next(it)   # pixels f32[B,S,S,3], tokens/targets i32[B,L], loss_mask f32[B,L], attention_mask i32[B,L],
                       # image_positions i32[B,V], question_tokens/question_mask i32[B,Lq]; L = seq_len + V
                       # (data.pack_examples=K: K examples per row, pixels f32[B,K,S,S,3], ...: packing.py)
    state = it.get_state(); it.set_state(state)           # JSON-able; exact resume
    it.bad_input.counts; it.bad_input.write(path)         # skipped records per reason

For evaluation: `make_eval_iterator` (one ordered pass, last batch filled, `valid` per row) and `make_prompt_batch`
(prompt-only batches for generation, e.g. from `synthetic.make_examples`).

Each process reads a disjoint shard of every epoch (grain's IndexSampler shards by process index/count, then
shuffles within the shard with a per-epoch seed); epochs repeat forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain.python as grain
import ml_collections
import numpy as np
from absl import flags

from vlm_jax.data import batching, errors, features, images, synthetic
from vlm_jax.data.tokenize import (
    IMAGE_PLACEHOLDER,
    HFTokenizer,
    Tokenizer,
    WordTokenizer,
)
from vlm_jax.data.transforms import EncodeExample, ExampleSource, Step
from vlm_jax.registry import Registry


def default_config() -> ml_collections.ConfigDict:
    """Every data key, with the synthetic benchmark as the default source."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # a name in SOURCES: 'synthetic' | 'llava' | 'tfds'
    c.seq_len = 32  # text tokens per example; examples are L = seq_len + V long (V image slots on top)
    c.question_len = 16  # Lq: question tokens for query-conditioned compressors (the END of a long question is kept)
    c.system_prompt = ""  # ChatML system turn; '' for none (LLaVA-Qwen runs use "You are a helpful assistant.")
    c.template = "chatml"  # 'chatml' (Qwen conversations) | 'plain' (LLaVA pretraining: image slots, caption)
    c.image_aspect_ratio = "pad"  # 'pad' (to square with the CLIP mean colour, as LLaVA) | 'crop' (centre square)
    c.pack_examples = 0  # training: >0 packs up to this many examples into each row of length L (packing.py)
    c.bad_input = "skip"  # 'skip' (count, log and go on) | 'error' (stop at the first bad record, naming it)
    c.max_consecutive_bad = 1000  # under 'skip', this many bad records in a row is an error (wrong paths, ...)
    c.shuffle_seed = 0  # used when make_train_iterator gets seed=None
    c.worker_count = 0  # grain worker processes; 0 = reader threads of the main process do all per-record work
    c.worker_buffer_size = 2  # records buffered per worker
    c.read_threads = 4  # reader threads (per process, or per worker) that decode, preprocess and tokenize

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # a HF tokenizer.json; '' = the built-in word tokenizer of the synthetic tasks
    c.tokenizer.pad_token = "<|endoftext|>"  # Qwen1.5 names
    c.tokenizer.eos_token = "<|im_end|>"
    c.tokenizer.im_start_token = "<|im_start|>"
    c.tokenizer.image_token = "<image>"  # image-slot id if in the vocabulary, else the pad id is used

    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.families = "reasoning,ocr"  # comma-separated, interleaved item by item ('detail': see synthetic/)
    c.synthetic.family_weights = ""  # training items of each family per cycle, e.g. '1,3' ('' = equal)
    c.synthetic.train_size = 200_000  # items per epoch (drawn on the fly, nothing stored)
    c.synthetic.validation_size = 2_000
    c.synthetic.seed = 0  # content seed; train and validation draw from disjoint streams of it
    c.synthetic.ocr_alphabet = synthetic.DEFAULT_ALPHABET
    c.synthetic.ocr_length = 1  # most characters per string (each has 1..ocr_length); 2+ is much slower to learn
    c.synthetic.ocr_scale = 2  # each font pixel drawn scale x scale; 1 = the raw 6x11 font (harder to learn)
    c.synthetic.reasoning_kinds = ""  # comma-separated question kinds of the reasoning family ('' = all)
    c.synthetic.reasoning_grid = 4  # reasoning objects sit in a grid x grid layout (2: 32-px objects, up to 4)
    c.synthetic.detail_kinds = ""  # question kinds of the detail family: inside (''), colors, corner (synthetic/)
    c.synthetic.describe = False  # reasoning/detail scenes in words, no image (pretraining a tiny LLM on "text")
    c.synthetic.max_items = 0  # at most this many objects / characters per image (0 = the family's own range)
    c.synthetic.reasoning_objects = 0  # at most this many objects in a reasoning scene (0 = max_items)
    c.synthetic.train_questions = 1  # questions per training image (one chat); evaluation asks one at a time

    c.llava = ml_collections.ConfigDict()
    c.llava.json_path = ""  # train split: JSON list or JSONL of {id, image, conversations: [{from, value}]}
    c.llava.validation_json_path = ""
    c.llava.image_dir = ""  # record["image"] is relative to this folder

    c.tfds = ml_collections.ConfigDict()
    c.tfds.name = ""  # a tfds dataset prepared as array_record, e.g. 'my_vqa:1.0.0'
    c.tfds.data_dir = ""  # '' = tfds default
    c.tfds.train_split = "train"
    c.tfds.validation_split = "validation"
    c.tfds.image_field = "image"  # encoded bytes (JPEG/PNG) or a uint8[H, W, 3] tensor
    c.tfds.question_field = "question"
    c.tfds.answer_field = "answer"  # a string, or a list of strings (the first is the target)
    c.tfds.id_field = ""  # '' = use the record index
    return c


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The HF tokenizer.json at data.tokenizer.path, or the synthetic word tokenizer when the path is ''."""
    t = data_cfg.tokenizer
    if not t.path:
        return WordTokenizer(synthetic.VOCAB_WORDS)
    return HFTokenizer(t.path, pad_token=t.pad_token, eos_token=t.eos_token, im_start_token=t.im_start_token,
                       image_token=t.image_token)


def make_layout(data_cfg: ml_collections.ConfigDict, num_visual_tokens: int) -> features.TextLayout:
    return features.TextLayout(seq_len=data_cfg.seq_len, question_len=data_cfg.question_len,
                               num_visual_tokens=num_visual_tokens, system_prompt=data_cfg.system_prompt,
                               template=data_cfg.get("template", "chatml"))


# data.source name -> fn(data_cfg, split, image_size) -> (random-access source, steps that turn items into records).
SOURCES = Registry("data source", "data.source")
register_source = SOURCES.register


def make_source(data_cfg: ml_collections.ConfigDict, split: str, image_size: int
                ) -> tuple[Any, list[Step]]:
    """The raw random-access source of `split` and the steps that turn its items into records (transforms.py)."""
    return SOURCES.lookup(data_cfg.source)(data_cfg, split, image_size)


@register_source("synthetic")
def _synthetic_source(data_cfg, split, image_size):
    s = data_cfg.synthetic
    size = {"train": s.train_size, "validation": s.validation_size}.get(split)
    if size is None:
        raise ValueError(f"synthetic split must be 'train' or 'validation', got {split!r}")
    options = synthetic.SyntheticOptions.from_config(s, image_size=image_size, split=split)
    return synthetic.SyntheticSource(split, size, options, families=s.families,
                                     family_weights=s.family_weights if split == "train" else ""), []


@register_source("llava")
def _llava_source(data_cfg, split, image_size):
    from vlm_jax.data import llava  # pylint: disable=import-outside-toplevel
    return llava.make_source(data_cfg, split, image_size)


@register_source("tfds")
def _tfds_source(data_cfg, split, image_size):
    from vlm_jax.data import tfds  # pylint: disable=import-outside-toplevel  (tensorflow_datasets is heavy)
    return tfds.make_source(data_cfg, split, image_size)


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, tokenizer: Tokenizer, num_visual_tokens: int,
                        image_size: int, batch_size: int, seed: int | None = None, process_index: int = 0,
                        process_count: int = 1, split: str = "train") -> batching.BatchIterator:
    """Endless, shuffled, per-process-sharded batches of batch_size // process_count examples (module docstring).

    seed: the shuffle seed (None: data_cfg.shuffle_seed). Records that fail (errors.py) follow data_cfg.bad_input.
    """
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    errors.check_policy(data_cfg.bad_input)
    base, steps = make_source(data_cfg, split, image_size)
    encode = EncodeExample(tokenizer, make_layout(data_cfg, num_visual_tokens), image_size)
    source = ExampleSource(base, [*steps, encode])  # all per-record work runs in grain's reader threads
    if len(source) < process_count:
        raise ValueError(f"{split!r} has {len(source)} records, fewer than {process_count} processes")
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(process_index, process_count, drop_remainder=True),
        shuffle=True, num_epochs=None, seed=data_cfg.shuffle_seed if seed is None else seed)
    return batching.BatchIterator(_loader(data_cfg, source, sampler), batch_size // process_count,
                                  policy=data_cfg.bad_input, max_consecutive_bad=data_cfg.max_consecutive_bad,
                                  pack_examples=data_cfg.get("pack_examples", 0))


def make_eval_iterator(data_cfg: ml_collections.ConfigDict, *, tokenizer: Tokenizer, num_visual_tokens: int,
                       image_size: int, batch_size: int, process_index: int = 0, process_count: int = 1,
                       split: str = "validation") -> batching.BatchIterator:
    """One ordered pass over `split` (this process's shard), in train-layout batches for eval loss.

    The last batch is filled up with copies of its last row whose loss_mask is 0; every eval batch carries
    `valid` float32[B] (1 for real rows) for per-example metrics. Shards are equal-sized (the remainder of
    len % process_count records is dropped), but records skipped as bad input can still leave processes with
    different batch counts: several processes pass their batches through `batching.agreed_batches`.
    """
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    errors.check_policy(data_cfg.bad_input)
    base, steps = make_source(data_cfg, split, image_size)
    encode = EncodeExample(tokenizer, make_layout(data_cfg, num_visual_tokens), image_size)
    source = ExampleSource(base, [*steps, encode])
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(process_index, process_count, drop_remainder=True),
        shuffle=False, num_epochs=1, seed=0)
    return batching.BatchIterator(_loader(data_cfg, source, sampler), batch_size // process_count,
                                  policy=data_cfg.bad_input, max_consecutive_bad=data_cfg.max_consecutive_bad,
                                  pad_final=True)


def _loader(data_cfg: ml_collections.ConfigDict, source, sampler) -> grain.DataLoader:
    if data_cfg.worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside absl.app.run (tests, notebooks) nobody parsed them.
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=source, sampler=sampler, operations=[], worker_count=data_cfg.worker_count,
        worker_buffer_size=data_cfg.worker_buffer_size,
        read_options=grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=64))


def make_prompt_batch(images_u8: Sequence[np.ndarray | None], user_texts: Sequence[str], *, tokenizer: Tokenizer,
                      data_cfg: ml_collections.ConfigDict, num_visual_tokens: int, image_size: int
                      ) -> dict[str, np.ndarray]:
    """Prompt-only batch for generation (no answers), e.g. from synthetic.make_examples:

        exs = synthetic.make_examples('validation', 'ocr', 32, synthetic.SyntheticOptions(image_size=64))
        batch = make_prompt_batch([e.image for e in exs], [synthetic.prompt_text(e.question) for e in exs], ...)

    images_u8: uint8[S, S, 3] per example (None for text-only); user_texts hold the <image> placeholder.
    Returns pixels f32[B, S, S, 3]; tokens, attention_mask i32[B, L] (right-padded); prompt_length i32[B] (the first
    answer token goes there); image_positions i32[B, V]; question_tokens, question_mask i32[B, Lq].
    """
    if len(images_u8) != len(user_texts) or not user_texts:
        raise ValueError(f"need as many images as prompts (>= 1), got {len(images_u8)} and {len(user_texts)}")
    layout = make_layout(data_cfg, num_visual_tokens)
    rows: list[dict[str, Any]] = []
    for img, text in zip(images_u8, user_texts):
        row = features.encode_prompt(tokenizer, text, layout)
        if (img is None) != (IMAGE_PLACEHOLDER not in text):
            raise ValueError(f"prompt {text[:60]!r} and its image disagree: an image needs exactly one <image>")
        row["pixels"] = images.blank(image_size) if img is None else images.preprocess(
            img, image_size, data_cfg.image_aspect_ratio)
        rows.append(row)
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["pixels"] = images.normalize(batch["pixels"])
    return batch
