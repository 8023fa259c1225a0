"""Dry run: will this model fit this mesh? AOT-compile prefill and decode on abstract arrays.

Nothing is allocated: parameters and the KV cache are `jax.ShapeDtypeStruct`s
carrying their shardings, `generate.prefill` and `generate.decode_step` are
lowered and compiled for a mesh of virtual CPU devices, and XLA's
`memory_analysis()` gives the per-device temporaries. Parameter and cache bytes
per device are exact (each array's bytes over its number of shards).

The compile is in float32 whatever `dtype` is: XLA:CPU has no bf16 matmul, so
a bf16 compile converts whole stacked weights to f32 up front (2× the weights
in temporaries, which TPU and GPU never allocate). Float32 temporaries are an
upper bound for bf16 (activations at most twice as large, attention softmax is
float32 in both).

The virtual devices must exist before JAX starts its CPU backend: a CLI calls
`ensure_virtual_devices(n)` first; `dry_run` called later in a process that
has too few devices re-runs itself in a fresh Python process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from mixtral_jax import model as model_lib, sharding
from mixtral_jax.generate import SamplingParams, decode_step, prefill
from mixtral_jax.config import MixtralConfig, load_config

DEFAULT_PROMPT_LEN = 2048
GIB = 2**30


def mesh_size(mesh_spec: str) -> int:
    """Number of devices a mesh spec like "expert=8,tensor=8" needs."""
    return math.prod(sharding.parse_mesh_spec(mesh_spec).values())


def ensure_virtual_devices(n: int) -> bool:
    """Asks JAX for `n` virtual CPU devices; call before any JAX computation.

    Returns:
      True if the setting took effect, False if JAX's backends were already
      running (then `dry_run` plans in a subprocess instead).
    """
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        return False
    return True


def _bytes_per_device(abstract_tree) -> int:
    """Sum over arrays of itemsize × elements of one shard (shardings divide evenly here)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract_tree))


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    return {"argument": stats.argument_size_in_bytes, "temp": stats.temp_size_in_bytes}


def dry_run(cfg: MixtralConfig | str, mesh_spec: str, batch: int = 1, max_seq_len: int | None = None,
            prompt_len: int | None = None, dtype: str = "bfloat16", device_memory_gb: float | None = None,
            capacity_factor: float | None = None) -> dict[str, Any]:
    """Plans per-device memory of serving `cfg` on `mesh_spec`, allocating nothing.

    Args:
      cfg: a config or anything `load_config` takes ("8x22b", a path).
      mesh_spec: e.g. "expert=8,tensor=8" (axes data, expert, tensor).
      batch: sequences decoded together (B).
      max_seq_len: KV-cache length S (default: the model's max positions).
      prompt_len: prefill length T (default: min(S, 2048)); prefill attends over its own T slots.
      dtype: parameter and cache dtype.
      device_memory_gb: memory per device in GiB (2**30 bytes) to check against.
      capacity_factor: expert-parallel capacity (None: dropless).

    Returns:
      A JSON-able dict: devices, params_bytes_per_device, kv_cache_bytes_per_device,
      temp_bytes_per_device (the larger of prefill's and decode's), total_bytes_per_device,
      fits (None without device_memory_gb), and the inputs and per-step details.
    """
    cfg = cfg if isinstance(cfg, MixtralConfig) else load_config(cfg)
    n = mesh_size(mesh_spec)
    max_seq_len = cfg.max_position_embeddings if max_seq_len is None else max_seq_len
    prompt_len = min(max_seq_len, DEFAULT_PROMPT_LEN) if prompt_len is None else prompt_len
    if not 1 <= prompt_len <= max_seq_len:
        raise ValueError(f"prompt_len {prompt_len} must be between 1 and max_seq_len {max_seq_len}.")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}.")
    sizes = sharding.parse_mesh_spec(mesh_spec)
    sharding.check_mesh(cfg, jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes)))
    if len(jax.devices("cpu")) < n:
        return _dry_run_in_subprocess(cfg, mesh_spec, n, batch=batch, max_seq_len=max_seq_len,
                                      prompt_len=prompt_len, dtype=dtype, device_memory_gb=device_memory_gb,
                                      capacity_factor=capacity_factor)

    mesh = sharding.make_mesh(mesh_spec, jax.devices("cpu")[:n])
    dtype = jnp.dtype(dtype)
    cache_shardings = sharding.cache_shardings(cfg, batch, max_seq_len, mesh)

    def abstract(dt):
        params = model_lib.abstract_params(cfg, dt, mesh)
        cache = {name: jax.ShapeDtypeStruct(shape, jnp.int32 if name == "pos" else dt, sharding=cache_shardings[name])
                 for name, shape in sharding.cache_shapes(cfg, batch, max_seq_len).items()}
        return params, cache

    params, cache = abstract(dtype)
    params32, cache32 = abstract(jnp.float32)

    def ids(shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.named_sharding(
            mesh, ("batch", "seq")[:len(shape)], shape))

    key = jax.eval_shape(lambda: jax.random.key(0))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    static = dict(cfg=cfg, strategy="sparse", sampling=SamplingParams(), mesh=mesh,
                  capacity_factor=capacity_factor)
    t0 = time.perf_counter()
    prefill_compiled = prefill.lower(params32, ids((batch, prompt_len)), ids((batch, prompt_len)), cache32, key,
                                     **static).compile()
    t1 = time.perf_counter()
    decode_compiled = decode_step.lower(params32, ids((batch,)), ids((batch,)), scalar, cache32, key, scalar,
                                        **static).compile()
    t2 = time.perf_counter()

    params_bytes = _bytes_per_device(params)
    cache_bytes = _bytes_per_device(cache)
    prefill_mem, decode_mem = _memory(prefill_compiled), _memory(decode_compiled)
    temp = max(prefill_mem["temp"], decode_mem["temp"])
    total = params_bytes + cache_bytes + temp
    return {
        "config": cfg.name, "mesh": dict(mesh.shape), "devices": n, "dtype": dtype.name, "batch": batch,
        "max_seq_len": max_seq_len, "prompt_len": prompt_len, "capacity_factor": capacity_factor,
        "params_bytes_per_device": params_bytes,
        "params_bytes_total": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params)),
        "kv_cache_bytes_per_device": cache_bytes,
        "temp_bytes_per_device": temp,
        "prefill_temp_bytes_per_device": prefill_mem["temp"],
        "decode_temp_bytes_per_device": decode_mem["temp"],
        "total_bytes_per_device": total,
        "device_memory_gb": device_memory_gb,
        "fits": None if device_memory_gb is None else total <= device_memory_gb * GIB,
        "temp_compiled_as": "float32",
        "xla_float32_argument_bytes_per_device": {"prefill": prefill_mem["argument"], "decode": decode_mem["argument"]},
        "compile_seconds": {"prefill": round(t1 - t0, 1), "decode": round(t2 - t1, 1)},
    }


