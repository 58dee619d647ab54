"""Checkpoints: orbax CheckpointManager over (train state, data-iterator state, run metadata).

The data iterator's state is saved with the model, one file per process (each host's iterator reads its own shard),
so a resumed run sees exactly the batches an uninterrupted run would. Saves are atomic (orbax writes to a temporary directory and renames), so a crash mid-save never loses the
previous checkpoint; `max_to_keep` old ones are kept.
"""

import collections
import contextlib
import json
import logging
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from grain import checkpoint as grain_checkpoint


def directory(run_dir: str) -> str:
    """Checkpoints live in run_dir/checkpoints; local paths are made absolute (orbax needs that), URLs kept."""
    base = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    return os.path.join(base, "checkpoints")


def _item_handlers(state_handler) -> dict:
    """The checkpoint's items: the train state (arrays), the data-iterator state (one file per process, through
    grain's handler: each host reads its own shard's position back) and run metadata (JSON)."""
    return dict(state=state_handler, data=grain_checkpoint.CheckpointHandler(), meta=ocp.JsonCheckpointHandler())


def manager(directory, max_to_keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers=_item_handlers(ocp.StandardCheckpointHandler()))


class _IteratorState:
    """What grain's checkpoint handler saves and restores: an object with get_state/set_state over bytes. Holds
    this process's data-iterator state (JSON-able; None when the run has no iterator state)."""

    def __init__(self, state=None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, blob: bytes) -> None:
        self.state = json.loads(blob)

    def start_prefetch(self) -> None:   # called by the handler after set_state; nothing to prefetch here
        pass


def complete_steps(directory) -> list[int]:
    """Steps whose checkpoint under `directory` was completely written, oldest first, as orbax itself decides:
    locally, renamed from its temporary folder; in a bucket (no atomic rename), holding its commit_success file."""
    return sorted(ocp.step.checkpoint_steps(directory))


@contextlib.contextmanager
def write_errors(mngr: ocp.CheckpointManager):
    """A failed checkpoint write (disk full, no permission, ...) becomes one clear OSError naming what is still
    restorable; the failed step stays a temporary directory, never restored."""
    try:
        yield
    except Exception as e:   # orbax reports a background write's failure at the next save or wait
        steps = complete_steps(mngr.directory)
        raise OSError(f"writing a checkpoint under {mngr.directory} failed: {type(e).__name__}: {e}\nThe run "
                      f"stopped; the last complete checkpoint is "
                      f"{f'step {steps[-1]}' if steps else 'none'}, and resuming starts from it") from e


def wait(mngr: ocp.CheckpointManager) -> None:
    """Block until pending saves are on disk; a failed one raises (write_errors)."""
    with write_errors(mngr):
        mngr.wait_until_finished()


def save(mngr: ocp.CheckpointManager, step: int, state, data_state=None, meta=None, force: bool = False):
    """Save at `step` (async for the arrays); returns whether a save happened. A failed write, this one's or a
    previous one's, raises (write_errors)."""
    with write_errors(mngr):
        saved = mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain_checkpoint.CheckpointSave(_IteratorState(data_state)),
            meta=ocp.args.JsonSave(meta or {})), force=force)
    if saved:
        logging.info("checkpoint: saving step %d", step)
    return saved


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
    """(step, state, data_state, meta) of the latest checkpoint, or None when there is none.

    `abstract_state` is a tree of ShapeDtypeStructs *with shardings*: arrays come back directly sharded. A
    checkpoint whose shapes do not match the configured model raises a ValueError naming the first mismatch; one
    written by another number of processes, a ValueError saying what to do (_check_process_count).
    """
    step = mngr.latest_step()
    if step is None:
        return None
    meta_shapes = mngr.item_metadata(step)["state"]
    _check_shapes(meta_shapes, abstract_state)
    _check_process_count(mngr.directory, step)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain_checkpoint.CheckpointRestore(_IteratorState()), meta=ocp.args.JsonRestore()))
    return step, restored["state"], restored["data"].state, restored["meta"]


