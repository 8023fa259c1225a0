"""Orbax checkpoints of the parameter tree: save, sharded restore, and a streaming writer.

A checkpoint directory holds an Orbax PyTree checkpoint of the parameters
(layout in model.py's docstring) plus our `config.json`, so `load(dir)` needs
nothing else. On disk it is what Orbax's StandardCheckpointer writes by default:
one OCDBT key-value store (`manifest.ocdbt`, `d/`) holding a zarr v2 array per
parameter under the key `layers.w1` etc., and the tree in `_METADATA`.

`ArrayWriter` writes that format slice by slice with TensorStore, so the HF
converter can fill the stacked [L, ...] arrays one layer at a time without ever
holding the whole model; `load` then restores it with a plain Orbax restore.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging as absl_logging
from jax.sharding import SingleDeviceSharding

from mixtral_jax import ckpt_files, cpu_kernel, layout as layout_lib, model as model_lib, quant
from mixtral_jax.ckpt_files import CheckpointError
from mixtral_jax.config import CONFIG_FILE, MixtralConfig, load_config
from mixtral_jax.model import Mixtral, abstract_params

# Chunks at most this big: a sharded restore reads whole chunks, so it should not read
# a 200 MB expert matrix for a tensor-parallel slice of it; and the converter writes
# vocab-sized tensors one chunk of rows at a time, so this also bounds its blocks.
CHUNK_BYTES = 16 * 2**20
# `write` waits while more than this many bytes (or more than the newest write) are
# not yet committed. TensorStore holds each pending value plus its encoded copy, so
# this bounds the writer's memory; 32 MiB already keeps reading and compressing overlapped.
MAX_INFLIGHT_BYTES = 32 * 2**20

# The files Orbax's StandardCheckpointer writes besides the array data (checked against orbax 0.12.8).
_METADATA_FILE = "_METADATA"
_CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
_ARRAY_METADATA_FILE = os.path.join("array_metadatas", "process_0")
_ITEM_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
_DICT_KEY = 2  # orbax KeyType.DICT

# Orbax's own OCDBT settings (tensorstore_utils._build_ocdbt_kvstore_tspec): inline
# small values (.zarray), one large root node, single-file manifest.
_OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000,
                 "manifest_kind": "single"}


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """Nested dict -> {("layers", "w1"): leaf, ...}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def chunk_shape(shape: tuple[int, ...], itemsize: int, stacked_dims: int) -> tuple[int, ...]:
    """The zarr chunk shape for an array: one index of each stacked (L, E) dim, at most CHUNK_BYTES.

    Args:
        shape: the array's shape.
        itemsize: bytes per element.
        stacked_dims: how many leading dims are written one index at a time (L, or L and E).

    Returns:
        A chunk shape; every non-stacked dim is the full size or a power-of-two fraction of it.
    """
    chunk = [1] * stacked_dims + list(shape[stacked_dims:])
    while math.prod(chunk) * itemsize > CHUNK_BYTES:
        even = [i for i in range(stacked_dims, len(chunk)) if chunk[i] % 2 == 0]
        if not even:
            break
        i = max(even, key=lambda i: chunk[i])
        chunk[i] //= 2
    return tuple(chunk)


def target_arrays(cfg: MixtralConfig, dtype: np.dtype, expert_dtype=None,
                  quantize: str | None = None) -> dict[tuple[str, ...], "ArraySpec"]:
    """The checkpoint's arrays: shapes from param_specs, dtypes from `model.param_dtypes` (or quant.py's
    qvalue and scale); chunks of one layer (and one expert)."""
    arrays = {}
    dtypes = flatten(model_lib.abstract_params(cfg, dtype, expert_dtype=expert_dtype, quantize=quantize))
    for path, spec in flatten(model_lib.param_specs(cfg, quantize)).items():
        stacked = ("layers" in spec.axes) + ("experts" in spec.axes)
        dt = np.dtype(dtypes[path].dtype)
        arrays[path] = ArraySpec(spec.shape, dt, chunk_shape(spec.shape, dt.itemsize, stacked))
    return arrays


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array of a checkpoint being written: shape, dtype and zarr chunk shape."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]


