"""A checkpoint's data-iterator state is one file per process: resuming with another process count fails clearly."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import checkpoints


def _saved(tmp_path) -> tuple[str, dict]:
    """A checkpoint at step 3 of a one-array state with a data-iterator position, written by this one process."""
    directory = str(tmp_path / "checkpoints")
    mngr = checkpoints.manager(directory)
    state = {"w": jnp.arange(4.0)}
    checkpoints.save(mngr, 3, state, data_state={"position": 7})
    checkpoints.wait(mngr)
    mngr.close()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return directory, {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)}


def test_the_same_process_count_resumes_where_it_stopped(tmp_path):
    directory, abstract = _saved(tmp_path)
    step, state, data_state, _ = checkpoints.restore_latest(checkpoints.manager(directory), abstract)
    assert step == 3 and data_state == {"position": 7}
    np.testing.assert_array_equal(np.asarray(state["w"]), [0.0, 1.0, 2.0, 3.0])


def test_a_checkpoint_written_by_two_processes_is_refused_by_one_saying_what_to_do(tmp_path):
    directory, abstract = _saved(tmp_path)
    data = os.path.join(directory, "3", "data")
    assert [f for f in os.listdir(data) if f.endswith(".json")] == ["process_0-of-1.json"]   # one per process
    # Laid out as two processes write it: each its own iterator position.
    os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, "process_0-of-2.json"))
    shutil.copy(os.path.join(data, "process_0-of-2.json"), os.path.join(data, "process_1-of-2.json"))
    with pytest.raises(ValueError, match=r"written by 2 processes \(hosts\), and this run has 1.*"
                                         r"Resume with 2 processes, or start a new run_dir") as e:
        checkpoints.restore_latest(checkpoints.manager(directory), abstract)
    assert directory in str(e.value) and "config.init" in str(e.value)