_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _check_process_count(directory, step: int) -> None:
    """Raises unless the data-iterator state of checkpoint `step` was saved by as many processes as this run has:
    each process saved its own iterator's position (grain: data/process_<i>-of-<n>.json), which cannot be split
    over a different number of processes."""
    data = epath.Path(directory) / str(step) / "data"
    counts = {int(m.group(2)) for p in (data.iterdir() if data.exists() else ())
              if (m := _PROCESS_FILE.fullmatch(p.name))}
    here = jax.process_count()
    if counts and counts != {here}:
        written = " and ".join(str(n) for n in sorted(counts))
        raise ValueError(f"checkpoint step {step} under {directory} was written by {written} processes (hosts), and "
                         f"this run has {here}: each process saved its own data-iterator position ({data}), which "
                         f"cannot be split over another number of processes. Resume with {written} processes, or "
                         f"start a new run_dir from its weights, with a fresh optimizer and data order "
                         f"(config.init=('{directory}', '.*'))")


def committed_step(directory) -> int | None:
    """The step of the latest *committed* checkpoint under `directory` (None: none, or no such folder). A save still
    being written, or one cut short by a lost host, is not counted: orbax lists a step only once it is finalized."""
    if not epath.Path(directory).exists():
        return None
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                 item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler()))
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def restore_latest_parts(directory, abstract_parts: dict):
    """(step, {name: subtree}) of the latest checkpoint under `directory`, reading only the named top-level parts of
    the saved train state (e.g. params and frozen for evaluation: the optimizer state, twice the size of the
    trainable parameters under Adam, is never read). None when there is no checkpoint; shape errors as above."""
    # Same files as `manager` writes; the PyTree handler is the one that can restore a subtree.
    mngr = ocp.CheckpointManager(directory, item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler()))
    try:
        step = mngr.latest_step()
        if step is None:
            return None
        _check_shapes(mngr.item_metadata(step)["state"], abstract_parts, only=tuple(abstract_parts))
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_parts, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_parts),
            partial_restore=True)))
        return step, dict(restored["state"])
    finally:
        mngr.close()


