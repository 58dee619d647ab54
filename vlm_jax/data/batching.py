"""The train iterator: grain's record stream -> fixed-shape batches, the bad-input policy, a resumable state.

Batches are assembled here, in the main process, from grain's per-record stream. That is where bad-input markers
become counts (`skip`) or a `BadInputError` (`error`): a skipped record simply does not fill a batch row, so every
batch still holds B good examples. The state is grain's (which records were consumed) plus the skip counts; since a
batch boundary always falls between two consumed records, restoring it yields exactly the batches an uninterrupted
run would. Packing (`pack_examples`) keeps that promise by saving the state from before the record that did not
fit the last batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Self

import numpy as np
from absl import logging

from vlm_jax.data import errors, packing

_LOGGED_SKIPS = 10  # log this many skipped records one by one, then only every 1000th


class BatchIterator:
    """Yields dicts of numpy arrays (the batch contract, B = per-process batch size) forever.

    `bad_input` (errors.BadInputCounter) holds the skip counts: log `bad_input.counts`, write them with
    `bad_input.write(path)`. `get_state()` returns JSON-able data; `set_state` restores it.
    """

    def __init__(self, loader, batch_size: int, *, policy: str = "skip", max_consecutive_bad: int = 1000,
                 pad_final: bool = False, pack_examples: int = 0):
        if batch_size < 1:
            raise ValueError(f"per-process batch size must be >= 1, got {batch_size}")
        if pack_examples and pad_final:
            raise ValueError("packing is for training streams; an evaluation pass keeps one example per row")
        self.pack_examples = pack_examples  # >0: up to this many examples per row (packing.py)
        self._pending = None   # packing: a record read that did not fit the last batch, and the state before it
        self._loader = loader
        self._records: Iterator[dict[str, Any]] = iter(loader)
        self.batch_size = batch_size
        self.policy = errors.check_policy(policy)
        self.max_consecutive_bad = max_consecutive_bad
        self.bad_input = errors.BadInputCounter()
        self.pad_final = pad_final  # for a finite (eval) stream: fill the last batch, add `valid`

    def __iter__(self) -> Self:
        return self

    def _next_good(self) -> dict[str, Any]:
        bad_run = 0
        while True:
            record = next(self._records)
            if not errors.is_marker(record):
                if errors.NOTE_KEY in record:   # kept, but counted (e.g. a truncated question)
                    record = dict(record)
                    reason, record_id, detail = record.pop(errors.NOTE_KEY)
                    self.bad_input.add(reason, record_id, detail)
                return record
            rid, reason, detail = record[errors.BAD_ID_KEY], record[errors.BAD_REASON_KEY], record[
                errors.BAD_DETAIL_KEY]
            if self.policy == "error":
                raise errors.BadInputError(rid, reason, detail)
            self.bad_input.add(reason, rid, detail)
            total = self.bad_input.total
            if total <= _LOGGED_SKIPS or total % 1000 == 0:
                logging.warning("skipped bad input record %r: %s %s (%d skipped so far: %s)", rid, reason, detail,
                                total, dict(self.bad_input.counts))
            bad_run += 1
            if bad_run >= self.max_consecutive_bad:
                raise errors.BadInputError(rid, reason, f"{bad_run} bad records in a row; is the data path "
                                           f"right? counts so far: {dict(self.bad_input.counts)}")

    def _state_now(self) -> dict[str, Any]:
        return {"grain": json.loads(self._records.get_state()), "bad_input": self.bad_input.state()}

    def _next_packed(self) -> dict[str, np.ndarray]:
        """B rows filled first-fit until a record fits none; that record opens the next batch. The iterator's
        state stays the one from before that record was read, so a restore replays it."""
        if self._pending is None:
            state = self._state_now()
            self._pending = (self._next_good(), state)
        packed = packing.PackedBatch(self.batch_size, self.pack_examples, self._pending[0])
        while packed.add(self._pending[0]):
            state = self._state_now()
            self._pending = (self._next_good(), state)
        return packed.batch()

    def __next__(self) -> dict[str, np.ndarray]:
        if self.pack_examples:
            return self._next_packed()
        rows = []
        try:
            while len(rows) < self.batch_size:
                rows.append(self._next_good())
        except StopIteration:
            if not self.pad_final or not rows:
                raise
        n_real = len(rows)
        if self.pad_final:  # filler rows repeat the last one without loss, so shapes stay fixed
            rows += [{**rows[-1], "loss_mask": np.zeros_like(rows[-1]["loss_mask"])}] * (self.batch_size - n_real)
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if self.pad_final:
            batch["valid"] = (np.arange(self.batch_size) < n_real).astype(np.float32)
        return batch

    def close(self) -> None:
        """Stops grain's worker processes now rather than at interpreter exit (which grain handles noisily)."""
        inner = getattr(self._records, "_iterator", None)  # DataLoaderIterator exposes no close() of its own
        if inner is not None and hasattr(inner, "close"):
            inner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_state(self) -> dict[str, Any]:
        return self._pending[1] if self._pending is not None else self._state_now()

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "grain" not in state:
            raise ValueError(f"not a data iterator state (keys {sorted(state)}); expected 'grain' and 'bad_input'")
        self._pending = None
        self._records.set_state(json.dumps(state["grain"]).encode())
        self.bad_input.set_state(state.get("bad_input", {}))


