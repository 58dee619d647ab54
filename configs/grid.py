"""The (LLM size N x visual tokens V) grid: train and evaluate every cell, fit the scaling law, draw the surface.

    python -m launch.grid --config=configs/grid.py                 # smoke: tiny models on the synthetic benchmark
    python -m launch.grid --config=configs/grid.py:paper --dry_run --config.dir=gs://BUCKET/grid-paper \
        --config.tpu.project=... --config.tpu.zone=... --config.tpu.repo_url=...   (README: the paper grid)

Variants:
- `smoke` (default): 3 tiny Qwen-style LLMs (27K, 99K, 308K parameters) x V in {1, 4, 16, 64} on the built-in
  synthetic benchmark, two task families: `reasoning` (one object filling the image; is there a <colour> shape,
  and the value of its colour plus / times a one- or two-digit number: perception is easy at any V, the knowledge
  and arithmetic are the LLM's work) and `detail` (the colour inside the top-left marker, printed 8, 16 or 32 px wide among small markers: the
  stand-in for OCR, whose error is set by the print size the visual tokens resolve). As the paper does with CLIP,
  one tiny vision tower is pretrained once on its own objective and then frozen in every cell; as the paper's LLMs
  come pretrained on text, each tiny LLM is pretrained once on both families' scenes told in words. Both are cached
  in the grid directory under a hash of their config. Each cell: stage 1 trains the projector (avgpool has no
  parameters) against the frozen pretrained LLM, stage 2 starts from it and trains the LLM too.
- `detail`: the smoke grid on the detail family alone, 600 steps per cell (where its V trade-off shows).
- `paper`: Qwen1.5 0.5B/1.8B/4B/7B x V in {1, 4, 16, 36, 64, 144, 576}, CLIP ViT-L/14-336 (pretrained, frozen),
  QueCC; stage 1 on LLaVA-558K (lr 1e-3, batch 256), stage 2 on LLaVA-665K (lr 2e-5, batch 128); the paper's
  benchmarks in its reasoning/understanding and OCR groups. Set the weight, data and bucket paths.

Argument keys: variant name, then `llms=a+b`, `tokens=1+16` to shrink the axes (`smoke,llms=tiny-s+tiny-m,tokens=1+16`).
"""

import ml_collections

from configs import common, llava, models
from vlm_jax.data import pipeline
from vlm_jax.grid import tpu

# The paper's evaluation groups (Li et al. 2024, Fig. 1/3): visual reasoning / understanding, and text-heavy OCR.
PAPER_TASKS = {
    "reasoning": "gqa,mmb,mme,pope,sqa,seed",
    "ocr": "textvqa,ocrbench,docvqa,chartqa",
}
# name -> (scorer, question file, answer file, image folder); paths relative to config.eval.data_root.
PAPER_BENCHMARKS = {
    "gqa": ("gqa", "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/testdev_balanced_answers.jsonl", "gqa/images"),
    "mmb": ("mmbench", "mmbench/mmbench_dev.jsonl", "", "mmbench/images"),
    "mme": ("mme", "mme/llava_mme.jsonl", "mme/answers.jsonl", "mme/images"),
    "pope": ("pope", "pope/llava_pope_test.jsonl", "pope/answers.jsonl", "pope/val2014"),
    "sqa": ("scienceqa_img", "scienceqa/llava_test_CQM-A.jsonl", "", "scienceqa/images"),
    "seed": ("seed_bench", "seed_bench/llava-seed-bench-img.jsonl", "", "seed_bench/images"),
    "textvqa": ("textvqa", "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/answers.jsonl", "textvqa/train_images"),
    "ocrbench": ("ocrbench", "ocrbench/ocrbench.jsonl", "", "ocrbench/images"),
    "docvqa": ("anls", "docvqa/val.jsonl", "", "docvqa/images"),
    "chartqa": ("relaxed_accuracy", "chartqa/test.jsonl", "", "chartqa/images"),
}


