"""Elastic V: one model trained for a set of V (`train.elastic`), instead of one model per V.

    train.elastic.mode = 'mqt'   # MQT-LLaVA: every step draws one V of the set and trains at it
    train.elastic.mode = 'm3'    # M3 (Matryoshka): every step's loss is the mean over the set of the per-V losses
    train.elastic.tokens = (1, 4, 16, 64)        # the set; model.compressor.num_tokens must be its largest, V_max

The batch is built once, for V_max (the pipeline does not know about elastic V). A batch for a smaller V is the same
batch with the image slots V..V_max-1 removed: `trim` is a pure array operation on tokens, attention_mask, targets,
loss_mask and image_positions (pixels and the question are shared), so the V-row is exactly what the pipeline
builds for V directly (tests/test_elastic.py checks it against the pipeline). It needs every row's slots to be
contiguous (checked on the host, `check_batch`); rows may start them at different columns (a per-row gather), and
a text-only row (no slots) is cut to its first L_V columns. Packed rows (several images per row) are refused.
One difference remains: a text-only record longer than L_V that the V pipeline would drop as `too_long` (no
answer left within L_V) is kept here with fewer answer tokens.

The compressor produces any V of the set from one set of weights (`model.compressor.nested_tokens`, written by
`model_config` into the saved config so that evaluation and export build the same tree; heads with `NESTS`):
  avgpool      pools to each V (no parameters: nested by construction)
  tokenpacker  no parameter depends on V (points sampled, regions cut without weights): nests for free
  resampler    V = the first V latents (MQT-LLaVA's prefix; latents attend to the image only, not to each other)
  quecc        text projection, q/k/v MLPs and cross-attention shared; one depthwise downsampling kernel per V:
               `q_downsample` at V_max, `q_downsample_v{V}` for the others, so a set of one V is exactly the
               published head's tree. Each extra V costs k*k*Dv + Dv parameters (k = g/sqrt(V)). CLIP-L/14-336
               (Dv 1024, 24x24 grid) with Qwen1.5-0.5B, V in {1, 4, 16, 36, 64, 144, 576}: 18,657,280 nested (the
               V=576 head's 17,847,296 + 809,984 for six more kernels) against 125,728,768 for seven separate heads
               (17,847,296 to 18,436,096 each); tiny tower and LLM, V in {1, 4, 16, 64}: 80,640 against 305,472.
  none         only V = g*g: refused.
The model takes `num_tokens=V` (vlm.VLM.__call__, hidden_states, encode_images; a head's __call__); unset it is the
published single-V model.

Steps (state.make_train_step with `scales`): MQT compiles one program per V of the set (trimming inside jit at a
static V) and each step runs the one for `draw(seed, step)`, a uniform draw from a per-step RNG of (config.seed,
step): deterministic and resumable. M3 is one program: the tower and the query pass run once, then one LLM pass per
V on the trimmed sequence; its loss is the mean of the per-V losses. FLOPs (`step_flops`): MQT counts the drawn V's
step (without a step, the mean over the set: a uniform draw's expectation, for plans); M3 the sum over the scales,
the shared tower and query pass once.

Evaluation (train.eval_every) runs at V_max; an evaluation.Answerer answers at any V of the set (`num_tokens`). The
elastic grid (one model per LLM and seed, evaluated at every V: grid/spec.py's `config.elastic`) and the adaptive-V
router (evaluation/router.py, grid/adaptive.py) build on this.
"""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np

