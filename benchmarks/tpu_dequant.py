"""Does the TPU compiler fuse a quantized expert's dequantize into the product? From its own analysis.

    TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/tpu_dequant.py

Part 1: a 4-layer scan over stacked experts (8 experts of 2048 x 1024, 8 rows, v5e:1x1), each layer's
weight dequantized four ways and multiplied: bytes accessed per layer (the cost analysis counts a scan
body once) against the layer's stored bytes. Part 2: `plan.dry_run`'s whole decode step of a mid-sized
model (D 1024, F 4096, 4 layers) in bfloat16, int8 and int4: HBM bytes against the bytes held.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mixtral_jax import plan, topology
from mixtral_jax.config import from_hf_dict

L, E, K, N, R, GROUP = 4, 8, 2048, 1024, 8, 32
mesh = jax.sharding.Mesh(np.array(topology.tpu_devices(topology.parse_topology("v5e:1x1"))).reshape(1), ("x",))
spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P()))
product = lambda x, w: jnp.einsum("MD,EDF->EMF", x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def nibbles(q):
    signed = jax.lax.bitcast_convert_type(q, jnp.int8)
    return jnp.right_shift(jnp.left_shift(signed, 4), 4), jnp.right_shift(signed, 4)  # inputs 0::2 and 1::2


VARIANTS = {
    "int8, no scale": (lambda x, q: product(x, q), spec((L, E, K, N), jnp.int8)),
    "int8, a scale per output channel": (lambda x, w: product(x, w[0].astype(jnp.float32) * w[1]),
                                         (spec((L, E, K, N), jnp.int8), spec((L, E, 1, N), jnp.float32))),
    "int8, a scale per 32 inputs": (
        lambda x, w: product(x, (w[0].reshape(E, K // GROUP, GROUP, N).astype(jnp.float32)
                                 * w[1].astype(jnp.float32)[:, :, None]).reshape(E, K, N)),
        (spec((L, E, K, N), jnp.int8), spec((L, E, K // GROUP, N), jnp.float16))),
    "int4 nibble planes, no scale": (lambda x, q: sum(product(x[:, s::2], h) for s, h in enumerate(nibbles(q))),
                                     spec((L, E, K // 2, N), jnp.uint8)),
}


def scan_of(layer):
    def run(x, w):
        def body(c, l):
            wl = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, l, 0, keepdims=False), w)
            return c + layer(x, wl).sum(), None
        return jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(L))[0]
    return run


for name, (layer, w) in VARIANTS.items():
    c = jax.jit(scan_of(layer)).lower(spec((R, K), jnp.bfloat16), w).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    stored = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w)) / L
    print(f"{name:36s} bytes accessed per layer {cost['bytes accessed'] / 1e6:6.1f} MB, stored {stored / 1e6:5.1f} MB",
          flush=True)

MID = from_hf_dict(dict(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=1024, rope_theta=1e6), name="mid")
for quantize in (None, "int8-experts", "int4-experts"):
    r = plan.dry_run(MID, "expert=1", batch=8, max_seq_len=256, prompt_len=16, topology="v5e:1x1", quantize=quantize)
    held = r["params_bytes_per_device"] + r["kv_cache_bytes_per_device"]
    print(f"decode step, experts {quantize or 'bfloat16'}: HBM {r['decode_hbm_bytes_per_device'] / 1e6:.0f} MB for "
          f"{held / 1e6:.0f} MB held ({r['decode_hbm_bytes_per_device'] / held:.2f}x)", flush=True)
