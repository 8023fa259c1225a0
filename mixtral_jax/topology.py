"""TPU topologies by name, their published chip figures, and compile-only TPU devices from libtpu.

A topology is named as jax and MaxText name it: the TPU generation and its
chip grid, e.g. "v5e:1x1", "v5e:2x4", "v5e:8x8", "v6e:4x4" (2-D tori of
one-TensorCore chips) or "v4:2x2x1", "v5p:4x4x4" (3-D, two TensorCores
per chip run as one "megacore" device). `tpu_devices(name)` asks libtpu
for the devices of that slice without any TPU present (what MaxText's
train_compile.py does); arrays sharded over them can be lowered and
compiled, never run.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Cloud TPU system architecture pages, see docs/planning.md)."""

    name: str
    bf16_flops: float      # peak dense bf16 FLOP/s
    hbm_bytes_per_s: float  # HBM bandwidth
    ici_bytes_per_s: float  # bidirectional inter-chip interconnect bandwidth, all links of one chip
    hbm_gib: float          # HBM capacity, GiB
    dims: int               # torus dimensions of a slice (2 or 3)
    chip_config: str        # libtpu's chip_config_name: one device per chip either way


# Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p-training,v6e}. v4's ICI: 6 links of 50 GB/s each way
# (the TPU v4 paper, Jouppi et al., ISCA 2023); the others are the pages' "bidirectional ICI
# bandwidth per chip". v5e's page says 16 GB, v6e's 32 GB; both are 16 and 32 GiB chips.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 1200e9, 600e9, 32, 3, "megacore"),
    "v5e": Chip("v5e", 197e12, 819e9, 400e9, 16, 2, "default"),
    "v5p": Chip("v5p", 459e12, 2765e9, 1200e9, 95, 3, "megacore"),
    "v6e": Chip("v6e", 918e12, 1638e9, 800e9, 32, 2, "default"),
}

# PCI device ids of TPU chips (vendor 0x1ae0, Google), as jax's hardware_utils lists them.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """One TPU slice: generation and chip grid."""

    chip: Chip
    grid: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.grid))}"

    @property
    def num_chips(self) -> int:
        return math.prod(self.grid)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Which axes have wraparound links: v4/v5p slices of whole 4x4x4 cubes are tori;
        v5e/v6e axes of 16 chips (a full pod side) wrap."""
        grid3 = tuple(self.grid) + (1,) * (3 - len(self.grid))
        if self.chip.dims == 3:
            torus = all(d % 4 == 0 for d in grid3)
            return (torus,) * 3
        return tuple(d == 16 for d in grid3[:2]) + (False,)

    @property
    def chips_per_host(self) -> tuple[int, int, int]:
        """Chips of one host along each axis (2x2x1 hosts, fewer in a smaller slice), as MaxText sets them."""
        grid3 = tuple(self.grid) + (1,) * (3 - len(self.grid))
        return (min(grid3[0], 2), min(grid3[1], 2), 1)


def parse_topology(name: str) -> Topology:
    """Parses "v5e:2x4", "v5p:4x4x4", "v4:2x2x1", ... into a Topology; ValueError naming the format otherwise."""
    m = re.fullmatch(r"\s*(v4|v5e|v5p|v6e)\s*:\s*(\d+(?:x\d+)*)\s*", name or "")
    if m:
        chip = CHIPS[m.group(1)]
        grid = tuple(int(d) for d in m.group(2).split("x"))
        if len(grid) == chip.dims and all(d >= 1 for d in grid):
            return Topology(chip, grid)
        shape = "AxB" if chip.dims == 2 else "AxBxC"
        raise ValueError(f"topology {name!r}: {chip.name} slices are {chip.dims}-D, write {chip.name}:{shape} "
                         f"(e.g. {'v5e:2x4' if chip.dims == 2 else chip.name + ':2x2x1'}).")
    raise ValueError(f"unknown topology {name!r}; write GENERATION:GRID with GENERATION one of "
                     f"{', '.join(CHIPS)}, e.g. v5e:1x1, v5e:2x4, v5e:8x8, v6e:4x4, v4:2x2x1, v5p:4x4x4.")


def tpu_visible() -> bool:
    """Whether a TPU chip is attached to this machine (on its PCI bus)."""
    for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_path) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor_path), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def quiet_libtpu_without_tpu(env=os.environ) -> None:
    """Where no TPU chip is attached, tells libtpu so before it starts: no metadata-server queries
    and no warnings on stderr about unknown TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES.

    Call before JAX starts its backends. Compile targets come from the topology
    description, not from these variables (compiles with different values give
    identical programs); on a TPU VM nothing is changed.
    """
    if tpu_visible():
        return
    env.setdefault("TPU_SKIP_MDS_QUERY", "1")
    env.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: Topology | str):
    """The devices of a TPU slice for ahead-of-time compiles, with no TPU attached.

    Returns:
      A list of `jax.Device`s (platform "tpu") to build a Mesh over; programs
      sharded over them compile (`jit(...).lower(...).compile()`) but cannot run.

    Raises:
      ValueError: a bad topology name, or libtpu missing (install the `tpu` extra).
    """
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    if not libtpu_installed():
        raise ValueError(f"--topology {topo.name} compiles with the TPU compiler, which comes with libtpu; "
                         "install it with pip install -e \".[tpu]\" (or plan on CPU devices without --topology).")
    # A compile-only client may share the host with others (tests in parallel, a notebook holding the TPU).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name,
                                        chip_config_name=topo.chip.chip_config,
                                        chips_per_host_bounds=topo.chips_per_host, num_slices=1, wrap=topo.wrap)
    return list(desc.devices)
