"""One process of the multi-host test: the sample CLI, then the last-position logits of the model it built or loaded.

    LOGITS_FILE=/tmp/logits.json launch/local_multiprocess.sh 2 4 python tests/multihost_worker.py \
        --mesh data=2,expert=2,tensor=2 --prompt_ids 1,2,3 --json

takes the CLI's flags (the launcher adds --coordinator_address/--num_processes/--process_id and
the device count) and runs `python -m mixtral_jax.sample` as it is, supervisor process included.
Once it has finished, every process computes the logits of the first --prompt_ids prompt on the
CLI's own model, and process 0 writes them to $LOGITS_FILE: one launch checks both the CLI's
tokens and the logits of the forward pass across processes.
"""

import json
import os

import jax
import numpy as np
from absl import app

import mixtral_jax as mj
from mixtral_jax import cli, sample

built = []


def _keep(make):
    def keep(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]
    return keep


def last_logits(model, prompt: list[int]) -> list[float]:
    """The logits at the prompt's last position, gathered on every process (the test's reference too)."""
    replicate = jax.jit(lambda x: x, out_shardings=jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec()))
    return np.asarray(replicate(mj.forward(model, np.array([prompt]))))[0, -1].tolist()


if __name__ == "__main__":
    # sample.run() calls mj.init_random or mj.load: the model it builds is kept.
    mj.init_random, mj.load = _keep(mj.init_random), _keep(mj.load)
    try:
        app.run(sample.main, flags_parser=cli.parse_flags)
    except SystemExit as e:
        if e.code or not built:  # a failure, or the supervisor process (it never builds a model)
            raise
    logits = last_logits(built[0], [int(t) for t in sample.FLAGS.prompt_ids[0].split(",")])
    if jax.process_index() == 0:
        with open(os.environ["LOGITS_FILE"], "w") as f:
            json.dump({"processes": jax.process_count(), "devices": jax.device_count(), "logits": logits}, f)