class ArrayWriter:
    """Writes a parameter tree into an Orbax checkpoint directory, one slice at a time.

    At most MAX_INFLIGHT_BYTES of written data (or the newest write alone) wait
    for TensorStore at once, so memory stays bounded whatever the model size. Call `close()` to wait for all
    writes and write the metadata; only then is the directory a checkpoint.
    """

    def __init__(self, directory: str | os.PathLike, arrays: Mapping[tuple[str, ...], ArraySpec]):
        """Creates every array (metadata only) in the empty directory `directory`.

        Args:
            directory: an existing empty directory.
            arrays: tree path (e.g. ("layers", "w1")) -> ArraySpec.
        """
        self.directory = os.path.abspath(os.fspath(directory))
        self.arrays = dict(arrays)
        self._inflight: collections.deque = collections.deque()
        self._inflight_bytes = 0
        self._init_ns = time.time_ns()
        # One context: every array shares one OCDBT writer, as in an Orbax save.
        self._context = ts.Context({"file_io_concurrency": {"limit": 128},
                                    "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
        base = {"driver": "file", "path": self.directory + "/"}
        kvstore = {"driver": "ocdbt", "base": {**base, "file_io_locking": {"mode": "non_atomic"}},
                   "manifest": base, "cache_pool": "cache_pool#ocdbt", "config": _OCDBT_CONFIG,
                   "assume_config": True}
        self._stores = {}
        for path, spec in self.arrays.items():
            self._stores[path] = ts.open({
                "driver": "zarr",
                "kvstore": {**kvstore, "path": ".".join(path)},
                "metadata": {"shape": list(spec.shape), "chunks": list(spec.chunks),
                             "dtype": _zarr_dtype(spec.dtype),
                             "compressor": {"id": "zstd", "level": 1}},
                "create": True,
            }, context=self._context).result()

    def write(self, path: tuple[str, ...], index, value: np.ndarray) -> None:
        """Writes `value` into array `path` at `index` (ints / slices), asynchronously.

        Regions should cover whole chunks: TensorStore then never reads back.
        """
        spec = self.arrays[path]
        if value.dtype != spec.dtype:
            raise TypeError(f"writing {value.dtype} into {'/'.join(path)} of dtype {spec.dtype}")
        future = self._stores[path][index].write(value)
        self._inflight.append((future, value.nbytes))
        self._inflight_bytes += value.nbytes
        while self._inflight_bytes > MAX_INFLIGHT_BYTES and len(self._inflight) > 1:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self._inflight.popleft()
        future.result()
        self._inflight_bytes -= nbytes

    def abort(self) -> None:
        """Waits for pending writes, ignoring their errors, so none lands after the caller deletes the directory."""
        for future, _ in self._inflight:
            try:
                future.result()
            except Exception:  # the caller is already handling the error that made it abort
                pass
        self._inflight.clear()
        self._inflight_bytes = 0

    def close(self) -> None:
        """Waits for every write, then writes Orbax's metadata files."""
        while self._inflight:
            self._wait_oldest()
        tree = {str(path): {"key_metadata": [{"key": k, "key_type": _DICT_KEY} for k in path],
                            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                               "write_shape": list(spec.shape)}}
                for path, spec in self.arrays.items()}
        _write_json(os.path.join(self.directory, _METADATA_FILE), {
            "tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
            # Orbax then raises on a chunk that was never written instead of reading zeros.
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
        # Written by one process, so every array's metadata is process 0's, as Orbax expects.
        os.makedirs(os.path.join(self.directory, os.path.dirname(_ARRAY_METADATA_FILE)))
        _write_json(os.path.join(self.directory, _ARRAY_METADATA_FILE), {"array_metadatas": [
            {"array_metadata": {"param_name": ".".join(path), "write_shape": list(spec.shape),
                                "chunk_shape": list(spec.chunks), "ext_metadata": None}}
            for path, spec in self.arrays.items()]})
        _write_json(os.path.join(self.directory, _CHECKPOINT_METADATA_FILE), {
            "item_handlers": _ITEM_HANDLER, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": self._init_ns, "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {}})


def _zarr_dtype(dtype: np.dtype) -> str:
    # zarr v2 spells bfloat16 by name (TensorStore's extension); others by numpy typestr.
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_config(cfg: MixtralConfig, ckpt_dir: str | os.PathLike) -> None:
    """Writes our config.json (HF field names) into a checkpoint directory."""
    _write_json(os.path.join(os.fspath(ckpt_dir), CONFIG_FILE), cfg.to_hf_dict())


def save(model: Mixtral, ckpt_dir: str | os.PathLike, overwrite: bool = False) -> str:
    """Saves an in-memory model as an Orbax checkpoint directory that `load` reads.

    The checkpoint is always in the stacked layout. A per_expert model is
    written slice by slice into the stacked arrays (no stacked copy in memory).
    It is built beside `ckpt_dir` and swapped in complete, with the
    digests `load` verifies (`ckpt_dir`).

    Args:
        model: a `Mixtral` (sharded or not; each process writes its own shards).
        ckpt_dir: directory to create.
        overwrite: replace an existing checkpoint there (never a directory that is not one).

    Returns:
        The absolute checkpoint path.
    """
    path = os.path.abspath(os.fspath(ckpt_dir))
    if jax.process_count() > 1:
        return _save_multiprocess(model, path, overwrite)
    ckpt_files.check_destination(path, overwrite)
    with ckpt_files.staged(path) as built:
        _write_model(model, built)
    return path


def _write_model(model: Mixtral, path: str) -> None:
    """Writes the model's arrays and config.json into the new directory `path` (every process)."""
    params = model.params()
    if model.layout == "per_expert":
        os.makedirs(path)
        quantized = model.quantization
        _write_per_expert(params, model.cfg, np.dtype(model.dtype), path,
                          None if quantized else np.dtype(model.expert_dtype), quantized)
    else:
        with _quiet_orbax():
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(path, params)
            checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        write_config(dataclasses.replace(model.cfg, dtype=str(model.dtype)), path)


def _save_multiprocess(model: Mixtral, path: str, overwrite: bool) -> str:
    """`save` on several processes: all write their shards into one staging directory; process 0 swaps it in."""
    from jax.experimental import multihost_utils

    leader = jax.process_index() == 0
    if leader:
        ckpt_files.check_destination(path, overwrite)
    token = int(multihost_utils.broadcast_one_to_all(np.int32(time.time_ns() % 2**31)))
    staging = f"{path}.tmp-mp{token}"
    built = os.path.join(staging, "checkpoint")
    if leader:
        os.makedirs(staging)
        ckpt_files.mark_ours(staging)
    multihost_utils.sync_global_devices("mixtral_jax.save.staging")
    _write_model(model, built)
    multihost_utils.sync_global_devices("mixtral_jax.save.written")
    if leader:
        ckpt_files.write_digests(built)
        aside = f"{path}.old-mp{token}"
        if os.path.isdir(path):
            os.rename(path, aside)
        os.rename(built, path)
        for leftover in (aside, staging):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
    multihost_utils.sync_global_devices("mixtral_jax.save.done")
    return path


def _write_per_expert(params, cfg: MixtralConfig, dtype: np.dtype, directory: str, expert_dtype: np.dtype | None,
                      quantize: str | None = None) -> None:
    """Streams per_expert params into the stacked checkpoint arrays, one layer / expert at a time."""
    writer = ArrayWriter(directory, target_arrays(cfg, dtype, expert_dtype, quantize))
    try:
        # A quantized weight {"qvalue", "scale"} is two arrays, at path + ("qvalue",) and + ("scale",).
        parts = lambda w, path: flatten(w, path) if isinstance(w, Mapping) else {path: w}
        for name in ("embed", "final_norm", "lm_head"):
            for key, part in parts(layout_lib.stacked_global(params, name), (name,)).items():
                writer.write(key, (), np.asarray(part))
        layer_names = list(model_lib.param_specs(cfg)["layers"])
        for l in range(cfg.num_hidden_layers):
            for name in layer_names:
                if name in model_lib.EXPERT_PARAMS:
                    for e in range(cfg.num_local_experts):
                        for key, part in parts(layout_lib.layer_slice(params, cfg, name, l, e), ("layers", name)).items():
                            writer.write(key, (l, e), np.asarray(part))
                else:
                    for key, part in parts(layout_lib.layer_slice(params, cfg, name, l), ("layers", name)).items():
                        writer.write(key, (l,), np.asarray(part))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def load(ckpt_dir: str | os.PathLike, dtype="bfloat16", mesh=None, layout: str | None = None,
         expert_dtype=None, verify: bool = True, quantize: str | None = None) -> Mixtral:
    """Restores a checkpoint written by `convert_hf_checkpoint` or `save`.

    Every array is read straight into its target sharding and cast to `dtype`
    while reading, so no device (or host) ever holds a full copy of a sharded weight.

    Args:
        ckpt_dir: checkpoint directory (Orbax arrays + config.json + digests.json).
        dtype: parameter dtype after loading, whatever dtype was stored.
        mesh: optional `jax.sharding.Mesh`; parameters are placed by the sharding
            rules. Without one, everything goes to the first device.
        layout: "stacked", "per_expert", or None: per_expert on one CPU device,
            stacked otherwise (see `model.py`). per_expert splits each restored
            array in turn, so the peak is the model plus its largest parameter.
        expert_dtype: the experts' w1, w3, w2 in this dtype instead, converted
            at use (`model.param_dtypes`). "bfloat16" with dtype "float32" on
            the CPU: half the memory and decode bytes, float32 arithmetic.
        verify: check every file against the digests written with the
            checkpoint before restoring (one extra read of the files; with
            several processes each reads its share).
        quantize: a quant.MODES mode ("int8", "int4": experts, attention
            projections and lm_head; "int8-experts", "int4-experts": the
            experts only), quantized while restoring (quant.py), each
            device's share of an expert weight one layer at a time, so the
            float weights are never all in memory. A checkpoint written with
            `convert --quantize` restores as stored (None or its own mode).

    Returns:
        A `Mixtral`.

    Raises:
        CheckpointError: the directory is missing, damaged, incomplete, or does
            not match its config.json (one sentence naming the file).
    """
    path = os.path.abspath(os.fspath(ckpt_dir))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist.")
    layout = layout_lib.check(layout, mesh)
    quant.check_mode(quantize)
    if quantize and expert_dtype is not None:
        raise ValueError("expert_dtype and quantize both set the experts' storage; pass one of them.")
    if verify:
        _verify(path)
    for name in (CONFIG_FILE, _METADATA_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path} has no {name}; it is not a complete checkpoint written by convert or "
                                  "save (an unfinished conversion leaves none).")
    try:
        cfg = load_config(path)
    except ValueError as e:
        raise CheckpointError(f"{path}/{CONFIG_FILE} is not a valid config ({e})") from None
    _drop_abandoned_reads()  # before any read: a failing one can leave others that report when they end
    with _quiet_orbax(absl_logging.ERROR):  # a metadata warning would only say what the error below says
        checkpointer = ocp.StandardCheckpointer()
        try:
            item = checkpointer.metadata(path).item_metadata
        except Exception as e:  # noqa: BLE001 -- any storage-layer failure is a damaged checkpoint
            raise _unreadable(path, _failed_read(e)) from None
        if item is None:  # Orbax found no index of the arrays (e.g. manifest.ocdbt gone)
            raise _unreadable(path, "Orbax finds no index of its arrays")
        stored = item.tree
    stored_mode = _stored_quantization(stored)
    if stored_mode and quantize not in (None, stored_mode):
        raise CheckpointError(f"checkpoint {path} holds {stored_mode} weights; load it with quantize={stored_mode!r} "
                              f"(or None), or convert the HF weights again with --quantize {quantize}.")
    mode = quantize or stored_mode
    target = abstract_params(cfg, dtype, mesh, expert_dtype, quantize=mode)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), target)
    nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(target))
    absl_logging.info("restoring %s: %.2f GB of parameters", path, nbytes / 1e9)
    start = time.perf_counter()
    # The weights the mode quantizes that the checkpoint holds as float (all of them for a float checkpoint;
    # the embedding of one converted before int8 and int4 covered it) are quantized while restoring.
    todo = {key: spec for key, spec in model_lib.quantized(mode).items()
            if not isinstance(functools.reduce(lambda t, k: t.get(k, {}), key, stored), Mapping)}
    float_target = abstract_params(cfg, dtype)  # shapes only: what a float checkpoint stores
    expected = {**target, "layers": {**target["layers"]}}
    for key in todo:
        into = functools.reduce(lambda t, k: t[k], key[:-1], expected)
        into[key[-1]] = functools.reduce(lambda t, k: t[k], key, float_target)
    _check_stored_shapes(stored, expected, path)
    with _quiet_orbax():
        try:
            if todo:
                params = _restore_quantizing(path, target, todo)
            else:
                params = checkpointer.restore(path, target)
        except Exception as e:  # noqa: BLE001
            raise _unreadable(path, _failed_read(e)) from None
    seconds = time.perf_counter() - start
    absl_logging.info("restored %s in %.1f s (%.2f GB/s)", path, seconds, nbytes / 1e9 / max(seconds, 1e-9))
    params = layout_lib.get(layout).from_stacked(params)
    cpu_kernel.use_huge_pages(params)
    return Mixtral(cfg, params, mesh)


