"""Training: the loop around the jitted step (vlm_jax/state.py builds the step and the sharded state).

Read `run` top to bottom: set-up and checks -> mesh -> input pipeline -> model and sharded state -> checkpoint
restore -> update step -> loop (log, checkpoint, stop).
"""

import dataclasses
import itertools
import json
import logging
import os
import signal
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from vlm_jax import checkpoints, elastic, files, flops, hardware, optim, sharding
from vlm_jax import state as state_lib
from vlm_jax.data import batching, pipeline
from vlm_jax.models import heads
from vlm_jax.models import llm as llm_lib


def evaluate(eval_step, params, batches, mesh) -> dict:
    """Validation metrics over `batches` (eval-layout host batches): {'eval/loss', 'eval/examples'} and, when
    the step reports it, 'eval/exact_match'. With several processes, each passes its own shard's batches; they
    run the (collective) step equally often, one that ran out first with filler batches (batching.agreed_batches),
    so shards that lost different numbers of bad records cannot leave one waiting for the others."""
    totals = {}
    for host_batch in batching.agreed_batches(batches):
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
    elastic.validate(config)
    heads.validate(elastic.model_config(m, config.train).compressor, m.vision)
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


class Preempted(RuntimeError):
    """Training stopped early on request (SIGTERM: preemption) with its checkpoint committed: the same command
    resumes it. Launchers exit with EXIT_CODE, so a restart policy or the grid retries instead of moving on."""

    EXIT_CODE = 75   # EX_TEMPFAIL (sysexits.h): try again later; launch.runtime.EXIT_STOPPED

    def __init__(self, step: int, steps: int):
        super().__init__(f"preempted after step {step} of {steps}; the checkpoint at step {step} is committed and "
                         f"the same command resumes from it")
        self.step, self.steps = step, steps


class Preemption:
    """When to stop early on SIGTERM (preemption): the same step on every process, or a collective save would hang.

    One process: while training (inside `with Preemption()`), our handler sets a flag, seen after the current step;
    the handler that was there before (a launcher's, or the default) is back on exit, so a SIGTERM during evaluation
    is not swallowed. Several processes: JAX's preemption service (started by jax.distributed.initialize) catches
    SIGTERM on whichever host gets it, tells the others through the coordination service and names one step, the
    same everywhere, at which `stop_after` becomes true. A second SIGTERM ends the process at once."""

    def __init__(self):
        self.requested = False
        self._shared = jax.process_count() > 1
        self._previous = None

    def __enter__(self):
        if not self._shared:
            self._previous = signal.signal(signal.SIGTERM, self._set)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

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


@dataclasses.dataclass
class Throughput:
    """The steps, real tokens and token slots since the last log line, and the time they took: the first (compiling)
    step and evaluations are kept out of it."""
    steps: int = 0
    tokens: int = 0
    slots: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add_batch(self, host_batch) -> None:
        self.tokens += int(np.count_nonzero(host_batch["attention_mask"])) * jax.process_count()
        self.slots += host_batch["attention_mask"].size * jax.process_count()

    def restart(self) -> None:
        self.steps, self.tokens, self.slots, self.start = 0, 0, 0, time.perf_counter()

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def figures(self, step_flops: float, peak_flops: float) -> dict:
        """step_s, tokens_per_s, useful_token_fraction, mfu: None when only the compiling step ran."""
        if not self.steps:
            return dict(tokens_per_s=None, step_s=None, useful_token_fraction=None, mfu=None)
        elapsed = time.perf_counter() - self.start
        return dict(tokens_per_s=self.tokens / elapsed, step_s=elapsed / self.steps,
                    useful_token_fraction=self.tokens / self.slots,
                    mfu=flops.mfu(step_flops, elapsed / self.steps, peak_flops))