def _path(keys) -> str:
    """'opt_state/1/0/mu/llm/...': the same string for a dict key, a named-tuple field or a list index."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _check_shapes(saved_meta, abstract_state, only: tuple[str, ...] = ()):
    """Raises unless the saved tree (restricted to the top-level parts `only`, when given) matches."""
    saved = {_path(p): tuple(getattr(x, "shape", ()) or ())
             for p, x in jax.tree_util.tree_flatten_with_path(saved_meta)[0]}
    if only:
        saved = {k: v for k, v in saved.items() if k.split("/", 1)[0] in only}
    wanted = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the configured model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for key, shape in wanted.items():
        if saved[key] != shape:
            raise ValueError(f"checkpoint shape mismatch at {key}: checkpoint has {saved[key]}, model wants {shape}")



# ---------------------------------------------------------------------------------------------- config.init

def init_sources(init_cfg) -> list[tuple[str, str]]:
    """`config.init` -> [(run or checkpoint directory, regex of parameter names)]. Accepts pairs or 'DIR=REGEX'."""
    sources = []
    for item in init_cfg or ():
        pair = tuple(item.split("=", 1)) if isinstance(item, str) else tuple(item)
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"config.init entry {item!r} must be (directory, regex) or 'DIR=REGEX'")
        sources.append(pair)
    return sources


def _checkpoint_dir(path: str) -> str:
    """A run directory (holding checkpoints/) or a checkpoints directory itself."""
    run_ckpts = directory(path)
    if "://" in path or os.path.isdir(run_ckpts):
        return run_ckpts
    return os.path.abspath(path)


# A model's decoder layers are one stacked array per weight when scanned (`P/layers/REST`, [num_layers, ...]) and one
# array per layer when looped (`P/layers_<i>/REST`): see models/llm.py `scans_layers`.
_STACKED = re.compile(r"(.+)/layers/(.+)")
_LOOPED = re.compile(r"(.+)/layers_(\d+)/(.+)")


def _other_layout(name: str, shape: tuple, looped_layers: dict):
    """How parameter `name` (of `shape`) is read from a checkpoint that has the other layer layout:
    ([(source name, the shape it must have)], combine: their host arrays -> the parameter's), or None when `name`
    is no layer's. A scanned model's stack [L, ...] is the looped layers 0 ... L-1 stacked; a looped model's
    layer i is row i of the scanned stack, which must hold as many layers as the model has (`looped_layers`:
    (P, REST) -> the model's count)."""
    if m := _STACKED.fullmatch(name):
        prefix, rest = m.groups()
        return [(f"{prefix}/layers_{i}/{rest}", shape[1:]) for i in range(shape[0])], np.stack
    if m := _LOOPED.fullmatch(name):
        prefix, i, rest = m.groups()
        return [(f"{prefix}/layers/{rest}", (looped_layers[prefix, rest], *shape))], lambda x: x[0][int(i)]
    return None


def restore_matching(source: str, regex: str, abstract_params: dict) -> dict:
    """{name: array} for every parameter whose '/'-joined name fully matches `regex`, read from the latest
    checkpoint under `source` (any train/frozen split) straight onto the shardings of `abstract_params`
    ({name: ShapeDtypeStruct with sharding}, the model being built). A regex that selects nothing, a selected
    parameter the checkpoint lacks, or a shape that differs is a ValueError naming the parameter.

    A checkpoint with the other decoder-layer layout (scanned or looped, e.g. Hugging Face weights converted on a
    CPU host, where layers loop, for a run on TPU, where they scan) is read too: the layers' arrays come to each
    host whole, are stacked or sliced there (_other_layout) and placed onto the parameter's sharding."""
    pattern = re.compile(regex)
    wanted = {k: v for k, v in abstract_params.items() if pattern.fullmatch(k)}
    where = f"config.init source {source!r} (params {regex!r})"
    if not wanted:
        raise ValueError(f"{where} selects no parameter of the model; names look like {sorted(abstract_params)[:3]}")
    looped_layers = collections.Counter(m.group(1, 3) for k in abstract_params if (m := _LOOPED.fullmatch(k)))
    mngr = ocp.CheckpointManager(_checkpoint_dir(source), item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler()))
    try:
        step = mngr.latest_step()
        if step is None:
            raise ValueError(f"{where}: no checkpoint under {_checkpoint_dir(source)}")
        saved = {}   # name -> (part, shape, dtype): the source's split into trainable and frozen parts is its own
        for part in ("params", "frozen"):
            tree = mngr.item_metadata(step)["state"].get(part) or {}
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                saved[_path(path)] = (part, tuple(leaf.shape), leaf.dtype)
        item, args = {"params": {}, "frozen": {}}, {"params": {}, "frozen": {}}
        converted = {}   # name -> (source names, combine): parameters read from the other layer layout
        for name, abstract in sorted(wanted.items()):
            if name in saved:
                part, shape, _ = saved[name]
                if shape != tuple(abstract.shape):
                    raise ValueError(f"{where}: {name!r} has shape {shape} in the checkpoint, the model wants "
                                     f"{tuple(abstract.shape)}")
                item[part][name] = abstract
                args[part][name] = ocp.checkpoint_utils.construct_restore_args(abstract)
                continue
            sources, combine = _other_layout(name, tuple(abstract.shape), looped_layers) or ([], None)
            if not sources:
                raise ValueError(f"{where}: the checkpoint has no parameter {name!r}")
            for source_name, shape in sources:
                if source_name not in saved:
                    raise ValueError(f"{where}: the checkpoint has no parameter {name!r}, nor {source_name!r} of "
                                     f"the other layer layout")
                part, saved_shape, dtype = saved[source_name]
                if saved_shape != shape:
                    raise ValueError(f"{where}: {source_name!r} has shape {saved_shape} in the checkpoint, reading "
                                     f"{name!r} of shape {tuple(abstract.shape)} needs {shape}")
                item[part][source_name] = jax.ShapeDtypeStruct(shape, dtype)
                args[part][source_name] = ocp.RestoreArgs(restore_type=np.ndarray)   # whole, on every host
            converted[name] = ([s for s, _ in sources], combine)
        parts = [part for part, flat in item.items() if flat]
        item = {part: traverse_util.unflatten_dict(item[part], sep="/") for part in parts}
        args = {part: traverse_util.unflatten_dict(args[part], sep="/") for part in parts}
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True)))
        got = {}
        for part in parts:
            got.update(traverse_util.flatten_dict(dict(restored["state"][part]), sep="/"))
        out = {name: got[name] for name in wanted if name not in converted}
        for name, (sources, combine) in converted.items():
            abstract = wanted[name]
            host = np.asarray(combine([got[s] for s in sources]), abstract.dtype)
            out[name] = jax.make_array_from_callback(abstract.shape, abstract.sharding,
                                                     lambda index, host=host: host[index])
        logging.info("%s: %d parameters from step %d, %d of them converted between the scanned and looped layer "
                     "layouts", where, len(out), step, len(converted))
        return out
    finally:
        mngr.close()
