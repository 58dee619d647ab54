"""Convert weights between Hugging Face directories and vlm-jax checkpoints.

HF -> orbax (convert once, train many times; the model config decides shapes and sharding):
    python -m launch.convert --config=configs/llava.py:llm=qwen1.5-7b --out=/ckpt/clip336-qwen7b \\
        --source=/hf/clip-vit-large-patch14-336=vision/.* --source=/hf/Qwen1.5-7B=llm/.*
then `--config.init="('/ckpt/clip336-qwen7b=vision/.*|llm/.*',)"` in any run of that model.

A trained run -> HF (the LLM as a Qwen2 directory transformers loads, the compressor + projector as heads/):
    python -m launch.convert --export_run=runs/llava-qwen1.5-7b-quecc-v1-stage2 --out=/export/vlm --dtype=bfloat16
--export_run and --out may be gs:// folders (shards are streamed to the bucket from a local temporary file).
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "The model's config file (HF -> orbax).", lock_config=True)
flags.DEFINE_multi_string("source", [], "DIR=REGEX: a Hugging Face directory and the parameters it gives.")
flags.DEFINE_string("export_run", None, "Run directory whose latest checkpoint is exported to Hugging Face layout.")
flags.DEFINE_list("parts", ["llm", "heads"], "What --export_run writes: llm, heads, vision.")
flags.DEFINE_string("dtype", "bfloat16", "Tensor dtype of an export: bfloat16, float16 or float32.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_list("mesh", ["1", "-1", "1"], "Mesh data,fsdp,tensor the parameters are placed on while converting.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (every host runs the same command).")
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from launch import runtime
    from vlm_jax import checkpoints, sharding
    from vlm_jax.weights import convert

    runtime.start(FLAGS.distributed)
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), map(int, FLAGS.mesh))))
    if FLAGS.export_run:
        written = convert.run_to_hf(FLAGS.export_run, FLAGS.out, tuple(FLAGS.parts), FLAGS.dtype, mesh)
        logging.info("exported %s", written)
        return
    if FLAGS.config is None or not FLAGS.source:
        raise app.UsageError("HF -> orbax needs --config and at least one --source=DIR=REGEX (or use --export_run)")
    n = convert.hf_to_orbax(checkpoints.init_sources(FLAGS.source), FLAGS.config.model, FLAGS.out, mesh)
    logging.info("wrote %d parameters to %s", n, FLAGS.out)


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main, reexec=True)   # re-executes this process first, before the config loads
