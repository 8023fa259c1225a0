"""Mesh axes, the one logical-axis rule table, and mesh helpers.

Every weight, activation and cache dimension is named by a logical axis (the
dimension legend of DESIGN.md); `RULES` maps each logical axis to a mesh axis
(or to None: replicated). Nothing else in the library names mesh axes for
parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "tensor")

# Logical axis -> mesh axis. The single source of truth for placement.
RULES: dict[str, str | None] = {
    "layers": None,     # L: scanned, never sharded
    "batch": "data",    # B
    "seq": None,        # T / S
    "embed": None,      # D
    "heads": "tensor",  # H
    "kv_heads": "tensor",  # K (replicated instead when kv_heads < tensor; see spec_for)
    "head_dim": None,   # Dh
    "experts": "expert",  # E
    "ffn": "tensor",    # F
    "vocab": "tensor",  # V
}


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """Maps logical axis names to a PartitionSpec using `RULES`.

    A mesh axis is used at most once per array (a collision raises). When `mesh`
    and `shape` are given, an axis whose size the mesh axis does not divide
    raises a clear error.
    """
    used, out = set(), []
    for i, name in enumerate(axes):
        mesh_axis = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
        if mesh_axis is not None and mesh is not None and mesh.shape[mesh_axis] == 1:
            mesh_axis = None
        if mesh_axis is not None:
            if mesh_axis in used:
                raise ValueError(f"mesh axis {mesh_axis!r} used twice in logical axes {tuple(axes)}")
            used.add(mesh_axis)
            if shape is not None and mesh is not None and shape[i] % mesh.shape[mesh_axis]:
                raise ValueError(
                    f"the mesh's {mesh_axis}={mesh.shape[mesh_axis]} does not divide {name} of size "
                    f"{shape[i]}; choose a mesh whose {mesh_axis} axis divides {shape[i]}.")
        out.append(mesh_axis)
    return P(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding for an array with the given logical axes on `mesh`."""
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape))


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parses "data=2,expert=4,tensor=1" into {axis: size}; omitted axes are 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    spec = (spec or "").strip()
    if not spec:
        return sizes
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if not m or m.group(1) not in sizes:
            raise ValueError(
                f"bad mesh spec {spec!r}: write axis=size pairs separated by commas, axes from "
                f"{', '.join(MESH_AXES)} (e.g. 'expert=4,tensor=2').")
        sizes[m.group(1)] = int(m.group(2))
        if sizes[m.group(1)] < 1:
            raise ValueError(f"bad mesh spec {spec!r}: axis sizes must be positive.")
    return sizes


def make_mesh(spec: str = "", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a Mesh with axes (data, expert, tensor) from a spec like "expert=4,tensor=2".

    Omitted axes are 1. The product of the sizes must equal the number of devices.
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(sizes.values())
    if n != len(devices):
        raise ValueError(
            f"mesh {spec!r} has {n} devices but {len(devices)} are available; make the product of "
            f"the axis sizes equal {len(devices)}.")
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils
        dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - CPU/virtual devices: plain order is fine
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES)
