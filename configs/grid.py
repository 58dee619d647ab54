"""The (LLM size N x visual tokens V) grid: train and evaluate every cell, fit the scaling law, draw the surface.

    python -m launch.grid --config=configs/grid.py                 # smoke: tiny models on the synthetic benchmark
    python -m launch.grid --config=configs/grid.py:paper --dry_run --config.dir=gs://BUCKET/grid-paper \
        --config.tpu.project=... --config.tpu.zone=... --config.tpu.repo_url=...   (README: the paper grid)

Variants:
- `smoke` (default): 3 tiny Qwen-style LLMs (27K, 99K, 308K parameters) x V in {1, 4, 16, 64} on the built-in
  synthetic benchmark, two task families: `reasoning` (one object filling the image; is there a <colour> shape,
  and the value of its colour plus / times a number up to 99: perception is easy at any V, the knowledge
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

Elastic V: `--config.elastic.mode=mqt` (or `m3`) trains one model per (LLM, seed) for every V of the axis and
evaluates it at each V (same table rows), then sweeps the adaptive-V router over its answers (README: Elastic V).

Argument keys: variant name, then `llms=a+b`, `tokens=1+16` to shrink the axes (`smoke,llms=tiny-s+tiny-m,tokens=1+16`).

Each setting has its reason beside it; what was tried on the way to the smoke default, with every measurement, is
in configs/grid_notes.md.
"""

import ml_collections

from configs import common, llava, models
from vlm_jax.data import pipeline
from vlm_jax.grid import backends, slurm, tpu

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


def smoke(arg) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dir = "runs/grid-smoke"
    config.llms = _axis(arg.llms) or ("tiny-xs", "tiny-s", "tiny-m")   # 27K, 99K, 308K LLM parameters
    config.tokens = _axis(arg.tokens, int) or (1, 4, 16, 64)   # one pooled token up to every patch of the 8x8 grid
    # Two seeds per cell (init and data order): the spread between them is training noise, which the intervals
    # include; --config.seeds="(2,3)" re-runs the study on other seeds. (With 9 cells, V in {1, 16, 64}, no
    # exponent was identified: configs/grid_notes.md.)
    config.seeds = (0, 1)
    config.weights_dir = ""   # tiny LLMs start from scratch; the tower is pretrained by the grid (config.tower)
    config.elastic = elastic_config()

    cell = ml_collections.ConfigDict()
    cell.seed = 0
    cell.run_dir = ""
    cell.init = ()
    cell.model = models.model_config("tiny", config.llms[0], "avgpool", config.tokens[0])
    cell.data = pipeline.default_config()
    # Records are made in the training process's own thread: a tiny-s cell's 550 batches of 16 cost 2.5 s of CPU
    # (0.18 ms a record), against 5 s with two reader threads, whose hand-offs cost more than the records (the
    # steps run on XLA's threads meanwhile; same batches, same order).
    cell.data.read_threads = 0
    # Two families, each depending on one axis (vlm_jax/data/synthetic.py): stand-ins for the paper's reasoning and OCR.
    cell.data.synthetic.families = "reasoning,detail"
    # The colour inside the top-left marker, printed 8, 16 or 32 px wide: no lookup by content, so every LLM learns
    # the read, and a token wider than the print pools it with background and neighbours (error falls with V).
    cell.data.synthetic.detail_kinds = "corner"
    # Perception is the colour alone (flat in V); its value plus / times a number is the LLM's knowledge + arithmetic.
    # value_times_big (times 20-99) keeps the largest LLM off the evaluation floor: without it tiny-m erred 0-8 of
    # 500 and no power law in N fitted the family (configs/grid_notes.md).
    cell.data.synthetic.reasoning_kinds = "has_color,value_plus,value_times,value_times_big"
    cell.data.synthetic.reasoning_grid = 1   # one object filling the image: every token, at any V, is all its colour
    cell.data.synthetic.reasoning_objects = 1   # (with 2-4 objects, counting was easier from 64 tokens than from 1)
    cell.data.synthetic.train_questions = 3   # three answers per training image: more signal per step
    cell.data.seq_len = 64
    # Batch 16: twice the updates of batch 32 for the same compute; marker lookup is learnt in updates, not examples.
    cell.train = common.train_config(batch_size=16, log_every=100, checkpoint_every=1000, keep_checkpoints=1)
    cell.mesh = common.mesh_config()
    config.cell = cell

    # Stage 1: compressor + projector against the frozen LLM; stage 2: the LLM as well (tower frozen in both).
    config.stages = ml_collections.ConfigDict(dict(
        # Every LLM's stage-1 loss is flat from step 200 on (measured with 300); tiny-xs read nothing after 150.
        stage1=dict(train=dict(stage="projector", lr=3e-3, steps=200)),
        # 350 (500 before seeds): two seeds in the time budget; lr 3e-3 did worse.
        stage2=dict(train=dict(stage="full", lr=1e-3, steps=350)),
    ))

    # The tower: pretrained once, then frozen in every cell (as CLIP is in the paper), as a classifier of local
    # content: one object or marker per image, answered from one pooled token (with all 64 tokens on the cells' own
    # questions it bound a marker's two colours together, and one pooled token answered 0.77 of detail).
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
                                 # 2 reasoning : 3 detail: with value_times_big at equal weights tiny-xs never
                                 # learnt the detail words (0.24 read, against 1.0 here and before the kind)
                                 synthetic=dict(families="reasoning,detail", family_weights="2,3", describe=True,
                                                detail_kinds="corner")),
                       # 800 steps: tiny-s and tiny-m read every described scene (tiny-xs, 32 wide, only partly).
                       # text_only: the scenes are words, so the step skips the tower (0.90x its FLOPs and time)
                       train=dict(stage="full", lr=1e-3, steps=800, batch_size=32, text_only=True)),
    ))
    # 500 questions per family: an error resolved to 0.001 (a zero count is entered as half a question).
    config.eval = eval_config(synthetic_per_family=500, batch_size=100, max_new_tokens=3,
                              tasks=dict(reasoning="synthetic/reasoning", detail="synthetic/detail"))
    config.backend = "local"
    config.local = backends.local_config()   # devices per cell on a GPU node (README: GPUs)
    config.tpu = tpu.default_config()   # for --config.backend=tpu (see README: Cloud TPU)
    config.slurm = slurm.default_config()   # for --config.backend=slurm (see README: Slurm)
    config.parallel = 2
    config.fit = fit_config(bootstrap=300)
    return config