# The batch entries laid out along the token axis: tokens and attention_mask at their own column; targets and
# loss_mask describe the NEXT column (targets[t] = tokens[t + 1]), so they are gathered one column ahead.
SAME_COLUMN = ("tokens", "attention_mask")
NEXT_COLUMN = ("targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a train.elastic.mode compiles and counts."""
    programs: Callable[[tuple], dict]             # tokens set -> {program key: scales it trains}
    program_at: Callable[[int, int, tuple], object]   # (seed, step, set) -> the key of that step's program
    flops: Callable[[dict, float, int | None], float]  # ({V: fixed-V step FLOPs}, shared FLOPs, drawn V) -> FLOPs


def draw(seed: int, step: int, tokens) -> int:
    """MQT's V for `step`: uniform over the set, from an RNG of (seed, step) alone (the same after a resume)."""
    tokens = sorted(tokens)
    return tokens[int(np.random.default_rng([int(seed), int(step), 28]).integers(len(tokens)))]


MODES = {
    "mqt": Mode(programs=lambda tokens: {v: (v,) for v in tokens},
                program_at=draw,
                flops=lambda per_v, shared, v: per_v[v] if v else sum(per_v.values()) / len(per_v)),
    "m3": Mode(programs=lambda tokens: {"m3": tuple(tokens)},
               program_at=lambda seed, step, tokens: "m3",
               flops=lambda per_v, shared, v: sum(per_v.values()) - (len(per_v) - 1) * shared),
}


def mode(config) -> str:
    e = config.train.get("elastic", None)
    return e.mode if e is not None else ""


def tokens(config) -> tuple:
    """The set of V, ascending; () when elastic training is off."""
    return tuple(sorted(int(v) for v in config.train.elastic.tokens)) if mode(config) else ()


def validate(config) -> None:
    """Fail at start, naming the key, for elastic configurations that cannot run (the head's own checks of every
    V of the set are heads.validate's, over model.compressor.nested_tokens)."""
    name = mode(config)
    if not name:
        return
    if name not in MODES:
        raise ValueError(f"train.elastic.mode={name!r}; choose '' (off) or one of {sorted(MODES)}")
    vs = tokens(config)
    if not vs or len(set(vs)) != len(vs) or vs[0] < 1:
        raise ValueError(f"train.elastic.tokens={tuple(config.train.elastic.tokens)} must be distinct V >= 1")
    if vs[-1] != config.model.compressor.num_tokens:
        raise ValueError(f"train.elastic.tokens={vs}: model.compressor.num_tokens={config.model.compressor.num_tokens}"
                         f" must be the largest V of the set ({vs[-1]}): the batch is built for it")
    if config.data.get("pack_examples", 0) > 1:
        raise ValueError(f"train.elastic with data.pack_examples={config.data.pack_examples}: a packed row holds "
                         f"several images whose slots cannot be trimmed in place; elastic V needs unpacked rows")


def model_config(model_cfg, train_cfg) -> ml_collections.ConfigDict:
    """`model_cfg` with the set in model.compressor.nested_tokens when `train_cfg` trains elastic V (the head builds
    the weights of every V from it), else unchanged. state.state_layout applies it, so every user of the state
    (training, planning, restoring for evaluation) builds the same tree."""
    m = model_cfg
    vs = tokens(ml_collections.ConfigDict(dict(train=train_cfg)))
    if vs:
        m = ml_collections.ConfigDict(m.to_dict())
        m.compressor.nested_tokens = vs
    return m


def fixed_model(model_cfg, v: int) -> ml_collections.ConfigDict:
    """The published single-V model config at V (what one step at V computes; for FLOPs)."""
    m = ml_collections.ConfigDict(model_cfg.to_dict())
    m.compressor.num_tokens = int(v)
    if "nested_tokens" in m.compressor:
        del m.compressor["nested_tokens"]
    return m


def check_batch(batch) -> None:
    """Host-side check that `trim` may be applied: unpacked rows whose image slots are contiguous."""
    if np.ndim(batch["pixels"]) == 5:
        raise ValueError("elastic V over packed rows (several images per row) is not supported")
    pos = np.asarray(batch["image_positions"])
    length = np.shape(batch["tokens"])[1]
    image_rows = pos[:, 0] < length
    steps = np.diff(pos[image_rows], axis=1)
    if steps.size and not (steps == 1).all():
        raise ValueError("elastic V needs each row's image slots contiguous (one image, its V slots in a run); "
                         f"got image_positions {pos[image_rows][np.any(steps != 1, axis=1)][0].tolist()}")


def trim(batch, v: int, xp=jnp):
    """A V_max batch -> the same batch for V (<= V_max): slots V..V_max-1 of every row removed, L_max -> L_max-V_max+V.
    A pure gather (numpy or jax.numpy via `xp`; inside jit V is static). Needs contiguous slots (`check_batch`)."""
    pos = batch["image_positions"]
    b, length = batch["tokens"].shape
    v_max = pos.shape[1]
    if v == v_max:
        return batch
    if not 1 <= v < v_max:
        raise ValueError(f"cannot trim a batch of {v_max} image slots to V={v}")
    new_length = length - (v_max - v)
    # Columns from the first removed slot on move left by v_max - v; a text-only row (slots at `length`, out of
    # range) keeps its first new_length columns.
    first_removed = xp.where(pos[:, :1] < length, pos[:, :1] + v, new_length)   # [B, 1]
    cols = xp.arange(new_length)[None, :]
    idx = cols + (v_max - v) * (cols >= first_removed)                          # [B, new_length]
    out = dict(batch)
    for key in SAME_COLUMN:
        out[key] = xp.take_along_axis(batch[key], idx, axis=1)
    # targets[t] is the token at t + 1: the source column is idx[t + 1] - 1; the last column predicts nothing.
    nxt = idx[:, 1:] - 1
    for key in NEXT_COLUMN:
        kept = xp.take_along_axis(batch[key], nxt, axis=1)
        out[key] = xp.concatenate([kept, xp.zeros((b, 1), kept.dtype)], axis=1)
    out["image_positions"] = xp.where(pos[:, :v] < length, pos[:, :v], new_length).astype(pos.dtype)
    return out