def _axis(text: str, kind=str) -> tuple:
    return tuple(kind(x) for x in text.split("+") if x)


# How the smoke default came to be (tiny-s/tiny-m, batch 32 unless said; accuracy on 200-300 validation questions):
# - tower trained end to end per cell (the old smoke recipe): OCR read as well from V=1 as from V=16 (0.40/0.38);
# - OCR as digits named by grid position ("row 2 column 3") or by ink colour: at chance after 400 steps, whatever the
#   tower; the quadrant OCR family: 0.42 read after 400 steps with all 64 tokens (kept as `ocr`, for longer runs);
# - tower pretrained with all 64 tokens on the cells' own questions: it binds a marker's two colours into one feature,
#   and one pooled token then answers 0.77 of the detail questions, so pooling cannot cost anything. Pretrained as a
#   classifier of single objects (colour 1.00, inside 1.00, shape 0.38 after 300 steps), it keeps colours apart;
# - detail alone, tiny-m, V=64, batch 16, 600 steps: 0.996 (the lookup is learnt abruptly after ~300 steps); at V=16
#   in the same budget 0.44; V=1 0.40 (batch 32, 300 steps). Mixed with reasoning in 500 steps (this default), the
#   lookup is learnt only partly: the V trade-off is within noise (README).
# - reasoning with 16-px objects (4x4 layout): at the majority answer after 600 steps; 32-px objects (2x2): counted.
# Tried since (accuracy detail/reasoning; all mixed-family, tiny-m unless said):
# - stage-2 lr 3e-3: worse, V=1 0.42/0.49, V=64 0.34/0.49;
# - tower pretrained on single detail markers only: V=1 0.53/0.56, V=64 0.57/0.78 (reasoning now falls with V);
#   with it, reasoning:detail items 1:2 (data.synthetic.family_weights) and 600 steps, the whole grid: the lookup
#   over 64 tokens is still not learnt (tiny-s V=1 0.61, V=64 0.35; tiny-m V=1 0.63, V=4 0.64);
# - the same tower trained only on detail, then detail alone in the cell: loss at step 300 0.54 against 0.19 with
#   the detail-only tower: what the tower learnt decides how fast the LLM learns the lookup;
# - one fixed question ("inside the red one", red always present), tiny-s, 500 steps: 0.98 at V=1, 0.995 at V=64 —
#   a pretrained tower's marker features survive pooling; one token loses only what the question must select.
# Session of 2026-12-03 (2 x 2 probes: tiny-xs/tiny-m x V 1/64, mixed families, 500 stage-2 steps; error detail):
# - "does any marker have the next colour inside?" (yes/no; a 'no' scene swaps two centres, so the bags of colours
#   are those of a 'yes' scene): not learnt at V=64 (0.44; V=1 0.43) in 500 steps, with either tower;
# - centres from the outer palette, LLMs from scratch, tower pretrained on single markers with 1 or 64 tokens:
#   V=64 no better than V=1 (0.66 / 0.71 tiny-xs; 0.58 / 0.54 tiny-m);
# - the LLM pretrained on the scenes in words (tiny-m learns the lookup in ~300 steps of text, 0.1 s a step): tiny-m
#   V=1 0.25, V=64 0.18 with centres from the outer palette: one pooled token still answered (the tower binds the
#   two colours of a marker into one feature, which survives the mean); centres from their own palette: V=1 0.66
#   (no leak), V=64 0.57 with stage 1 on both families (the frozen LLM cannot align on reasoning it never saw),
#   0.32 with stage 1 on detail alone for 150 steps (lr 3e-3): this default;
# - the tower pretrained with 64 tokens instead of 1: V=1 leaks again (0.41);
# - tiny-xs learns the text lookup only after ~750 steps at lr 3e-3 (and not reliably: 1,200 steps did not);
#   1,000 steps at lr 3e-3 with log-uniform row lengths broke all three LLMs' text lookup (0.48-0.51).
# - learning rates scaled as 1 / width for the LLM pretraining (3e-3 tiny-xs, 1.5e-3 tiny-s, 1e-3 tiny-m), 800 steps:
#   text lookup 0.48 / 1.00 / 1.00, but the grid took 12.6 minutes and detail error no longer fell with V (tiny-m
#   0.47, 0.42, 0.65, 0.23; tiny-s 0.52, 0.37, 0.49, 0.36; tiny-xs flat at 0.62): the better readers answer half the
#   V=1 questions from the bag of centre colours in one pooled token. Probes of tiny-xs alone (800 steps, text
#   accuracy): lr 1e-2 0.27, 5e-3 0.35, 3e-3 0.45-0.50 (1,500 steps 0.56), 3 layers 0.50, no GQA 0.51, batch 16 0.25.
# - Later probes of tiny-xs's text pretraining (accuracy on 500 described scenes; this default gives 0.26, tiny-s
#   0.67, tiny-m 1.00): 1,200 steps 0.51; 4 heads of 8 (2 KV heads) 0.36, with lr 2e-3 and Adam b2 0.95 0.46 (1,200
#   steps 0.51; lr 5e-3, 800 steps, 0.52); a marker told as two words ("red white") 0.40 / 0.50. Its answers pick an
#   inner colour present in the row (0.71 right when two kinds of centre are present, 0.30 with four): the bag of
#   centres, which one pooled token keeps as well, so tiny-xs is flat in V. Scenes holding all four centres (the
#   bag useless): 0.23-0.24, chance. The binding lookup needs width: 32 does not learn it here, 64 partly, 96 does.
#   tiny-s at 800 steps reads every described scene (1.00; its loss falls between steps 300 and 400), and the 741K
#   `tiny` preset 0.94 at 400 steps, at 19,500 tokens/s alone against tiny-m's 25,500: an N axis of readers only
#   (a 64-wide ~58K model up to `tiny`, 13x) would cost about 11 minutes, over the smoke budget.
#   Measured: `smoke,llms=tiny-s-lean+tiny-m+tiny` (58K, 308K, 744K: 12.8x) with 800 pretraining steps (text lookup
#   0.81, 1.00, 1.00) took 11.5 minutes (pretraining 4.1 of them) and did not show the trade-off: detail error
#   tiny-s-lean flat at 0.56 (the bag again, though it read 0.81 of the described scenes), tiny-m 0.51, 0.44, 0.53,
#   0.22 and tiny 0.59, 0.56, 0.55, 0.21 at V = 1, 4, 16, 64; reasoning fell as much with V at the top (tiny 0.47 ->
#   0.23, tiny-m 0.30 -> 0.24 through 0.46 at V = 16), so neither family's V exponent was resolved (detail beta 0.07
#   [-0.14, 18], reasoning -0.13 [-17, 2.9]). The jump from V = 16 to 64 in both families says the 800-step readers
#   read one marker per token, not pooled ones, whatever the question.
# Later session of 2026-12-03: both families redesigned so that each depends on one axis only (this default).
# - detail `corner` (the centre of the top-left marker; no lookup by content, so every LLM can learn the read):
#   with 8-px corner markers only, V = 1 and 4 stayed at chance (0.73) and V = 64 read all (0.00-0.01) for tiny-s/m:
#   a step, because a pooled token that dilutes one marker among 16 cells is not read at all. Printing the corner
#   marker 8, 16 or 32 px wide (small, medium, large print) grades it: error ~0.5 at V = 1-4, 0.25-0.34 at 16, 0.01
#   at 64, for all three LLMs. tiny-xs needed stage 1 of 400 steps (150: at chance; 400: 0.93 read alone).
# - reasoning with 2-4 objects (count, has_color, count_color): counting is easier from 64 tokens than from one
#   (count_all 0.45-0.52 at V = 1, 0.76-0.85 at V = 64), has_color stayed at chance in 500 steps, and which LLM
#   learnt has_color / has_shape was a lottery per cell (tiny-s 0.22 error, tiny-m 0.45 in one run; has_shape at
#   chance even in words: the tower barely encodes shape). One object per scene and questions whose perception is
#   the colour alone make reasoning flat in V; told in words to the LLM pretraining (800 steps), color_of +
#   has_color were learnt by every LLM (error 0.000 in all 12 cells: no N effect); the value of the colour plus /
#   times a number (knowledge + arithmetic, modulo 10) is learnt in words 0.28 / 0.54 / 0.94 by tiny-xs / s / m;
#   the cells keep that order (reasoning error 0.55-0.69 / 0.07-0.31 / 0.000), but with 32-px objects tiny-s's row
#   still fell with V (0.31 -> 0.07) and the law's reasoning V exponent spanned [-0.83, 1.55] (detail [0.17, 1.50]).
# - one object filling the image (reasoning_grid=1: every token, at any V, is all of its colour): every reasoning
#   row flat in V (tiny-xs 0.55-0.58, tiny-s and tiny-m 0.000). With two-digit numbers (plus 0-89, times 0-19, no
#   modulo: this default) tiny-xs 0.62-0.67, tiny-s 0.020-0.024, tiny-m 0.000: reasoning V exponent 0.02
#   [-0.38, 0.36], N exponent 3.6 [2.6, 4.8]; detail V exponent 0.16 [0.07, 1.15] (overlapping), with tiny-m's
#   0/500 errors entered at 1e-4. Entered at half a question (0.001 for 500: what the evaluation can resolve; the
#   cells themselves unchanged), reasoning's V exponent is -0.0001 [-0.04, 0.02] and its N exponent 2.6 [2.6, 2.7]:
#   apart from detail's V exponent (README). Left: one V = 64 detail cell per run does not learn the read (tiny-xs
#   0.40 here, tiny-s 0.23 in the run before: which cell is a lottery), and the law fits detail loosely (R² 0.59).