# --- several processes: one count of eval batches ------------------------------------------------------------------
# Each process reads its own shard of a split, and skipped records make the shards' batch counts differ. The eval
# step is one program over every process's devices: a process that stopped calling it while another still did would
# leave that one waiting in a collective for ever. So the processes agree, batch by batch, on whether anyone still
# has data, and one that has run out joins with filler batches (no valid row, no loss token).


def process_values(value: int) -> np.ndarray:
    """int64[process_count]: `value` as every process passed it (a collective: every process must call it)."""
    import jax  # pylint: disable=import-outside-toplevel  (the data package itself stays free of JAX)
    if jax.process_count() == 1:
        return np.array([value], np.int64)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(np.int64(value))).reshape(-1)


def filler(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` with no valid row and no loss token: the eval step's sums (rows, tokens, loss, exact) gain nothing,
    while its real rows keep every computed value finite."""
    return {**batch, "valid": np.zeros_like(batch["valid"]), "loss_mask": np.zeros_like(batch["loss_mask"])}


_DONE, _HAS_BATCH = 1, 2   # a process's state per round; 0: done, and never had a batch to copy


def agreed_batches(batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[Mapping[str, np.ndarray]]:
    """This process's eval batches (each with `valid`, as `pad_final` makes them), then filler batches until every
    process has run out: every process yields the same number. One small all-gather per batch; one process: the
    batches as they are."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
        yield from batches
        return
    batches, last = iter(batches), None
    while True:
        batch = next(batches, None)
        states = process_values(_HAS_BATCH if batch is not None else _DONE if last is not None else 0)
        if not (states == _HAS_BATCH).any():
            return
        if batch is not None:
            last = batch
        if (states == 0).any():   # a shard without one good record: its process copies another's batch
            copied = _from_process(int(np.argmax(states == _HAS_BATCH)), batch)
            last = last if last is not None else copied
        yield batch if batch is not None else filler(last)


def _from_process(source: int, batch: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Process `source`'s `batch`, on every process (a collective), sent as bytes: the others need not know its
    shapes. Happens at most once per pass."""
    import io  # pylint: disable=import-outside-toplevel

    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    blob = b""
    if jax.process_index() == source:
        buf = io.BytesIO()
        np.savez(buf, **batch)
        blob = buf.getvalue()
    size = int(process_values(len(blob))[source])
    data = np.zeros(size, np.uint8)
    data[:len(blob)] = np.frombuffer(blob, np.uint8)
    data = np.asarray(multihost_utils.process_allgather(data))[source]
    with np.load(io.BytesIO(data.tobytes()), allow_pickle=False) as loaded:
        return {k: loaded[k] for k in loaded.files}
