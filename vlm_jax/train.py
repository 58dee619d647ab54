"""Training: the train state, the jitted train step, and the loop.

Read top to bottom: set-up and checks -> mesh -> input pipeline -> model and sharded state -> checkpoint restore
-> update step -> loop (log, checkpoint, stop). One step, from a batch to the updated state, lives in
`make_train_step` (this file), `vlm_jax/models/vlm.py` (the forward pass) and `vlm_jax/optim.py` (which
parameters train, and how).
"""

import itertools
import json
import logging
import os
import signal
import time
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
from jax.experimental import multihost_utils

from vlm_jax import checkpoints, flops, hardware, optim, sharding, weights
from vlm_jax.data import pipeline
from vlm_jax.models import heads, layers, vlm
from vlm_jax.models import llm as llm_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any      # trainable parameters (nested dict)
    frozen: Any      # frozen parameters: no gradients, no optimizer state
    opt_state: Any


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


def model_inputs(batch):
    """The batch entries the model consumes (targets and loss mask are for the loss)."""
    return {k: batch[k] for k in vlm.MODEL_INPUTS}


def make_train_step(model: vlm.VLM, tx: optax.GradientTransformation, loss_chunk: int = 0,
                    skip_nonfinite: bool = False):
    """`(state, batch) -> (state, metrics)`: forward, loss on answer tokens, gradients of trainable params only.

    loss_chunk > 0 computes the output layer and loss that many positions at a time (`chunked_cross_entropy`).
    metrics['finite'] says whether loss and gradient norm were finite; with `skip_nonfinite` an update where they
    were not leaves parameters and optimizer state as they were (the step still counts).
    """

    def loss_fn(trainable, frozen, batch):
        params = optim.merge(trainable, frozen)
        if not loss_chunk:
            logits = model.apply({"params": params}, **model_inputs(batch))
            return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        hidden = model.apply({"params": params}, **model_inputs(batch), method=vlm.VLM.hidden_states)
        weights = llm_lib.output_weights(params["llm"], model.cfg.llm)
        return chunked_cross_entropy(hidden, weights, batch["targets"], batch["loss_mask"], loss_chunk,
                                     jnp.dtype(model.cfg.dtype))

    def train_step(state: TrainState, batch):
        (loss, n_tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.frozen, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = {"loss": loss, "loss_tokens": n_tokens, "grad_norm": grad_norm, "finite": finite}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if skip_nonfinite:
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state.replace(step=state.step + 1))
        return new, metrics

    return train_step


def make_eval_step(model: vlm.VLM, loss_chunk: int = 0):
    """`(params, batch) -> sums` over an eval batch: answer-token loss and token count, and (unless the loss is
    chunked, when full logits would not fit) answers whose every token is the argmax under teacher forcing, which is
    what greedy decoding would produce, so it equals exact match without running generation."""

    def eval_step(params, batch):
        mask = batch["loss_mask"]   # filler rows of the last batch have none
        sums = {"rows": jnp.sum(batch["valid"])}
        if loss_chunk:
            hidden = model.apply({"params": params}, **model_inputs(batch), method=vlm.VLM.hidden_states)
            loss, n = chunked_cross_entropy(hidden, llm_lib.output_weights(params["llm"], model.cfg.llm),
                                            batch["targets"], mask, loss_chunk, jnp.dtype(model.cfg.dtype))
            return dict(sums, loss_sum=loss * n, tokens=n)
        logits = model.apply({"params": params}, **model_inputs(batch))
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        right = (jnp.argmax(logits, -1) == batch["targets"]) | (mask == 0)
        exact = jnp.all(right, axis=1) & (jnp.sum(mask, axis=1) > 0)
        return dict(sums, loss_sum=jnp.sum(per_token * mask), tokens=jnp.sum(mask),
                    exact=jnp.sum(exact * batch["valid"]))

    return eval_step