def _stored_quantization(stored: Mapping) -> str | None:
    """The quant.MODES mode a checkpoint is stored in (convert --quantize), else None."""
    w1 = stored.get("layers", {}).get("w1")
    if not isinstance(w1, Mapping) or "qvalue" not in w1 or "scale" not in w1:
        return None
    experts = "int8" if np.dtype(w1["qvalue"].dtype) == np.int8 else "int4"
    return experts if isinstance(stored.get("lm_head"), Mapping) else f"{experts}-experts"


def _restore_quantizing(path: str, target: Mapping, todo: Mapping) -> dict:
    """Restores a checkpoint with the float weights `todo` names (model.quantized's paths → model.Quantized)
    quantized: everything else through Orbax (a partial restore), each weight of `todo` through
    TensorStore: an expert weight one device shard and one layer at a time, a dense one a layer at a time."""
    rest = {k: v for k, v in target.items() if k != "layers" and (k,) not in todo}
    rest["layers"] = {k: v for k, v in target["layers"].items() if ("layers", k) not in todo}
    params = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=rest, restore_args=ocp.checkpoint_utils.construct_restore_args(rest), partial_restore=True))
    context = ts.Context({"file_io_concurrency": {"limit": 128}})
    for key, spec in todo.items():
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{path}/",
                                                       "path": ".".join(key)}},
                        open=True, read=True, context=context).result()
        into = functools.reduce(lambda t, k: t[k], key[:-1], params)
        goal = functools.reduce(lambda t, k: t[k], key, target)
        if key[-1] in model_lib.EXPERT_PARAMS:
            into[key[-1]] = _quantized_array(store, goal, spec.width)
        else:
            into[key[-1]] = _quantized_dense(store, goal, spec, stacked=key[0] == "layers")
    return params


