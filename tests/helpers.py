"""Small model configs and random batches in the pipeline's layout, shared by tests."""

import ml_collections
import numpy as np

from configs import common, models


def tiny_config(compressor="avgpool", num_tokens=4, llm="tiny", seq_len=24, question_len=6, batch_size=8,
                stage="full"):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.run_dir = ""
    config.model = models.model_config("tiny", llm, compressor, num_tokens)
    config.model.vision.image_size = 32   # 4x4 grid keeps tests fast
    config.data = ml_collections.ConfigDict(dict(seq_len=seq_len, question_len=question_len))
    config.train = common.train_config(stage=stage, train_vision=True, steps=10, batch_size=batch_size, lr=1e-3,
                                       warmup_ratio=0.0)
    config.mesh = common.mesh_config()
    return config


def random_batch(config, seed=0, batch_size=None):
    """A batch with the pipeline's keys/shapes: image slots after a 2-token prefix, loss on the last 4 tokens."""
    rng = np.random.default_rng(seed)
    b = batch_size or config.train.batch_size
    L, Lq, V = config.data.seq_len, config.data.question_len, config.model.compressor.num_tokens
    S, vocab = config.model.vision.image_size, config.model.llm.vocab_size
    tokens = rng.integers(3, vocab, (b, L)).astype(np.int32)
    lengths = rng.integers(V + 8, L + 1, b)
    attention_mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    tokens = tokens * attention_mask
    loss_mask = ((np.arange(L)[None] >= lengths[:, None] - 5) & (np.arange(L)[None] < lengths[:, None] - 1))
    targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    q_len = rng.integers(1, Lq + 1, b)
    question_mask = (np.arange(Lq)[None] < q_len[:, None]).astype(np.int32)
    return dict(
        pixels=rng.normal(size=(b, S, S, 3)).astype(np.float32),
        tokens=tokens,
        targets=targets,
        loss_mask=loss_mask.astype(np.float32),
        attention_mask=attention_mask,
        image_positions=np.broadcast_to(2 + np.arange(V, dtype=np.int32), (b, V)).copy(),
        question_tokens=(rng.integers(3, vocab, (b, Lq)) * question_mask).astype(np.int32),
        question_mask=question_mask,
    )


def tiny_grid(tmp_path, tokens="1+4", **stage2_train):
    """The smoke grid config shrunk to tiny-xs x `tokens`: a few steps of batch 4, 8 eval questions per family
    (stage-2 train keys overridable)."""
    from configs import grid as grid_config

    g = grid_config.get_config(f"smoke,llms=tiny-xs,tokens={tokens}")
    with g.unlocked():
        g.dir = str(tmp_path / "grid")
        g.seeds = (0,)   # one seed: cell names without the _s<seed> suffix
        g.cell.train.batch_size = 4
        g.cell.data.read_threads = 1
        g.tower.overrides.train.steps = 2
        g.tower.overrides.train.batch_size = 4
        g.llm_pretrain.pretrain = False   # the tiny LLM starts fresh here: tests see what stage 1 froze
        g.stages.stage1.train.steps = 2
        g.stages.stage2.train.steps = 3
        g.stages.stage2.train.update(stage2_train)
        g.eval.synthetic_per_family = 8
        g.eval.batch_size = 8
        g.parallel = 1
        g.fit.bootstrap = 20
    return g


def grid_jobs(g):
    """(pretraining jobs, cell jobs) of a grid config, as launch.grid builds them."""
    from vlm_jax import flops
    from vlm_jax.grid import spec

    first = spec.pretraining_jobs(g, models.llm_config)
    return first, spec.cell_jobs(g, models.llm_config, lambda m: flops.param_counts(m)["llm"], first)


def saved_steps(run_dir) -> list[int]:
    """Complete checkpoints of a run directory, oldest first."""
    from vlm_jax import checkpoints  # pylint: disable=import-outside-toplevel
    return checkpoints.complete_steps(checkpoints.directory(str(run_dir)))


def trained_params(run_dir) -> dict:
    """The latest checkpoint's parameters as {'a/b/c': numpy array}."""
    from flax import traverse_util  # pylint: disable=import-outside-toplevel

    from vlm_jax import state as state_lib  # pylint: disable=import-outside-toplevel
    _, params = state_lib.load_params(str(run_dir))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