def smoke(arg) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dir = "runs/grid-smoke"
    config.llms = _axis(arg.llms) or ("tiny-xs", "tiny-s", "tiny-m")   # 27K, 99K, 308K LLM parameters
    config.tokens = _axis(arg.tokens, int) or (1, 4, 16, 64)
    config.seeds = (0,)
    config.weights_dir = ""   # tiny LLMs start from scratch; the tower is pretrained by the grid (config.tower)

    cell = ml_collections.ConfigDict()
    cell.seed = 0
    cell.run_dir = ""
    cell.init = ()
    cell.model = models.model_config("tiny", config.llms[0], "avgpool", config.tokens[0])
    cell.data = pipeline.default_config()
    cell.data.read_threads = 2
    # Two families that pull N and V apart (vlm_jax/data/synthetic.py): `reasoning` asks about one object's colour,
    # which any number of visual tokens carries, and needs knowledge and arithmetic from the LLM; `detail` asks the
    # colour inside the top-left marker, printed small, medium or large: a token wider than the print pools it with
    # background and neighbours. The stand-ins for the paper's reasoning and OCR groups.
    cell.data.synthetic.families = "reasoning,detail"
    cell.data.synthetic.detail_kinds = "corner"
    cell.data.synthetic.reasoning_kinds = "has_color,value_plus,value_times"
    cell.data.synthetic.reasoning_grid = 1   # one object filling the image: every visual token, at any V, is all of
    cell.data.synthetic.reasoning_objects = 1   # its colour
    cell.data.synthetic.train_questions = 3   # three answers per training image: more signal per step
    cell.data.seq_len = 64
    # Batch 16: twice the updates of batch 32 for the same compute; marker lookup is learnt in updates, not examples.
    cell.train = common.train_config(batch_size=16, log_every=100, checkpoint_every=1000, keep_checkpoints=1)
    cell.mesh = common.mesh_config()
    config.cell = cell

    # Stage 1: compressor + projector against the frozen LLM; stage 2: the LLM as well (tower frozen in both).
    config.stages = ml_collections.ConfigDict(dict(
        stage1=dict(train=dict(stage="projector", lr=3e-3, steps=400)),
        stage2=dict(train=dict(stage="full", lr=1e-3, steps=500)),
    ))

    # The tower: pretrained once, then frozen in every cell (as CLIP is in the paper), on its own objective: one
    # object or marker per image, answered from one pooled token (colour, shape, the colour inside): a classifier
    # of local content. (Pretrained with all 64 tokens on the cells' own questions, the tower learnt features that
    # bind a marker's two colours into one direction, so a single pooled token still answered 77% of the detail
    # questions: pooling could not show what it costs.)
    config.tower = ml_collections.ConfigDict(dict(
        pretrain=True, llm="tiny-s", tokens=1,
        overrides=dict(data=dict(seq_len=48, synthetic=dict(max_items=1, train_questions=2, detail_kinds="colors",
                                                            reasoning_grid=2, reasoning_objects=0,
                                                            reasoning_kinds="color_of,shape_of,count_all")),
                       train=dict(stage="full", train_vision=True, lr=1e-3, steps=200, batch_size=32)),
    ))
    # The LLMs: pretrained once each, as language models are on text before they see an image, on both families'
    # scenes told in words (detail: 64 words, one per cell, "redwhite" = red around white; reasoning: "red circle";
    # synthetic.py). There they learn the questions (and the colours' values) from text; stage 1 then aligns the
    # projector to them, and stage 2 trains on both families.
    config.llm_pretrain = ml_collections.ConfigDict(dict(
        pretrain=True, tokens=1,
        overrides=dict(data=dict(seq_len=96, question_len=80,
                                 synthetic=dict(families="reasoning,detail", family_weights="", describe=True,
                                                detail_kinds="corner")),
                       train=dict(stage="full", lr=1e-3, steps=800, batch_size=32)),
    ))
    config.eval = eval_config(synthetic_per_family=500, batch_size=100, max_new_tokens=3,
                              tasks=dict(reasoning="synthetic/reasoning", detail="synthetic/detail"))
    config.backend = "local"
    config.tpu = tpu.default_config()   # for --config.backend=tpu (see README: Cloud TPU)
    config.parallel = 2
    config.fit = fit_config(bootstrap=300)
    return config