def _dry_run_in_subprocess(cfg: MixtralConfig, mesh_spec: str, n: int, **kwargs) -> dict[str, Any]:
    """Runs `dry_run` in a fresh interpreter that starts with `n` virtual CPU devices."""
    code = ("import json, sys\n"
            "from mixtral_jax import plan\n"
            "from mixtral_jax.config import from_hf_dict\n"
            "args = json.loads(sys.stdin.read())\n"
            "assert plan.ensure_virtual_devices(args['n'])\n"
            "cfg = from_hf_dict(args['cfg'], name=args['name'])\n"
            "print(json.dumps(plan.dry_run(cfg, args['mesh_spec'], **args['kwargs'])))\n")
    args = {"n": n, "cfg": cfg.to_hf_dict(), "name": cfg.name, "mesh_spec": mesh_spec, "kwargs": kwargs}
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps(args), capture_output=True, text=True,
                            env=env, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the dry run subprocess for mesh {mesh_spec!r} failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(plan: dict[str, Any]) -> str:
    """A few human-readable lines for a `dry_run` result."""
    gib = lambda b: f"{b / GIB:.2f} GiB"
    mesh = ",".join(f"{k}={v}" for k, v in plan["mesh"].items() if v > 1) or "one device"
    lines = [
        f"{plan['config']} {plan['dtype']} on {plan['devices']} devices ({mesh}), batch {plan['batch']}, "
        f"KV cache {plan['max_seq_len']} tokens, prefill {plan['prompt_len']} tokens:",
        f"  params      {gib(plan['params_bytes_per_device'])} per device",
        f"  KV cache    {gib(plan['kv_cache_bytes_per_device'])} per device",
        f"  temporaries {gib(plan['temp_bytes_per_device'])} per device (prefill "
        f"{gib(plan['prefill_temp_bytes_per_device'])}, decode {gib(plan['decode_temp_bytes_per_device'])}; "
        "XLA:CPU, float32 compile)",
        f"  total       {gib(plan['total_bytes_per_device'])} per device",
    ]
    if plan["fits"] is not None:
        lines.append(f"  {'fits' if plan['fits'] else 'does NOT fit'} in {plan['device_memory_gb']} GiB per device")
    return "\n".join(lines)