def _quantized_dense(store, target: Mapping, spec, stacked: bool) -> dict:
    """A dense weight (attention projection [L, ...], lm_head or embedding) quantized as `spec`
    (model.Quantized) into `target`'s {"qvalue", "scale"} shardings: read and quantized on the host a layer
    at a time, then each device's slice placed."""
    if stacked:
        parts = [quant.quantize(store[l].read().result(), *spec) for l in range(store.shape[0])]
        host = {k: np.stack([p[k] for p in parts]) for k in ("qvalue", "scale")}
    else:
        host = quant.quantize(store.read().result(), *spec)
    return {k: jax.make_array_from_callback(v.shape, target[k].sharding, lambda index, v=v: v[index])
            for k, v in host.items()}


def _quantized_array(store, target: Mapping, mode: str) -> dict:
    """One stacked expert weight [L, E, in, out] quantized into `target`'s {"qvalue", "scale"} shardings.

    Each distinct device shard is read one layer at a time with the whole input dimension (an
    int8 scale spans it), quantized on the host, cut to the shard and placed on its devices.
    """
    q, s = target["qvalue"], target["scale"]
    q_index = q.sharding.addressable_devices_indices_map(q.shape)
    s_index = s.sharding.addressable_devices_indices_map(s.shape)
    blocks, q_parts, s_parts = {}, [], []
    for device, qi in q_index.items():
        si = s_index[device]
        key = tuple((sl.start, sl.stop) for sl in (*qi, *si))
        if key not in blocks:
            layers = range(*qi[0].indices(q.shape[0]))
            parts = [quant.quantize(store[l, qi[1], :, qi[3]].read().result(), mode) for l in layers]
            blocks[key] = (np.stack([p["qvalue"][:, qi[2]] for p in parts]),
                           np.stack([p["scale"][:, si[2]] for p in parts]))
        q_parts.append(jax.device_put(blocks[key][0], device))
        s_parts.append(jax.device_put(blocks[key][1], device))
    return {"qvalue": jax.make_array_from_single_device_arrays(q.shape, q.sharding, q_parts),
            "scale": jax.make_array_from_single_device_arrays(s.shape, s.sharding, s_parts)}