def detail(arg) -> ml_collections.ConfigDict:
    """The smoke grid on the `detail` family alone, 600 steps per cell: where the fine-detail trade-off shows
    (measured for tiny-m before the centres had a palette of their own and before the LLMs were pretrained: error
    0.275, 0.200, 0.145, 0.015 at V = 1, 4, 16, 64; its four cells took 9.5 minutes)."""
    config = smoke(arg)
    config.dir = "runs/grid-detail"
    config.cell.data.synthetic.families = "detail"
    config.cell.data.synthetic.family_weights = ""
    config.stages.stage2.train.steps = 600
    config.tower.overrides.train.steps = 300   # as measured (the smoke default's tower trains 200)
    config.eval.tasks = {"detail": "synthetic/detail"}
    return config


def paper(arg) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dir = "gs://YOUR_BUCKET/vlm-jax/grid-paper"
    config.llms = _axis(arg.llms) or ("qwen1.5-0.5b", "qwen1.5-1.8b", "qwen1.5-4b", "qwen1.5-7b")
    config.tokens = _axis(arg.tokens, int) or (1, 4, 16, 36, 64, 144, 576)
    config.seeds = (0,)
    stage1, stage2 = llava.get_config("stage=1,compressor=quecc"), llava.get_config("stage=2,compressor=quecc")
    cell = ml_collections.ConfigDict(stage1.to_dict())
    cell.run_dir = ""
    cell.init = ()
    # Pretrained weights: WEIGHTS/clip-vit-l14-336 and WEIGHTS/<each LLM preset>, each converted once from its
    # Hugging Face directory by launch.convert (or, on a local disk, the Hugging Face directory itself).
    config.weights_dir = "gs://YOUR_BUCKET/vlm-jax/weights"
    config.cell = cell
    # Data on every worker's disk (or a bucket mounted there): DATA/llava/... as LLaVA-1.5 ships it, DATA/eval/...
    data = "/data"
    llava_data = lambda json_name: dict(llava=dict(json_path=f"{data}/llava/{json_name}",  # noqa: E731
                                                   image_dir=f"{data}/llava/images"))
    cell.data.tokenizer.path = f"{data}/tokenizers/qwen1.5/tokenizer.json"
    config.stages = ml_collections.ConfigDict(dict(
        stage1=dict(train=dict(stage2.train.to_dict() | stage1.train.to_dict()),
                    data=llava_data("blip_laion_cc_sbu_558k.json")),
        stage2=dict(train=stage2.train.to_dict(), data=llava_data("llava_v1_5_mix665k.json")),
    ))
    config.tower = ml_collections.ConfigDict(dict(pretrain=False, llm="", tokens=0, overrides={}))
    config.llm_pretrain = ml_collections.ConfigDict(dict(pretrain=False, tokens=0, overrides={}))   # Qwen1.5 is
    config.eval = eval_config(synthetic_per_family=0, batch_size=16, max_new_tokens=128, seq_len=2048,
                              text_tokens=64, tasks=PAPER_TASKS, data_root=f"{data}/eval",
                              benchmarks={k: v for k, v in PAPER_BENCHMARKS.items()})
    config.backend = "tpu"
    config.tpu = tpu.default_config()   # set project, zone, repo_url (and accelerator_types per LLM size)
    # Sized by launch.plan (HBM per v5e chip, 16 GiB; stage 1 at batch 256 is the larger): 0.5B/1.8B fit 16 chips up
    # to V=144 (1.8B: 14.9 GiB) but not at V=576 (16.6 / 23.4 GiB); 4B fits 32 at V=576 (14.5); 7B needs 64 from
    # V=144 on (16.6 GiB on 32 chips at V=144, 21.9 at V=576).
    config.tpu.accelerator_types = ("qwen1.5-7b_*=v5litepod-64,qwen1.5-4b_*=v5litepod-32,"
                                    "qwen1.5-*_v576=v5litepod-32")
    config.parallel = 4
    config.fit = fit_config(bootstrap=1000)
    return config


