"""One process, two devices, fed each step the rows that two processes would read (process 0's shard, then
process 1's): the single-host twin of a 2-process run. `python -m tests.two_shard_reference RUN_DIR ARGS...` (run
with 2 host devices)."""


import numpy as np

from vlm_jax.data import pipeline


class TwoShards:
    """The per-process iterators of a 2-process run, batched side by side as one global batch."""

    def __init__(self, shards):
        self.shards = shards
        self.bad_input = shards[0].bad_input

    def __iter__(self):
        return self

    def __next__(self):
        rows = [next(s) for s in self.shards]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def get_state(self):
        return {"shards": [s.get_state() for s in self.shards]}

    def set_state(self, state):
        for s, st in zip(self.shards, state["shards"]):
            s.set_state(st)


def main():
    from absl import app, flags

    from launch import train as train_launcher  # noqa: F401  (defines --config and friends)
    from vlm_jax import train

    def run(argv):
        del argv
        make = pipeline.make_train_iterator
        pipeline.make_train_iterator = lambda *a, **kw: TwoShards(
            [make(*a, **{**kw, "process_index": i, "process_count": 2}) for i in range(2)])
        train.run(flags.FLAGS.config)

    app.run(run)


if __name__ == "__main__":
    main()