def _verify(path: str) -> None:
    """`ckpt_files.verify` on every process, each its share; all raise if any file is bad."""
    count = jax.process_count()
    error = None
    try:
        ckpt_files.verify(path, jax.process_index(), count)
    except CheckpointError as e:
        error = e
    if count > 1:
        from jax.experimental import multihost_utils

        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
        if error is None and failed.any():
            error = CheckpointError(f"checkpoint {path} failed verification on process {int(np.argmax(failed))} "
                                    "(its error names the file); convert or save the checkpoint again.")
    if error is not None:
        raise error


def _unreadable(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} could not be read ({what}); it is damaged or incomplete, convert or "
                           "save it again.")


def _failed_read(e: Exception) -> str:
    """What a storage-layer error says failed: the array, where TensorStore names it, else its first line."""
    text = str(e)
    # TensorStore's error carries its spec: the array's own path is the one relative 'path' in it.
    arrays = re.findall(r"'path': '([^/'][^']*?)/?'", text)
    return f"array {arrays[0]}" if arrays else f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0][:200]}"


def _check_stored_shapes(stored: Mapping, target: Mapping, path: str) -> None:
    """Raises if the stored arrays are not exactly the ones `config.json` implies."""
    stored, target = flatten(stored), flatten(target)
    missing = sorted(target.keys() - stored.keys())
    if missing:
        raise CheckpointError(f"checkpoint {path} has no parameter {'/'.join(missing[0])}; it does not match its "
                         "config.json.")
    extra = sorted(stored.keys() - target.keys())
    if extra:
        raise CheckpointError(f"checkpoint {path} has a parameter {'/'.join(extra[0])} that its config.json does not "
                         "describe; it does not match its config.json.")
    for name in target:
        have, want = tuple(stored[name].shape), tuple(target[name].shape)
        qvalue = (*name[:-1], "qvalue")
        if have != want and name[-1] == "scale" and stored[qvalue].shape == target[qvalue].shape:
            raise CheckpointError(f"checkpoint {path} stores {'/'.join(name[:-1])}'s quantization scales as {have}, where "
                                  f"this version of mixtral_jax stores {want} (the attention projections' int8 scales "
                                  "went from one per output channel to one per 32 inputs); convert the HF weights "
                                  "again with --quantize.")
        if have != want:
            raise CheckpointError(f"checkpoint parameter {'/'.join(name)} has shape {have} but {path}/config.json "
                             f"implies {want}; the checkpoint does not match its config.json.")


