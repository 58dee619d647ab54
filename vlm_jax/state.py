"""The train state, its shardings, and the one builder of the jitted train step.

`train.run`, `plan` (ahead-of-time compilation for TPU slices) and the benchmarks all build the step here, so what
is planned and measured is what trains. One step, from a batch to the updated state, reads in three files:
`make_train_step` (here), `vlm_jax/models/vlm.py` (the forward pass) and `vlm_jax/optim.py` (which parameters train,
and how).
"""

import json
import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from vlm_jax import checkpoints, elastic, flops, optim, sharding, weights
from vlm_jax.models import layers, vlm
from vlm_jax.models import llm as llm_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any      # trainable parameters (nested dict)
    frozen: Any      # frozen parameters: no gradients, no optimizer state
    opt_state: Any


# --- losses --------------------------------------------------------------------------------------

def masked_cross_entropy(logits, targets, loss_mask):
    """Mean next-token loss over answer tokens: float32[B, T, V], int[B, T], float[B, T] -> (loss, n_tokens)."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    n = jnp.sum(loss_mask)
    return jnp.sum(per_token * loss_mask) / jnp.maximum(n, 1.0), n


def chunked_cross_entropy(hidden, weights, targets, loss_mask, chunk: int, dtype=jnp.float32):
    """`masked_cross_entropy` of the logits hidden @ weights, computed `chunk` positions at a time.

    float[B, T, D], float[D, vocab], int[B, T], float[B, T] -> (loss, n_tokens). Each chunk's logits are recomputed
    in the backward pass (jax.checkpoint inside lax.scan), so at most one chunk's float32[B, chunk, vocab] logits are
    alive instead of the whole float32[B, T, vocab] (2.5 GB per example for Qwen's 151,936 tokens at T = 2048).
    A chunk where no row has an answer token skips its output layer, forward and backward: in LLaVA's
    conversations most positions are image slots, prompt or padding.
    """
    b, t, _ = hidden.shape
    pad = -t % chunk
    if pad:  # padded positions carry no loss
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, loss_mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(loss_mask, ((0, 0), (0, pad)))
    n_chunks = (t + pad) // chunk

    def split(x):  # [B, T, ...] -> [n_chunks, B, chunk, ...]
        return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)

    def loss_of(h, y, m):
        logits = layers.contract(h.astype(dtype), weights.astype(dtype), 1).astype(jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y) * m)

    @jax.checkpoint
    def chunk_loss(total, xs):
        h, y, m = xs   # a chunk without answer tokens (prompt, image slots, padding) skips the output layer
        return total + jax.lax.cond(jnp.any(m != 0), loss_of, lambda *_: jnp.zeros((), jnp.float32), h, y, m), None

    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(loss_mask)))
    n = jnp.sum(loss_mask)
    return total / jnp.maximum(n, 1.0), n


def model_inputs(batch, text_only: bool = False):
    """The batch entries the model consumes (targets and loss mask are for the loss). text_only: the token entries
    and pixels None, so the model skips its image path (`check_batch` makes sure no row has an image)."""
    if text_only:
        return {"pixels": None, **{k: batch[k] for k in vlm.TEXT_INPUTS}}
    return {k: batch[k] for k in vlm.MODEL_INPUTS}


def check_batch(config: ml_collections.ConfigDict, batch) -> None:
    """Host-side, before a step: under train.text_only the step never runs the image path, so a row with image
    slots would train without its image, silently; refuse it, naming the key. Nothing to check otherwise."""
    if not config.train.get("text_only", False):
        return
    pos = np.asarray(batch["image_positions"])
    rows = np.flatnonzero(np.any(pos < np.shape(batch["tokens"])[1], axis=1))
    if rows.size:
        raise ValueError(f"train.text_only=True skips the vision tower, compressor and projector, but {rows.size} "
                         f"row(s) of this batch have image slots (row {rows[0]}: image_positions "
                         f"{pos[rows[0]].tolist()}); train.text_only is for text-only data "
                         f"(data.synthetic.describe=True)")


# --- the step ------------------------------------------------------------------------------------

def make_train_step(model: vlm.VLM, tx: optax.GradientTransformation, loss_chunk: int = 0,
                    skip_nonfinite: bool = False, scales: tuple = (), text_only: bool = False):
    """`(state, batch) -> (state, metrics)`: forward, loss on answer tokens, gradients of trainable params only.

    loss_chunk > 0 computes the output layer and loss that many positions at a time (`chunked_cross_entropy`).
    metrics['finite'] says whether loss and gradient norm were finite; with `skip_nonfinite` an update where they
    were not leaves parameters and optimizer state as they were (the step still counts).
    scales (elastic V, vlm_jax/elastic.py): the batch is built for V_max and trimmed to each V of `scales`; the loss
    is the mean of the per-V losses (M3: the whole set, metrics 'loss/v{V}'; MQT: the one V drawn for this step,
    metrics 'visual_tokens'). (): the published single-V step.
    text_only (train.text_only): the LLM alone over the token embeddings, for batches without image slots
    (`check_batch`); the same loss and gradients as the full step on such a batch, without the image path's FLOPs.
    """
    if text_only and scales:
        raise ValueError("train.text_only with train.elastic: elastic V trains the image path, which text_only skips")

    def loss_of(params, hidden, batch):
        if not loss_chunk:
            logits = model.apply({"params": params}, hidden, method=vlm.VLM.logits)
            return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        weights = llm_lib.output_weights(params["llm"], model.cfg.llm)
        return chunked_cross_entropy(hidden, weights, batch["targets"], batch["loss_mask"], loss_chunk,
                                     jnp.dtype(model.cfg.dtype))

    def loss_fn(trainable, frozen, batch):
        params = optim.merge(trainable, frozen)
        if not scales and not loss_chunk:
            logits = model.apply({"params": params}, **model_inputs(batch, text_only))
            loss, n = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
            return loss, (n, {})
        if not scales:
            hidden = model.apply({"params": params}, **model_inputs(batch, text_only), method=vlm.VLM.hidden_states)
            loss, n = loss_of(params, hidden, batch)
            return loss, (n, {})
        trimmed = {v: elastic.trim(batch, v) for v in scales}
        texts = {v: (b["tokens"], b["attention_mask"], b["image_positions"]) for v, b in trimmed.items()}
        hidden = model.apply({"params": params}, batch["pixels"], texts, batch.get("question_tokens"),
                             batch.get("question_mask"), method=vlm.VLM.hidden_states_per_scale)
        per_scale = {v: loss_of(params, hidden[v], trimmed[v]) for v in scales}
        loss = sum(loss for loss, _ in per_scale.values()) / len(scales)
        extra = ({"visual_tokens": jnp.asarray(scales[0], jnp.int32)} if len(scales) == 1 else
                 {f"loss/v{v}": loss for v, (loss, _) in per_scale.items()})
        return loss, (per_scale[scales[0]][1], extra)   # the answer tokens are the same at every V

    def train_step(state: TrainState, batch):
        (loss, (n_tokens, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.frozen,
                                                                                       batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = {"loss": loss, "loss_tokens": n_tokens, "grad_norm": grad_norm, "finite": finite, **extra}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if skip_nonfinite:
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state.replace(step=state.step + 1))
        return new, metrics

    return train_step


def make_eval_step(model: vlm.VLM, loss_chunk: int = 0, text_only: bool = False):
    """`(params, batch) -> sums` over an eval batch: answer-token loss and token count, and (unless the loss is
    chunked, when full logits would not fit) answers whose every token is the argmax under teacher forcing, which is
    what greedy decoding would produce, so it equals exact match without running generation. text_only: as
    `make_train_step`'s."""

    def eval_step(params, batch):
        mask = batch["loss_mask"]   # filler rows of the last batch have none
        sums = {"rows": jnp.sum(batch["valid"])}
        if loss_chunk:
            hidden = model.apply({"params": params}, **model_inputs(batch, text_only), method=vlm.VLM.hidden_states)
            loss, n = chunked_cross_entropy(hidden, llm_lib.output_weights(params["llm"], model.cfg.llm),
                                            batch["targets"], mask, loss_chunk, jnp.dtype(model.cfg.dtype))
            return dict(sums, loss_sum=loss * n, tokens=n)
        logits = model.apply({"params": params}, **model_inputs(batch, text_only))
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        right = (jnp.argmax(logits, -1) == batch["targets"]) | (mask == 0)
        exact = jnp.all(right, axis=1) & (jnp.sum(mask, axis=1) > 0)
        return dict(sums, loss_sum=jnp.sum(per_token * mask), tokens=jnp.sum(mask),
                    exact=jnp.sum(exact * batch["valid"]))

    return eval_step


def jit_train_step(config: ml_collections.ConfigDict, mesh, layout, *, donate_state: bool = True, scales=()):
    """The run's train step, jitted over `mesh` with the state's shardings: every setting of `config.train` that
    changes the program (loss_chunk, skip_nonfinite, text_only) is read here and nowhere else. `layout`:
    `state_layout`'s result for this config and mesh. The state is donated (updated in place) unless
    `donate_state` is False, as a benchmark that times one state again and again needs. scales: elastic V
    (`jit_train_steps`)."""
    _, abstract, tx = layout
    shardings = shardings_of(abstract)
    t = config.train
    model = vlm.VLM(elastic.model_config(config.model, t))
    step = make_train_step(model, tx, t.loss_chunk, t.get("skip_nonfinite", False), tuple(scales),
                           t.get("text_only", False))
    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,) if donate_state else ())


