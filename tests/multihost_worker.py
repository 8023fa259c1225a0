"""One process of the multi-host test: random tiny model on a mesh, greedy tokens and logits as JSON.

    launch/local_multiprocess.sh 2 4 python tests/multihost_worker.py --mesh data=2,expert=2,tensor=2

adds --coordinator_address/--num_processes/--process_id and the device count
(XLA_FLAGS). Without them it runs alone: the single-process reference.
Process 0 prints one JSON line.
"""

import argparse
import json

import jax
import numpy as np

import mixtral_jax as mj
from mixtral_jax import distributed, testing
from mixtral_jax.config import from_hf_dict

parser = argparse.ArgumentParser()
parser.add_argument("--mesh", required=True)
parser.add_argument("--coordinator_address")
parser.add_argument("--num_processes", type=int)
parser.add_argument("--process_id", type=int)
args = parser.parse_args()

distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                       initialization_timeout=60)
mesh = mj.make_mesh(args.mesh)
model = mj.init_random(from_hf_dict(testing.TINY_HF), seed=0, dtype="float32", mesh=mesh)
prompts = [[1, 17, 300, 42, 9], [1, 5], [1, 400, 401, 402, 403, 404, 405, 406]]
tokens = mj.generate(model, prompts, max_new_tokens=6, stop_tokens=[])
replicate = jax.jit(lambda x: x, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
logits = np.asarray(replicate(mj.forward(model, np.array([prompts[0]]))))
if jax.process_index() == 0:
    print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(), "tokens": tokens,
                      "logits": logits[0, -1].tolist()}))