def detail(arg) -> ml_collections.ConfigDict:
    """The smoke grid on the `detail` family alone, 600 steps per cell: where the fine-detail trade-off shows
    (its measurement: configs/grid_notes.md)."""
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
    config.elastic = elastic_config()
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
    # No pretraining jobs: CLIP and Qwen1.5 come pretrained (weights_dir), the LLMs on text.
    config.tower = ml_collections.ConfigDict(dict(pretrain=False, llm="", tokens=0, overrides={}))
    config.llm_pretrain = ml_collections.ConfigDict(dict(pretrain=False, tokens=0, overrides={}))
    config.eval = eval_config(synthetic_per_family=0, batch_size=16, max_new_tokens=128, seq_len=2048,
                              text_tokens=64, tasks=PAPER_TASKS, data_root=f"{data}/eval",
                              benchmarks={k: v for k, v in PAPER_BENCHMARKS.items()})
    config.backend = "tpu"
    config.local = backends.local_config()   # --config.backend=local on a GPU node: devices_per_cell (README: GPUs)
    config.tpu = tpu.default_config()   # set project, zone, repo_url (and accelerator_types per LLM size)
    # Sized by launch.plan for 16 GiB v5e chips: 16 chips up to 1.8B below V=576; 4B and V=576 need 32, 7B 64.
    config.tpu.accelerator_types = ("qwen1.5-7b_*=v5litepod-64,qwen1.5-4b_*=v5litepod-32,"
                                    "qwen1.5-*_v576=v5litepod-32")
    config.slurm = slurm.default_config()   # for --config.backend=slurm: set gres, ntasks_per_node, time, ...
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


def elastic_config() -> ml_collections.ConfigDict:
    """--config.elastic.mode=mqt (or m3): one model per (LLM, seed) trained for every V of config.tokens at once
    (vlm_jax/elastic.py), evaluated at each V into the same table rows, with the adaptive-V router's sweep
    (vlm_jax/evaluation/router.py). '' (default): one model per (LLM, V, seed), as the paper trains."""
    return ml_collections.ConfigDict(dict(mode=""))


def fit_config(bootstrap: int) -> ml_collections.ConfigDict:
    """The first form is the report's decision: the saturating law, since a family's error cannot rise above what
    a model that learnt nothing of it makes (vlm_jax/scaling/laws.py); the paper's multiplicative and the additive
    law follow for comparison."""
    return ml_collections.ConfigDict(dict(forms=("saturating", "multiplicative", "additive"), bootstrap=bootstrap,
                                          seed=0,
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