def jit_train_steps(config: ml_collections.ConfigDict, mesh, layout, **kwargs) -> dict:
    """{program key: jitted step}: one step, key None, unless train.elastic is on (vlm_jax/elastic.py): MQT has one
    program per V of the set, M3 one over all of them. jax.jit compiles a program when it first runs.
    `elastic.MODES[mode].program_at(seed, step, set)` names the program of a step."""
    name = elastic.mode(config)
    if not name:
        return {None: jit_train_step(config, mesh, layout, **kwargs)}
    return {key: jit_train_step(config, mesh, layout, scales=scales, **kwargs)
            for key, scales in elastic.MODES[name].programs(elastic.tokens(config)).items()}


def jit_eval_step(config: ml_collections.ConfigDict, mesh, layout):
    """The run's validation step over merged parameters, jitted like `jit_train_step`."""
    shardings = shardings_of(layout[1])
    model = vlm.VLM(elastic.model_config(config.model, config.train))
    return jax.jit(make_eval_step(model, config.train.loss_chunk, config.train.get("text_only", False)),
                   in_shardings=(optim.merge(shardings.params, shardings.frozen), sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def images_per_sequence(config: ml_collections.ConfigDict) -> int:
    """Images (and V-slot groups) in one row of a batch: K with packing (data.pack_examples=K), else 1."""
    return max(config.data.get("pack_examples", 0), 1)


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict:
    """A run's training batch as abstract arrays on the batch sharding (packing included): what its step is
    lowered over when nothing runs (planning, FLOPs analysis)."""
    m, b, k = config.model, config.train.batch_size, images_per_sequence(config)
    t = config.data.seq_len + m.compressor.num_tokens
    shapes = vlm.dummy_inputs(m, b, t, config.data.question_len)
    if k > 1:   # a packed row: K images and questions, K groups of V slots (data/packing.py)
        s, v, q = m.vision.image_size, m.compressor.num_tokens, config.data.question_len
        shapes.update(pixels=jax.ShapeDtypeStruct((b, k, s, s, 3), jnp.float32),
                      image_positions=jax.ShapeDtypeStruct((b, k * v), jnp.int32),
                      question_tokens=jax.ShapeDtypeStruct((b, k, q), jnp.int32),
                      question_mask=jax.ShapeDtypeStruct((b, k, q), jnp.int32))
    shapes.update(targets=jax.ShapeDtypeStruct((b, t), jnp.int32), loss_mask=jax.ShapeDtypeStruct((b, t), jnp.float32))
    sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in shapes.items()}


def program_flops(config: ml_collections.ConfigDict, trainable_parts) -> dict:
    """{program key (`jit_train_steps`): model FLOPs of one step it runs} (vlm_jax.flops), given the top-level
    parts that train (e.g. {'compressor', 'projector', 'llm'}). Elastic V (vlm_jax/elastic.py): an MQT program
    counts its V's step; M3's the sum over its scales, with the tower and the query pass once. train.text_only:
    the LLM's share alone (no image path runs)."""
    m, t = config.model, config.train
    kwargs = dict(batch_size=t.batch_size, train_llm="llm" in trainable_parts,
                  train_vision="vision" in trainable_parts, question_len=config.data.question_len,
                  images_per_sequence=images_per_sequence(config), text_only=t.get("text_only", False))
    name = elastic.mode(config)
    if not name:
        return {None: flops.train_step_flops(m, seq_len=config.data.seq_len + m.compressor.num_tokens, **kwargs)}
    per_v = {v: flops.train_step_flops(elastic.fixed_model(m, v), seq_len=config.data.seq_len + v, **kwargs)
             for v in elastic.tokens(config)}
    shared = t.batch_size * flops.shared_image_flops(m, train_vision=kwargs["train_vision"],
                                                     question_len=config.data.question_len)
    mode = elastic.MODES[name]
    return {key: mode.flops(per_v, shared, key if isinstance(key, int) else None)
            for key in mode.programs(elastic.tokens(config))}


def step_flops(config: ml_collections.ConfigDict, trainable_parts, num_tokens: int | None = None) -> float:
    """Model FLOPs of one train step of `config`: the numerator of MFU, and of planned step times. Elastic MQT:
    the step at the drawn V `num_tokens` (unset: the mean over the set, what a plan expects)."""
    per_program = program_flops(config, trainable_parts)
    if num_tokens is not None and num_tokens in per_program:
        return per_program[num_tokens]
    return sum(per_program.values()) / len(per_program)


# --- the state -----------------------------------------------------------------------------------

def state_layout(model_cfg, train_cfg, mesh, strict_mesh: bool = False):
    """(init_state: rng -> TrainState, abstract TrainState with shardings, optimizer), nothing allocated.
    Parameters the mesh cannot divide are reported loudly (an error when `strict_mesh`). Under elastic V the head
    holds the weights of every V of train.elastic.tokens (vlm_jax/elastic.py)."""
    model_cfg = elastic.model_config(model_cfg, train_cfg)
    init = vlm.init_fn(model_cfg)
    boxed = vlm.abstract_init(model_cfg)
    sharding.check_rules_cover(boxed)
    replicated = []
    param_shardings = sharding.logical_to_sharding(boxed, mesh, report=replicated)
    sharding.check_replication(replicated, strict_mesh)
    abstract_params = nn.meta.unbox(boxed)
    trainable = optim.trainable_names(abstract_params, optim.param_rules(train_cfg))
    tx = optim.make_optimizer(train_cfg)

    def init_state(rng):
        params = nn.meta.unbox(init(rng))
        train, frozen = optim.split(params, trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), params=train, frozen=frozen, opt_state=tx.init(train))

    # init_state's shapes, without tracing the model's init again (only the optimizer's, on the trainable ones)
    train_abstract, frozen_abstract = optim.split(abstract_params, trainable)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=train_abstract, frozen=frozen_abstract,
                          opt_state=jax.eval_shape(tx.init, train_abstract))
    train_sh, frozen_sh = optim.split(param_shardings, trainable)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, train_sh,
                                   transform_non_params=lambda _: rep)
    shardings = TrainState(step=rep, params=train_sh, frozen=frozen_sh, opt_state=opt_sh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return init_state, abstract, tx


def shardings_of(abstract_state):
    return jax.tree.map(lambda x: x.sharding, abstract_state)


# Initialisation runs once: on the CPU, XLA's backend optimisations cost more than they save (tiny-m: compile 7.0 s ->
# 2.3 s, run 0.01 s -> 0.05 s). Other backends keep their defaults.
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def create_state(model_cfg, train_cfg, mesh, rng, sources=(), layout=None):
    """The starting TrainState (sharded, created by jitted functions: never materialised on one device), its
    shardings and the optimizer. Parameters that the (checkpoint, regex) `sources` select are read from there
    straight onto their shardings (later sources win); the rest are initialised fresh. When the sources give every
    parameter, nothing is initialised (no init to compile, as in a stage that starts from the previous one).
    `layout`: state_layout's result, when the caller has it."""
    init_state, abstract, tx = layout or state_layout(model_cfg, train_cfg, mesh)
    shardings = shardings_of(abstract)
    wanted = traverse_util.flatten_dict(optim.merge(abstract.params, abstract.frozen), sep="/")
    taken = {}
    for source, regex in sources:
        if weights.is_hf_directory(source):   # a Hugging Face model directory (Qwen1.5, CLIP)
            taken.update(weights.restore_matching(source, regex, wanted, model_cfg))
        else:                                 # a vlm-jax run or checkpoint directory
            taken.update(checkpoints.restore_matching(source, regex, wanted))
    if sources:
        logging.info("config.init: %d of %d parameters taken from %d source(s), the rest fresh", len(taken),
                     len(wanted), len(sources))

    def pick(part, given):
        flat = traverse_util.flatten_dict(part, sep="/")
        return traverse_util.unflatten_dict({k: given.get(k, v) for k, v in flat.items()}, sep="/") if flat else part

    with jax.set_mesh(mesh):
        if len(taken) == len(wanted):
            def from_params(train, frozen):
                return TrainState(step=jnp.zeros((), jnp.int32), params=train, frozen=frozen,
                                  opt_state=tx.init(train))
            state = jax.jit(from_params, out_shardings=shardings)(pick(abstract.params, taken),
                                                                   pick(abstract.frozen, taken))
        else:
            def fresh_except(rng, given):
                # The taken parameters replace fresh ones inside the program, so XLA drops their initialisers:
                # nothing the sources give is ever initialised too (a 0.5B LLM: 4.3 GB less at peak). Donated, the
                # given arrays become the state's own buffers.
                state = init_state(rng)
                train, frozen = pick(state.params, given), pick(state.frozen, given)
                return state.replace(params=train, frozen=frozen, opt_state=tx.init(train))
            state = jax.jit(fresh_except, out_shardings=shardings, donate_argnums=(1,)).lower(rng, taken).compile(
                _INIT_COMPILER_OPTIONS.get(jax.default_backend()))(rng, taken)
    return state, shardings, tx


def load_params(run_dir: str, mesh=None):
    """(config, merged params) of the latest checkpoint in `run_dir`, for evaluation, generation and export (the
    optimizer state is not read)."""
    config = ml_collections.ConfigDict(json.loads((epath.Path(run_dir) / "config.json").read_text()))
    mesh = mesh or sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    _, abstract, _ = state_layout(config.model, config.train, mesh)
    restored = checkpoints.restore_latest_parts(checkpoints.directory(run_dir),
                                                {"params": abstract.params, "frozen": abstract.frozen})
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}/checkpoints")
    _, parts = restored
    return config, optim.merge(parts["params"], parts["frozen"])