def keep_metrics_up_to(path: str, step: int) -> None:
    """Drop the lines of metrics.jsonl logged after `step`: a run resumed from its checkpoint at `step` logs those
    steps again, and each step keeps one line."""
    p = epath.Path(path)
    if not p.exists():
        return
    lines = p.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        files.write_text_atomic(path, "".join(line + "\n" for line in kept))


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` as a run saves it in config.json: references resolved, the layer layout the checkpoints have
    decided (llm.scan_layers unset: a loop on the CPU only), and under elastic V the set the head's weights serve
    (model.compressor.nested_tokens, so that evaluation builds the same tree); train.elastic dropped when off, so
    runs saved before it existed resume unchanged."""
    config = config.copy_and_resolve_references()
    config.model.llm.scan_layers = llm_lib.scans_layers(config.model.llm)
    with config.unlocked():
        config.model = elastic.model_config(config.model, config.train)
        if "elastic" in config.train and not elastic.mode(config):
            del config.train["elastic"]
    return config


def saved_config_changes(config: ml_collections.ConfigDict) -> list[str]:
    """What differs between the config.json saved in config.run_dir and `config` (run_dir itself aside: a run
    directory may be moved); [] when nothing was saved."""
    saved = epath.Path(config.run_dir) / "config.json"
    if not saved.exists():
        return []
    return [c for c in config_changes(json.loads(saved.read_text()), json.loads(resolved(config).to_json_best_effort()))
            if not c.startswith("run_dir:")]


def run(config: ml_collections.ConfigDict, allow_config_change: bool = False) -> dict:
    """Train one model from `config`; returns the last logged metrics, once the final checkpoint is committed.
    Stopped early on request (preemption), it raises `Preempted` after committing the checkpoint of the step it
    stopped at. Resuming a run directory whose saved config differs from `config` is refused (naming the keys)
    unless `allow_config_change`."""
    # --- set-up and safety rails -----------------------------------------------------------------
    jax.config.update("jax_threefry_partitionable", True)
    config = resolved(config)
    run_dir = config.run_dir
    epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
    tokenizer = pipeline.make_tokenizer(config.data)
    validate_config(config, 0, tokenizer.vocab_size)
    ckpt = checkpoints.manager(checkpoints.directory(run_dir), config.train.keep_checkpoints)
    if ckpt.latest_step() is not None:
        changes = saved_config_changes(config)
        if changes and not allow_config_change:
            raise ValueError(f"{run_dir} holds a run (checkpoint at step {ckpt.latest_step()}) whose config differs "
                             f"from this one:\n  " + "\n  ".join(changes) + "\nUse another run_dir, or allow "
                             "the change explicitly (launch.train --allow_config_change) to resume with it")
        if changes:
            logging.warning("resuming with a changed config (allowed):\n  %s", "\n  ".join(changes))
    if jax.process_index() == 0:
        files.write_text_atomic(epath.Path(run_dir) / "config.json", config.to_json_best_effort(indent=2))

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
    layout = state_lib.state_layout(m, t, mesh, strict_mesh=config.mesh.get("strict", False))
    abstract_state = layout[1]
    n_train, n_frozen = flops.count_params(abstract_state.params), flops.count_params(abstract_state.frozen)
    logging.info("parameters: %s trainable, %s frozen", f"{n_train:,}", f"{n_frozen:,}")

    # --- resume from this run's checkpoint, or start (fresh, or from other checkpoints: config.init) ---------
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    restored = checkpoints.restore_latest(ckpt, abstract_state)
    if restored is not None:
        step0, state, data_state, _ = restored
        if data_state is not None:
            data_iter.set_state(data_state)
        if jax.process_index() == 0:
            keep_metrics_up_to(metrics_path, step0)
        logging.info("resumed from step %d", step0)
    else:
        state, _, _ = state_lib.create_state(m, t, mesh, jax.random.key(config.seed),
                                             checkpoints.init_sources(config.get("init")), layout)

    # --- update step (elastic V: one program per drawn V (MQT), or one over every V (M3); vlm_jax/elastic.py) ----
    train_steps = state_lib.jit_train_steps(config, mesh, layout)
    mode = elastic.MODES.get(elastic.mode(config))

    def program_at(step):
        return mode.program_at(config.seed, step, elastic.tokens(config)) if mode else None
    skip_nonfinite = t.get("skip_nonfinite", False)
    flops_of = state_lib.program_flops(config, set(state.params))   # per program (MQT: the drawn V's step)
    step_flops = sum(flops_of.values()) / len(flops_of)   # elastic MQT: the mean over the set
    peak, peak_source = hardware.peak_flops_per_device(t.peak_flops_per_device)
    logging.info("MFU denominator: %.3g FLOP/s per device (%s); %.3g FLOPs per step", peak, peak_source,
                 step_flops)
    lr_at = optim.schedule(t)
    eval_every = t.get("eval_every", 0)
    if eval_every:
        eval_step = state_lib.jit_eval_step(config, mesh, layout)

    def eval_batches():
        """A fresh ordered pass over the validation split, at most train.eval_batches batches (0 = all)."""
        it = pipeline.make_eval_iterator(
            config.data, tokenizer=tokenizer, num_visual_tokens=m.compressor.num_tokens,
            image_size=m.vision.image_size, batch_size=t.batch_size, process_index=jax.process_index(),
            process_count=jax.process_count())
        return itertools.islice(it, t.get("eval_batches", 0) or None)

    # --- loop -----------------------------------------------------------------------------------
    step = int(jax.device_get(state.step))
    window, throughput, last, skipped_updates = [], Throughput(), {}, 0
    window_programs = []   # the program of each timed step since the last log line (elastic MQT: its V's FLOPs)

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
    compiled = set()   # programs that have run (elastic MQT compiles one per V when first drawn)
    try:
        with Preemption() as preemption, jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            while step < t.steps:
                host_batch = next(data_iter)
                state_lib.check_batch(config, host_batch)
                program = program_at(step)
                if mode:
                    elastic.check_batch(host_batch)
                throughput.add_batch(host_batch if not isinstance(program, int) else
                                     elastic.trim(host_batch, program, np))
                batch = sharding.put_batch(host_batch, mesh)
                with jax.transfer_guard("disallow"):
                    state, metrics = train_steps[program](state, batch)
                step += 1
                window.append(metrics)
                if program not in compiled:   # keep compilation out of the throughput figures
                    jax.block_until_ready(metrics)
                    logging.info("step %d compiled and ran in %.1fs%s", step, time.perf_counter() - throughput.start,
                                 "" if program is None else f" (elastic program {program})")
                    compiled.add(program)
                    throughput.restart()
                    window_programs = []
                else:
                    throughput.steps += 1
                    window_programs.append(program)
                stopping = preemption.stop_after(step)
                evaluated = {}
                if eval_every and (step % eval_every == 0 or step == t.steps):
                    eval_start = time.perf_counter()
                    evaluated = evaluate(eval_step, optim.merge(state.params, state.frozen), eval_batches(), mesh)
                    logging.info("step %d | eval %s", step, " | ".join(f"{k} {v:.4g}" for k, v in evaluated.items()))
                    throughput.exclude(time.perf_counter() - eval_start)
                if step % t.log_every == 0 or step == t.steps or stopping:
                    skipped_updates += check_finite(window)
                    fetched = jax.device_get(window)
                    losses = np.array([w["loss"] for w in fetched])
                    losses = losses[np.isfinite(losses)] if skip_nonfinite and np.isfinite(losses).any() else losses
                    last = {
                        "step": step, "loss": float(losses[-1]), "loss_avg": float(losses.mean()),
                        "grad_norm": float(fetched[-1]["grad_norm"]), "lr": float(lr_at(step - 1)),
                        **throughput.figures(float(np.mean([flops_of[p] for p in window_programs]))
                                             if window_programs else step_flops, peak * mesh.size),
                        # elastic V: the last step's V (MQT) or its per-V losses (M3)
                        **{k: (int(v) if k == "visual_tokens" else float(v)) for k, v in fetched[-1].items()
                           if k == "visual_tokens" or k.startswith("loss/v")},
                    }
                    last.update(pipeline_counters(data_iter))
                    if skipped_updates:
                        last["skipped/nonfinite_updates"] = skipped_updates
                    last.update(evaluated)
                    if jax.process_index() == 0:
                        data_iter.bad_input.write(os.path.join(run_dir, "bad_input.json"))
                    logging.info("step %d | loss %.4f (avg %.4f) | lr %.2e | %s tok/s | MFU %s", step, last["loss"],
                                 last["loss_avg"], last["lr"],
                                 "-" if last["tokens_per_s"] is None else f"{last['tokens_per_s']:.0f}",
                                 "-" if last["mfu"] is None else f"{100 * last['mfu']:.2f}%")
                    if jax.process_index() == 0:
                        files.append_line(metrics_path, json.dumps(last))
                    window, window_programs = [], []
                    throughput.restart()
                elif evaluated and jax.process_index() == 0:   # an eval between log steps gets its own line
                    files.append_line(metrics_path, json.dumps({"step": step, **evaluated}))
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
    if step < t.steps:
        raise Preempted(step, t.steps)
    return last


def pipeline_counters(data_iter) -> dict:
    """Bad-input counters of the pipeline (skipped records by reason), flattened for logging."""
    return {f"skipped/{k}": int(v) for k, v in data_iter.bad_input.counts.items()}
