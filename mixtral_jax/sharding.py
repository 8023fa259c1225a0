"""Mesh axes, the one logical-axis rule table and mesh helpers (multi-process start-up: distributed.py).

Every weight, activation and cache dimension is named by a logical axis (the
table in docs/sharding.md); `RULES` maps each logical axis to mesh axes
(or to None: replicated). Nothing else in the library names mesh axes for
arrays; only the expert-parallel dispatch in moe.py runs collectives over them.

The batch is split over `data` and then `expert`: attention and the KV cache
are data-parallel across the expert axis too, instead of being repeated on
every expert shard (the attention weights are; they are small next to the
experts). The MoE keeps that split: each expert exchange runs over `expert`
between devices of the same tensor rank, and the F-partials are summed over `tensor`.

Sizes the mesh does not divide:
  experts, heads, ffn   a ValueError naming the axis and a mesh that works;
  kv_heads              replicated over `tensor` (each tensor shard keeps all
                        K kv heads; its query heads read the ones they need),
                        e.g. 8x7B's 8 kv heads on tensor=16;
  batch                 split over as many of (data, expert) as divide it, in
                        that order, else replicated (a decode batch of 1);
  vocab                 replicated (a vocab of 32001 on tensor=2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixtral_jax.config import MixtralConfig

MESH_AXES = ("data", "expert", "tensor")

# Logical axis -> mesh axes. The single source of truth for placement.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,         # L: scanned, never sharded
    "batch": ("data", "expert"),  # B
    "seq": None,            # T / S
    "embed": None,          # D
    "heads": "tensor",      # H
    "kv_heads": "tensor",   # K
    "head_dim": None,       # Dh
    "experts": "expert",    # E
    "ffn": "tensor",        # F
    "vocab": "tensor",      # V
}

# Logical axes that fall back to fewer mesh axes (in the end none) when their mesh axes do not divide them.
REPLICATED_IF_INDIVISIBLE = frozenset({"kv_heads", "batch", "vocab"})

# Config fields behind the logical axes a mesh must divide (named in errors).
CONFIG_FIELDS = {"experts": "num_local_experts", "heads": "num_attention_heads", "ffn": "intermediate_size"}

# KV cache layout (generate.init_cache): k, v [L, B, K, S, Dh]; pos [B, S] (-1 = empty slot).
# Heads before slots: the attention dots batch over (B, K), so no transpose of the cache.
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "batch", "kv_heads", "seq", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "seq", "head_dim"),
    "pos": ("batch", "seq"),
}


def logical_to_spec(axes: Sequence[str | None], mesh=None, shape: Sequence[int] | None = None) -> P:
    """Maps logical axis names to a PartitionSpec using `RULES`.

    Args:
      axes: one logical name (or None) per array dimension.
      mesh: a Mesh or AbstractMesh; if given, mesh axes of size 1 are dropped.
      shape: if given with `mesh`, sizes are checked: an axis in
        `REPLICATED_IF_INDIVISIBLE` keeps the longest prefix of its mesh axes
        whose sizes divide it; any other indivisible axis raises ValueError.

    Returns:
      The PartitionSpec (one entry per dimension: a mesh axis, a tuple of them, or None).
    """
    used, out = set(), []
    for i, name in enumerate(axes):
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES; add one there.")
        rule = RULES[name] if name is not None else None
        mesh_axes = () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            if shape is not None and mesh_axes and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                if name not in REPLICATED_IF_INDIVISIBLE:
                    axis = mesh_axes[0]  # every rule that must divide names one mesh axis
                    size = mesh.shape[axis]
                    what = f"{CONFIG_FIELDS[name]}={shape[i]}" if name in CONFIG_FIELDS else f"{name} of size {shape[i]}"
                    raise ValueError(
                        f"the mesh's {axis}={size} does not divide {what}; choose {axis} from "
                        f"{_sizes_dividing(shape[i])}.")
                while mesh_axes and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                    mesh_axes = mesh_axes[:-1]
        for a in mesh_axes:
            if a in used:
                raise ValueError(f"mesh axis {a!r} used twice in logical axes {tuple(axes)}.")
            used.add(a)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding for an array with the given logical axes (and shape, if known) on `mesh`."""
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape))


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding by its logical axes (identity without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))


def cache_shapes(cfg: MixtralConfig, batch: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the KV cache entries: k, v [L, B, K, S, Dh]; pos [B, S]."""
    kv = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return {"k": kv, "v": kv, "pos": (batch, max_len)}


def cache_shardings(cfg: MixtralConfig, batch: int, max_len: int, mesh: Mesh) -> dict[str, NamedSharding]:
    """NamedSharding of each KV-cache entry on `mesh` (batch over data, kv heads over tensor)."""
    shapes = cache_shapes(cfg, batch, max_len)
    return {name: named_sharding(mesh, CACHE_AXES[name], shapes[name]) for name in CACHE_AXES}


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parses "data=2,expert=4,tensor=1" into {axis: size}; omitted axes are 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    spec = (spec or "").strip()
    if not spec:
        return sizes
    seen = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if not m or m.group(1) not in sizes or m.group(1) in seen:
            raise ValueError(
                f"bad mesh spec {spec!r}: write axis=size pairs separated by commas, each axis once, from "
                f"{', '.join(MESH_AXES)} (e.g. 'expert=4,tensor=2').")
        seen.add(m.group(1))
        sizes[m.group(1)] = int(m.group(2))
        if sizes[m.group(1)] < 1:
            raise ValueError(f"bad mesh spec {spec!r}: axis sizes must be positive.")
    return sizes


def _sizes_dividing(n: int) -> str:
    """"1, 2, 4 or 8": every size that divides n."""
    sizes = [str(d) for d in range(1, n + 1) if n % d == 0]
    return sizes[0] if len(sizes) == 1 else f"{', '.join(sizes[:-1])} or {sizes[-1]}"


def make_mesh(spec: str = "", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a Mesh with axes (data, expert, tensor) from a spec like "expert=4,tensor=2".

    Args:
      spec: comma-separated axis=size pairs; omitted axes are 1.
      devices: the devices to use (default: every device of every process).

    Returns:
      A `jax.sharding.Mesh` whose axis sizes multiply to the device count.
      `tensor` is the fastest-varying axis, so tensor-parallel peers are
      neighbours (same host); `data` the slowest (across hosts). On TPU
      slices the axes follow the physical torus (jax's mesh_utils), `tensor`
      getting the most links; a mesh axis that no set of whole physical axes
      matches (expert=8,tensor=8 on a 4x4x4 torus) splits a physical axis.
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(sizes.values())
    if n != len(devices):
        raise ValueError(
            f"mesh {spec!r} has {n} devices but {len(devices)} are available; make the product of "
            f"the axis sizes equal {len(devices)}, each from {_sizes_dividing(len(devices))}.")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True), MESH_AXES)


def check_mesh(cfg: MixtralConfig, mesh: Mesh) -> None:
    """Raises one clear ValueError if `mesh` cannot shard `cfg`'s experts, heads or expert hidden size."""
    for name, size in (("experts", cfg.num_local_experts), ("heads", cfg.num_attention_heads),
                       ("ffn", cfg.intermediate_size)):
        logical_to_spec((name,), mesh, (size,))

