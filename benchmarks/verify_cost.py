"""Cost of checkpoint verification on a multi-GB checkpoint: load with and without verify, alternating.

Usage: python benchmarks/verify_cost.py [CKPT_DIR]  (written once with random bench-model weights if absent)
"""
import dataclasses, os, sys, time
import jax
import mixtral_jax as mj
from mixtral_jax import ckpt_files
cfg = dataclasses.replace(mj.load_config("tiny"), hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=8,
                          num_experts_per_tok=2, vocab_size=32000)
path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/verify_cost_ckpt"
if not os.path.isdir(path):
    m = mj.init_random(cfg, seed=0, dtype="float32", layout="stacked")
    t = time.perf_counter(); mj.save(m, path); print(f"save {time.perf_counter()-t:.1f} s", flush=True)
    del m
size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)
print(f"checkpoint {size/1e9:.2f} GB, {mj.param_count(cfg)['total']/1e6:.0f}M params", flush=True)
for r in range(3):
    t = time.perf_counter(); ckpt_files.verify(path); tv = time.perf_counter() - t
    for verify in (True, False):
        t = time.perf_counter(); m = mj.load(path, dtype="float32", layout="stacked", verify=verify)
        jax.block_until_ready(m.params()); dt = time.perf_counter() - t; del m
        print(f"round {r}: load verify={verify}: {dt:.2f} s", flush=True)
    print(f"round {r}: verify alone {tv:.2f} s = {size/tv/1e9:.2f} GB/s (warm page cache)", flush=True)
