"""The paper's recipe at full size: CLIP ViT-L/14-336 (frozen, layer -2) + a Qwen1.5 LLM on LLaVA data.

Stage 1 (compressor + projector, LLaVA-558K captions, lr 1e-3, batch 256):
    python -m launch.train --config=configs/llava.py:llm=qwen1.5-7b,compressor=quecc,tokens=1,stage=1 \
        --config.data.llava.json_path=/data/llava/blip_laion_cc_sbu_558k.json \
        --config.data.llava.image_dir=/data/llava/images --config.data.tokenizer.path=/ckpt/qwen1.5-7b/tokenizer.json
Stage 2 (compressor + projector + LLM, LLaVA-665K instruction mix, lr 2e-5, batch 128): `stage=2` and the 665K JSON.

Argument keys: llm (qwen1.5-0.5b | 1.8b | 4b | 7b | 14b), compressor (head name), tokens (V), stage (1 | 2),
examples (training examples in the epoch; steps = examples // batch; 558K and 665K are the paper's one epoch).
Everything else: warmup 3%, cosine, no weight decay, text length 2048, bf16 activations with f32 master weights,
layers scanned and rematerialised, the LLM sharded FSDP x tensor over all devices; stage 1 in LLaVA's `plain`
format on centre-cropped images, stage 2 in ChatML on padded ones; compressor and projector initialised as the
authors' PyTorch modules. Pretrained weights come in through config.init, e.g.
    --config.init="('/hf/clip-vit-large-patch14-336=vision/.*', '/hf/Qwen1.5-7B=llm/.*')"
"""

import ml_collections

from configs import common, models
from vlm_jax.data import pipeline

# Per stage: what trains, the optimizer, one epoch of its data, and how the data is shown (LLaVA's recipe: stage 1
# captions in the `plain` format on resized, centre-cropped images; stage 2 ChatML conversations on images padded
# to square with the CLIP mean colour).
STAGES = {
    1: dict(stage="projector", lr=1e-3, batch_size=256, examples=558_128, template="plain",
            image_aspect_ratio="crop"),
    2: dict(stage="full", lr=2e-5, batch_size=128, examples=665_298, template="chatml", image_aspect_ratio="pad"),
}


def get_config(arg=None):
    arg = common.parse_arg(arg, llm="qwen1.5-7b", compressor="avgpool", tokens=576, stage=1, examples=0)
    if arg.stage not in STAGES:
        raise ValueError(f"stage must be 1 or 2, got {arg.stage}")
    recipe = STAGES[arg.stage]
    examples = arg.examples or recipe["examples"]
    config = ml_collections.ConfigDict()
    config.seed = 0
    # (directory, regex of parameter names) sources, or 'DIR=REGEX' strings: a Hugging Face directory (CLIP, Qwen1.5),
    # a converted checkpoint (launch.convert) or a run, e.g. ('/hf/clip-vit-large-patch14-336=vision/.*',
    # '/hf/Qwen1.5-7B=llm/.*') for stage 1 and ('runs/...-stage1=.*',) for stage 2.
    config.init = ()
    config.run_dir = f"runs/llava-{arg.llm}-{arg.compressor}-v{arg.tokens}-stage{arg.stage}"
    config.model = models.model_config("clip-vit-l14-336", arg.llm, arg.compressor, arg.tokens, dtype="bfloat16")
    config.model.llm.remat = "full"
    config.model.llm.scan_layers = True   # 24-40 layers: one compiled layer on every platform (compile time)
    config.model.head_init = "torch"   # the compressor and projector start as the authors' PyTorch modules do

    config.data = pipeline.default_config()
    config.data.source = "llava"
    config.data.seq_len = 2048
    # QueCC reads the whole first question; longer ones keep their end and are counted (run_dir/bad_input.json).
    config.data.question_len = 512
    config.data.system_prompt = "You are a helpful assistant."
    config.data.template = recipe["template"]
    config.data.image_aspect_ratio = recipe["image_aspect_ratio"]
    config.data.worker_count = 8

    config.train = common.train_config(
        stage=recipe["stage"], lr=recipe["lr"], batch_size=recipe["batch_size"],
        steps=max(1, examples // recipe["batch_size"]), warmup_ratio=0.03, weight_decay=0.0,
        log_every=10, checkpoint_every=500,
        loss_chunk=512)  # float32 logits of 512 positions at a time, not 2048 x 151,936 per example
    config.mesh = common.mesh_config(data=1, fsdp=-1, tensor=1)
    config.lock()
    return config