def evaluate(eval_step, params, batches, mesh) -> dict:
    """Validation metrics over `batches` (eval-layout host batches): {'eval/loss', 'eval/examples'} and, when
    the step reports it, 'eval/exact_match'."""
    totals = {}
    for host_batch in batches:
        out = jax.device_get(eval_step(params, sharding.put_batch(host_batch, mesh)))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in out.items()}
    if not totals.get("rows"):
        raise ValueError("validation split gave no examples")
    metrics = {"eval/loss": totals["loss_sum"] / max(totals["tokens"], 1.0), "eval/examples": int(totals["rows"])}
    if "exact" in totals:
        metrics["eval/exact_match"] = totals["exact"] / totals["rows"]
    return metrics


def validate_config(config: ml_collections.ConfigDict, n_devices: int, vocab_size: int | None = None) -> None:
    """Fail at start, naming the key, for configurations that cannot run."""
    m = config.model
    if config.train.loss_chunk < 0:
        raise ValueError(f"train.loss_chunk={config.train.loss_chunk} must be >= 0 (0 = whole sequence at once)")
    if m.vision.image_size % m.vision.patch_size:
        raise ValueError(f"model.vision.image_size={m.vision.image_size} is not a multiple of "
                         f"model.vision.patch_size={m.vision.patch_size}")
    heads.validate(m.compressor, m.vision)
    if m.llm.hidden_size % m.llm.num_heads:
        raise ValueError(f"model.llm.hidden_size={m.llm.hidden_size} is not divisible by "
                         f"model.llm.num_heads={m.llm.num_heads}")
    if m.llm.num_heads % m.llm.num_kv_heads:
        raise ValueError(f"model.llm.num_heads={m.llm.num_heads} is not a multiple of "
                         f"model.llm.num_kv_heads={m.llm.num_kv_heads}")
    for key in ("dtype", "param_dtype"):
        if m[key] not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.{key}={m[key]!r}; choose float32, bfloat16 or float16")
    if config.data.seq_len < 4:
        raise ValueError(f"data.seq_len={config.data.seq_len} (the text budget, added to the V image slots) "
                         f"is too short for any conversation")
    positions = config.data.seq_len + m.compressor.num_tokens
    if positions > m.llm.max_position_embeddings:
        raise ValueError(f"data.seq_len={config.data.seq_len} + {m.compressor.num_tokens} visual tokens = "
                         f"{positions} positions exceed model.llm.max_position_embeddings="
                         f"{m.llm.max_position_embeddings}")
    if vocab_size is not None and vocab_size > m.llm.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but model.llm.vocab_size={m.llm.vocab_size}")
    t = config.train
    if t.steps < 1:
        raise ValueError(f"train.steps must be >= 1, got {t.steps}")
    for key in ("eval_every", "eval_batches"):
        if t.get(key, 0) < 0:
            raise ValueError(f"train.{key}={t[key]} must be >= 0 (0 = off / the whole validation split)")
    if not 0 <= t.warmup_ratio <= 1:
        raise ValueError(f"train.warmup_ratio must be in [0, 1], got {t.warmup_ratio}")
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:n_devices] if n_devices else None)
    shards = sharding.batch_shards(mesh)
    if t.batch_size % shards:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the data x fsdp mesh axes "
                         f"({shards} shards)")
    if t.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by {jax.process_count()} processes")
    optim.param_rules(t)


def state_layout(model_cfg, train_cfg, mesh, strict_mesh: bool = False):
    """(init_state: rng -> TrainState, abstract TrainState with shardings, optimizer), nothing allocated.
    Parameters the mesh cannot divide are reported loudly (an error when `strict_mesh`)."""
    init = vlm.init_fn(model_cfg)
    rng = jax.random.key(0)
    boxed = jax.eval_shape(init, rng)
    sharding.check_rules_cover(boxed)
    replicated = []
    param_shardings = sharding.logical_to_sharding(boxed, mesh, report=replicated)
    sharding.check_replication(replicated, strict_mesh)
    trainable = optim.trainable_names(nn.meta.unbox(boxed), optim.param_rules(train_cfg))
    tx = optim.make_optimizer(train_cfg)

    def init_state(rng):
        params = nn.meta.unbox(init(rng))
        train, frozen = optim.split(params, trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), params=train, frozen=frozen, opt_state=tx.init(train))

    abstract = jax.eval_shape(init_state, rng)
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
    """(config, merged params) of the latest checkpoint in `run_dir`, for evaluation and generation (the optimizer
    state is not read)."""
    config = ml_collections.ConfigDict(json.loads((epath.Path(run_dir) / "config.json").read_text()))
    mesh = mesh or sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    _, abstract, _ = state_layout(config.model, config.train, mesh)
    restored = checkpoints.restore_latest_parts(checkpoints.directory(run_dir),
                                                {"params": abstract.params, "frozen": abstract.frozen})
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}/checkpoints")
    _, parts = restored
    return config, optim.merge(parts["params"], parts["frozen"])