def eval_config(*, synthetic_per_family: int, tasks: dict, benchmarks: dict | None = None, batch_size: int = 50,
                max_new_tokens: int = 4, seq_len: int = 0, text_tokens: int = 16,
                data_root: str = "") -> ml_collections.ConfigDict:
    """How each cell is evaluated: tasks (name -> comma-separated benchmarks, averaged into the task's error),
    synthetic validation questions per family, LLaVA-format benchmarks (paths relative to `data_root`), and Q for
    the inference-FLOPs column."""
    return ml_collections.ConfigDict(dict(
        synthetic_per_family=synthetic_per_family, tasks=tasks, benchmarks=benchmarks or {}, data_root=data_root,
        batch_size=batch_size, max_new_tokens=max_new_tokens, seq_len=seq_len, text_tokens=text_tokens))


def fit_config(bootstrap: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(forms=("multiplicative", "additive"), bootstrap=bootstrap, seed=0,
                                          text_tokens=(0.0, 16.0, 64.0), level=0.95))


VARIANTS = {"smoke": smoke, "detail": detail, "paper": paper}


def get_config(arg=None):
    variant, _, rest = (arg or "smoke").partition(",")
    if "=" in variant:   # only key=value pairs: the default variant
        variant, rest = "smoke", arg
    if variant not in VARIANTS:
        raise ValueError(f"unknown grid variant {variant!r}; known: {sorted(VARIANTS)}")
    parsed = common.parse_arg(rest, llms="", tokens="")
    config = VARIANTS[variant](parsed)
    config.variant = variant
    config.lock()
    return config