def _drop_abandoned_reads() -> None:
    """Keeps a failed restore's other reads from printing tracebacks after its one-sentence error.

    When one array cannot be read, Orbax abandons the checkpoint's other reads, which report their own ends
    on stderr whenever the garbage collector, TensorStore or the exit gets to them (even before Orbax's call
    has returned): each raises again as its coroutine is collected and TensorStore's callbacks find Orbax's
    event loop closed (both through sys.unraisablehook), and asyncio logs the tasks whose TensorStore errors
    nobody retrieved. This puts a filter in front of the unraisable hook and on asyncio's logger that drops
    exactly those; everything else passes as before. `load` installs it before its first read; idempotent."""
    asyncio_log = logging.getLogger("asyncio")
    if _unretrieved_read not in asyncio_log.filters:
        asyncio_log.addFilter(_unretrieved_read)
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable):
        abandoned = getattr(unraisable.object, "__qualname__", None) == "_read_array_index_and_device_put"
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == \
            "Event loop is closed"
        if not (abandoned or closed_loop):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


def _unretrieved_read(record: logging.LogRecord) -> bool:
    """False for asyncio's "... exception was never retrieved" record of a TensorStore read (a Task's, a Future's)."""
    message = record.getMessage()
    unretrieved = message.split("\n", 1)[0].endswith("exception was never retrieved")
    ours = any(m in message.lower() for m in ("tensorstore", "ocdbt", "zarr", "_read_array_index_and_device_put"))
    return not (unretrieved and ours)


@contextlib.contextmanager
def _quiet_orbax(level=absl_logging.WARNING):
    """Hides Orbax's log lines below `level`: by default its INFO lines (a dozen per restore), not its warnings."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(min(verbosity, level))  # absl: lower is quieter
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)