def append_line(path: str, line: str) -> None:
    """Append one line to a local file; an object store (gs://) cannot append, so there the file is rewritten."""
    if "://" not in str(path):
        with open(path, "a") as f:
            f.write(line + "\n")
        return
    p = epath.Path(path)
    p.write_text((p.read_text() if p.exists() else "") + line + "\n")


class Preemption:
    """When to stop early on SIGTERM (preemption): the same step on every process, or a collective save would hang.

    One process: our handler sets a flag, seen after the current step. Several processes: JAX's preemption service
    (started by jax.distributed.initialize) catches SIGTERM on whichever host gets it, tells the others through the
    coordination service and names one step, the same everywhere, at which `stop_after` becomes true. A second
    SIGTERM ends the process at once (default action: no handler left)."""

    def __init__(self):
        self.requested = False
        self._shared = jax.process_count() > 1
        if not self._shared:
            signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_):
        logging.warning("stop requested: will checkpoint and exit after this step (a second signal exits at once)")
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def stop_after(self, step: int) -> bool:
        """Call once per step on every process, with the step just completed."""
        if self._shared:
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def config_changes(saved: dict, new: dict) -> list[str]:
    """'key: saved -> new' for every (dotted) key whose value differs between two JSON config dicts."""
    a, b = (traverse_util.flatten_dict(c, sep=".") if c else {} for c in (saved, new))
    missing = object()
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def run(config: ml_collections.ConfigDict, allow_config_change: bool = False) -> dict:
    """Train one model from `config`; returns the last logged metrics. Resuming a run directory whose saved
    config differs from `config` is refused (naming the keys) unless `allow_config_change`."""
    # --- set-up and safety rails -----------------------------------------------------------------
    jax.config.update("jax_threefry_partitionable", True)
    run_dir = config.run_dir
    epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
    tokenizer = pipeline.make_tokenizer(config.data)
    validate_config(config, 0, tokenizer.vocab_size)
    ckpt = checkpoints.manager(checkpoints.directory(run_dir), config.train.keep_checkpoints)
    saved_config = epath.Path(run_dir) / "config.json"
    if ckpt.latest_step() is not None and saved_config.exists():
        changes = [c for c in config_changes(json.loads(saved_config.read_text()),
                                             json.loads(config.to_json_best_effort()))
                   if not c.startswith("run_dir:")]   # a run directory may be moved
        if changes and not allow_config_change:
            raise ValueError(f"{run_dir} holds a run (checkpoint at step {ckpt.latest_step()}) whose config differs "
                             f"from this one:\n  " + "\n  ".join(changes) + "\nUse another run_dir, or allow "
                             f"the change explicitly (launch.train --allow_config_change) to resume with it")
        if changes:
            logging.warning("resuming with a changed config (allowed):\n  %s", "\n  ".join(changes))
    if jax.process_index() == 0:
        saved_config.write_text(config.to_json_best_effort(indent=2))

    # --- mesh -----------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)

    # --- input pipeline -------------------------------------------------------------------------
    m, t = config.model, config.train
    data_iter = pipeline.make_train_iterator(
        config.data, tokenizer=tokenizer, num_visual_tokens=m.compressor.num_tokens,
        image_size=m.vision.image_size, batch_size=t.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())

    # --- model and sharded state ----------------------------------------------------------------
    model = vlm.VLM(m)
    layout = state_layout(m, t, mesh, strict_mesh=config.mesh.get("strict", False))
    _, abstract_state, tx = layout
    state_shardings = shardings_of(abstract_state)
    n_train, n_frozen = flops.count_params(abstract_state.params), flops.count_params(abstract_state.frozen)
    logging.info("parameters: %s trainable, %s frozen", f"{n_train:,}", f"{n_frozen:,}")

    # --- resume from this run's checkpoint, or start (fresh, or from other checkpoints: config.init) ---------
    restored = checkpoints.restore_latest(ckpt, abstract_state)
    if restored is not None:
        step0, state, data_state, _ = restored
        if data_state is not None:
            data_iter.set_state(data_state)
        logging.info("resumed from step %d", step0)
    else:
        state, _, _ = create_state(m, t, mesh, jax.random.key(config.seed),
                                   checkpoints.init_sources(config.get("init")), layout)

    # --- update step ----------------------------------------------------------------------------
    batch_sh = sharding.batch_sharding(mesh)
    skip_nonfinite = t.get("skip_nonfinite", False)
    train_step = jax.jit(make_train_step(model, tx, config.train.loss_chunk, skip_nonfinite),
                         in_shardings=(state_shardings, batch_sh),
                         out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    train_llm = any(k.startswith("llm") for k in state.params)
    train_vision = any(k.startswith("vision") for k in state.params)
    seq_len = config.data.seq_len + m.compressor.num_tokens   # text budget + V image slots
    step_flops = flops.train_step_flops(m, batch_size=t.batch_size, seq_len=seq_len,
                                        train_llm=train_llm, train_vision=train_vision,
                                        query_tokens=config.data.question_len,
                                        images_per_sequence=max(config.data.get("pack_examples", 0), 1))
    peak, peak_source = hardware.peak_flops_per_device(t.peak_flops_per_device)
    logging.info("MFU denominator: %.3g FLOP/s per device (%s); %.3g FLOPs per step", peak, peak_source,
                 step_flops)
    lr_at = optim.schedule(t)
    eval_every = t.get("eval_every", 0)
    if eval_every:
        eval_step = jax.jit(make_eval_step(model, config.train.loss_chunk),
                            in_shardings=(optim.merge(state_shardings.params, state_shardings.frozen), batch_sh),
                            out_shardings=sharding.replicated(mesh))

    def eval_batches():
        """A fresh ordered pass over the validation split, at most train.eval_batches batches (0 = all)."""
        it = pipeline.make_eval_iterator(
            config.data, tokenizer=tokenizer, num_visual_tokens=m.compressor.num_tokens,
            image_size=m.vision.image_size, batch_size=t.batch_size, process_index=jax.process_index(),
            process_count=jax.process_count())
        return itertools.islice(it, t.get("eval_batches", 0) or None)

    # --- loop -----------------------------------------------------------------------------------
    preemption = Preemption()
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    step = int(jax.device_get(state.step))
    window, window_tokens, window_slots, window_start, last = [], 0, 0, time.perf_counter(), {}
    skipped_updates = 0

    def check_finite(window_metrics) -> int:
        """Non-finite updates in the window so far: an error naming the first one (before anything is saved, so
        the last checkpoint stays good), or, with train.skip_nonfinite, their count."""
        finite = [bool(f) for f in jax.device_get([w["finite"] for w in window_metrics])]
        bad = [step - len(finite) + 1 + i for i, ok in enumerate(finite) if not ok]
        if bad and not skip_nonfinite:
            checkpoints.wait(ckpt)   # the last good checkpoint may still be being written
            raise FloatingPointError(
                f"non-finite loss or gradient norm at step {bad[0]} ({len(bad)} of the last {len(finite)} steps); "
                f"stopped without saving: the last checkpoint (step {ckpt.latest_step()}) is intact. "
                f"train.skip_nonfinite=True skips such updates instead")
        return len(bad)
    first_step, timed = True, 0
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            while step < t.steps:
                host_batch = next(data_iter)
                window_tokens += int(np.count_nonzero(host_batch["attention_mask"])) * jax.process_count()
                window_slots += host_batch["attention_mask"].size * jax.process_count()
                batch = sharding.put_batch(host_batch, mesh)
                with jax.transfer_guard("disallow"):
                    state, metrics = train_step(state, batch)
                step += 1
                window.append(metrics)
                if first_step:   # keep compilation out of the throughput figures
                    jax.block_until_ready(metrics)
                    logging.info("step %d compiled and ran in %.1fs", step, time.perf_counter() - window_start)
                    first_step, timed, window_tokens, window_slots = False, 0, 0, 0
                    window_start = time.perf_counter()
                else:
                    timed += 1
                stopping = preemption.stop_after(step)
                evaluated = {}
                if eval_every and (step % eval_every == 0 or step == t.steps):
                    eval_start = time.perf_counter()
                    evaluated = evaluate(eval_step, optim.merge(state.params, state.frozen), eval_batches(), mesh)
                    logging.info("step %d | eval %s", step, " | ".join(f"{k} {v:.4g}" for k, v in evaluated.items()))
                    window_start += time.perf_counter() - eval_start   # keep evaluation out of the throughput figures
                if step % t.log_every == 0 or step == t.steps or stopping:
                    skipped_updates += check_finite(window)
                    fetched = jax.device_get(window)
                    elapsed = time.perf_counter() - window_start
                    losses = np.array([w["loss"] for w in fetched])
                    losses = losses[np.isfinite(losses)] if skip_nonfinite and np.isfinite(losses).any() else losses
                    step_time = elapsed / timed if timed else None   # None: only the compiling step so far
                    last = {
                        "step": step, "loss": float(losses[-1]), "loss_avg": float(losses.mean()),
                        "grad_norm": float(fetched[-1]["grad_norm"]), "lr": float(lr_at(step - 1)),
                        "tokens_per_s": window_tokens / elapsed if timed else None, "step_s": step_time,
                        "useful_token_fraction": window_tokens / window_slots if timed else None,
                        "mfu": flops.mfu(step_flops, step_time, peak * mesh.size) if timed else None,
                    }
                    last.update(pipeline_counters(data_iter))
                    if skipped_updates:
                        last["skipped/nonfinite_updates"] = skipped_updates
                    last.update(evaluated)
                    if jax.process_index() == 0:
                        data_iter.bad_input.write(os.path.join(run_dir, "bad_input.json"))
                    logging.info("step %d | loss %.4f (avg %.4f) | lr %.2e | %s tok/s | MFU %s", step, last["loss"],
                                 last["loss_avg"], last["lr"], f"{last['tokens_per_s']:.0f}" if timed else "-",
                                 f"{100 * last['mfu']:.2f}%" if timed else "-")
                    if jax.process_index() == 0:
                        append_line(metrics_path, json.dumps(last))
                    window, window_tokens, window_slots, window_start, timed = [], 0, 0, time.perf_counter(), 0
                elif evaluated and jax.process_index() == 0:   # an eval between log steps gets its own line
                    append_line(metrics_path, json.dumps({"step": step, **evaluated}))
                if step % t.checkpoint_every == 0 or step == t.steps or stopping:
                    check_finite(window)   # (counted at the log step)
                    checkpoints.save(ckpt, step, state, data_iter.get_state(), {"step": step}, force=True)
                if stopping:
                    logging.warning("stopped on request after step %d of %d, checkpoint saved (all %d processes); the "
                                    "same command resumes", step, t.steps, jax.process_count())
                    break
    finally:   # an error mid-run (non-finite step, data error) must not abort a checkpoint still being written
        try:
            checkpoints.wait(ckpt)
        finally:
            ckpt.close()
    return last


def pipeline_counters(data_iter) -> dict:
    """Bad-input counters of the pipeline (skipped records by reason), flattened for logging."""
    return {f"skipped/{k}": int(v) for k, v in data_iter.bad_input.counts.items()}
