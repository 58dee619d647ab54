"""Print the parameter counts of the compressor heads at full size, per head and V, with a per-part breakdown.

    python -m launch.head_params                      # CLIP ViT-L/14-336 features, Qwen1.5-7B width
    python -m launch.head_params --llm=qwen1.5-0.5b --tokens=1,4,16

V values a head cannot produce on the grid are listed with the reason. The projector (mlp2x_gelu) is the same for
every head and is printed once for reference.
"""

from absl import flags

flags.DEFINE_string("vision", "clip-vit-l14-336", "Vision preset (configs/models.py).")
flags.DEFINE_string("llm", "qwen1.5-7b", "LLM preset (configs/models.py); sets the query width and projector.")
flags.DEFINE_list("tokens", ["1", "36", "144", "576"], "Visual token counts V.")
flags.DEFINE_list("heads", None, "Heads to list (default: every registered head).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from configs import models
    from vlm_jax import flops
    from vlm_jax.models import heads, vlm

    count = flops.count_params
    print(f"compressor head parameters: vision {FLAGS.vision}, LLM {FLAGS.llm}")
    print(f"{'head':<12} {'V':>5} {'params':>14}  breakdown")
    for name in FLAGS.heads or list(heads.REGISTRY):
        for v in (int(t) for t in FLAGS.tokens):
            cfg = models.model_config(FLAGS.vision, FLAGS.llm, name, v)
            try:
                tree = heads.abstract_head_params(cfg)
            except ValueError as e:
                print(f"{name:<12} {v:>5} {'-':>14}  ({e})")
                continue
            detail = ", ".join(f"{k} {count(t):,}" for k, t in tree.items())
            print(f"{name:<12} {v:>5} {count(tree):>14,}  {detail}")
    cfg = models.model_config(FLAGS.vision, FLAGS.llm, "avgpool", 1)
    print(f"projector (every head): {count(vlm.abstract_params(cfg)['projector']):,}")


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main)
