"""Hugging Face Mixtral weights → mixtral_jax parameters, and the streaming checkpoint converter.

HF stores torch Linear weights as [out, in]; we store [in, out] with heads and
experts as their own axes (see model.py for the tree). The tables below are
the single mapping between the two.

`convert_hf_checkpoint` (CLI: `python -m mixtral_jax.convert --hf_dir DIR --out DIR`)
turns a hub checkpoint directory (sharded `model-*.safetensors` + index, or one
`model.safetensors`; bf16, f16 or f32) into an Orbax checkpoint that
`checkpoint.load` restores. It streams: each HF tensor is read from its file
alone, converted and written into its slice of the stacked [L, ...] arrays, so
memory stays at a few tensors whatever the model size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np
from absl import app, flags, logging

from mixtral_jax import checkpoint, ckpt_files, model as model_lib, quant
from mixtral_jax.config import MixtralConfig, load_config

# Top-level (not per-layer) tensors: our name -> (HF key, transform).
GLOBAL_KEYS: dict[str, tuple[str, Callable]] = {
    "embed": ("model.embed_tokens.weight", lambda w, c: w),                    # [V, D]
    "final_norm": ("model.norm.weight", lambda w, c: w),                       # [D]
    "lm_head": ("lm_head.weight", lambda w, c: w.T),                           # [V, D] -> [D, V]
}
# The axis of our array that the HF tensor's rows (axis 0) land on: the streaming
# converter reads vocab-sized tensors in blocks of rows instead of whole.
GLOBAL_ROW_AXIS: dict[str, int] = {"embed": 0, "final_norm": 0, "lm_head": 1}

# Per-layer tensors that are not experts: our name -> (HF key template, transform).
LAYER_KEYS: dict[str, tuple[str, Callable]] = {
    "attn_norm": ("model.layers.{l}.input_layernorm.weight", lambda w, c: w),
    "mlp_norm": ("model.layers.{l}.post_attention_layernorm.weight", lambda w, c: w),
    # [H*Dh, D] -> [D, H, Dh]
    "wq": ("model.layers.{l}.self_attn.q_proj.weight",
           lambda w, c: w.T.reshape(c.hidden_size, c.num_attention_heads, c.head_dim)),
    "wk": ("model.layers.{l}.self_attn.k_proj.weight",
           lambda w, c: w.T.reshape(c.hidden_size, c.num_key_value_heads, c.head_dim)),
    "wv": ("model.layers.{l}.self_attn.v_proj.weight",
           lambda w, c: w.T.reshape(c.hidden_size, c.num_key_value_heads, c.head_dim)),
    # [D, H*Dh] -> [H, Dh, D]
    "wo": ("model.layers.{l}.self_attn.o_proj.weight",
           lambda w, c: w.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size)),
    "router": ("model.layers.{l}.block_sparse_moe.gate.weight", lambda w, c: w.T),  # [E, D] -> [D, E]
}

# Per-expert tensors: our name -> HF key template; each is transposed and stacked over E.
EXPERT_KEYS: dict[str, str] = {
    "w1": "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",  # [F, D] -> [D, F]
    "w3": "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",  # [F, D] -> [D, F]
    "w2": "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",  # [D, F] -> [F, D]
}


def hf_expected_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of a checkpoint for `cfg`, with its torch shape."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    per_layer = {"attn_norm": (d,), "mlp_norm": (d,), "wq": (hq, d), "wk": (hkv, d), "wv": (hkv, d),
                 "wo": (d, hq), "router": (cfg.num_local_experts, d)}
    expert = {"w1": (f, d), "w3": (f, d), "w2": (d, f)}
    for l in range(cfg.num_hidden_layers):
        for name, (tmpl, _) in LAYER_KEYS.items():
            shapes[tmpl.format(l=l)] = per_layer[name]
        for name, tmpl in EXPERT_KEYS.items():
            for e in range(cfg.num_local_experts):
                shapes[tmpl.format(l=l, e=e)] = expert[name]
    return shapes


def convert_expert(get: Callable[[str], np.ndarray], name: str, l: int, e: int) -> np.ndarray:
    """Expert `e` of layer `l` for our `name` in EXPERT_KEYS, transposed to [in, out]."""
    return get(EXPERT_KEYS[name].format(l=l, e=e)).T


def convert_layer(get: Callable[[str], np.ndarray], cfg: MixtralConfig, l: int) -> dict[str, np.ndarray]:
    """One decoder layer's parameters in our layout, reading HF tensors through `get(key)`."""
    out = {name: fn(get(tmpl.format(l=l)), cfg) for name, (tmpl, fn) in LAYER_KEYS.items()}
    for name in EXPERT_KEYS:
        out[name] = np.stack([convert_expert(get, name, l, e) for e in range(cfg.num_local_experts)])
    return out


def convert_global(get: Callable[[str], np.ndarray], cfg: MixtralConfig) -> dict[str, np.ndarray]:
    """The non-layer parameters (embed, final_norm, lm_head) in our layout."""
    return {name: fn(get(key), cfg) for name, (key, fn) in GLOBAL_KEYS.items()}


def params_from_state_dict(state: Mapping[str, np.ndarray], cfg: MixtralConfig) -> dict:
    """Whole-model conversion in memory (tests and tiny models; use the streaming converter for real ones)."""
    get = state.__getitem__
    per_layer = [convert_layer(get, cfg, l) for l in range(cfg.num_hidden_layers)]
    params = convert_global(get, cfg)
    params["layers"] = {k: np.stack([p[k] for p in per_layer]) for k in per_layer[0]}
    return params


# ---------------------------------------------------------------------------------------------
# Streaming conversion of a hub checkpoint directory.

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# safetensors dtype tags we read; numpy has no bfloat16, ml_dtypes (a jax dependency) does.
SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
EXIT_USAGE = 2


class HFCheckpoint:
    """The tensors of a hub checkpoint directory, read one at a time from their safetensors files.

    Only the files' JSON headers are parsed up front; `read` then seeks to one
    tensor (or a block of its rows) and reads just those bytes, into memory
    that is freed when the caller drops the array. No memory map: touched
    pages of a map would stay in the process until the whole file is unmapped.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.hf_dir = os.fspath(hf_dir)
        index = os.path.join(self.hf_dir, SAFETENSORS_INDEX)
        single = os.path.join(self.hf_dir, SAFETENSORS_SINGLE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index} is not a safetensors index with a weight_map ({e!r}).") from None
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise FileNotFoundError(
                f"{self.hf_dir} has neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE}; "
                "pass a Hugging Face checkpoint directory with safetensors weights.")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SAFETENSORS_SINGLE]
        headers = {name: _read_header(os.path.join(self.hf_dir, name)) for name in files}
        # tensor name -> (file path, dtype, shape, byte offset of its data)
        self.entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        if weight_map is None:
            self.entries = dict(headers[SAFETENSORS_SINGLE])
        else:
            for tensor, name in weight_map.items():
                if tensor not in headers[name]:
                    raise ValueError(f"tensor {tensor} is listed in {SAFETENSORS_INDEX} but missing from {name}; "
                                     "the download is incomplete or corrupt.")
                self.entries[tensor] = headers[name][tensor]

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self.entries[tensor][2]

    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape, _ in self.entries.values())

    def read(self, tensor: str, rows: slice = slice(None)) -> np.ndarray:
        """Tensor `tensor` (optionally rows [start, stop) of its first axis) in its stored dtype."""
        path, dtype, shape, offset = self.entries[tensor]
        start, stop, _ = rows.indices(shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        out = np.empty((stop - start,) + shape[1:], dtype)
        with open(path, "rb") as f:
            f.seek(offset + start * row_bytes)
            n = f.readinto(out.view(np.uint8).reshape(-1))
        if n != out.nbytes:
            raise ValueError(f"{path} ends inside tensor {tensor}; the file is truncated.")
        return out


def _read_header(path: str) -> dict[str, tuple[str, np.dtype, tuple[int, ...], int]]:
    """Parses a safetensors file's header: tensor -> (path, dtype, shape, data offset)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file {path} is missing; the download is incomplete.")
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        try:
            header = json.loads(f.read(size)) if 0 < size < 2**30 else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (unreadable header).")
    entries = {}
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {tensor} in {path} has dtype {info['dtype']}; only "
                             f"{', '.join(SAFETENSORS_DTYPES)} are supported.")
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {tensor} in {path} has {end - begin} bytes for shape {shape} "
                             f"{info['dtype']}; the file is corrupt.")
        if 8 + size + end > file_size:
            raise ValueError(f"{path} ends inside tensor {tensor}; the file is truncated (an incomplete download?).")
        entries[tensor] = (path, dtype, shape, 8 + size + begin)
    return entries


def check_tensors(hf: HFCheckpoint, cfg: MixtralConfig) -> None:
    """Raises a one-sentence error naming the first tensor that `cfg` does not expect as stored."""
    expected = hf_expected_shapes(cfg)
    for tensor, shape in expected.items():
        if tensor not in hf.entries:
            raise ValueError(f"tensor {tensor} is missing from {hf.hf_dir}; the checkpoint is incomplete or "
                             "its config.json does not match the weights.")
        if hf.shape(tensor) != shape:
            raise ValueError(f"tensor {tensor} has shape {hf.shape(tensor)} but config.json implies {shape}; "
                             f"the config.json in {hf.hf_dir} does not match the weights.")
    extra = [t for t in hf.entries if t not in expected]
    if extra:
        raise ValueError(
            f"tensor {extra[0]} (and {len(extra) - 1} more) is not part of a Mixtral with this config.json "
            f"({cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts); the config.json in "
            f"{hf.hf_dir} does not match the weights.")


def convert_hf_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16",
                          overwrite: bool = False, quantize: str | None = None) -> str:
    """Converts a Hugging Face Mixtral checkpoint directory into a mixtral_jax checkpoint, streaming.

    Reads `config.json` and the safetensors weights of `hf_dir`, checks every
    tensor's name and shape against the config, then writes each tensor into
    its slice of the Orbax checkpoint. Memory stays at a few tensors plus
    `checkpoint.MAX_INFLIGHT_BYTES`, never the model. The checkpoint is built in
    a staging directory beside `out_dir` and renamed into place at the end, so
    a failed conversion leaves nothing that looks like a checkpoint.

    Args:
        hf_dir: hub checkpoint directory (config.json + model*.safetensors).
        out_dir: directory to create; `checkpoint.load(out_dir)` restores it.
        dtype: stored parameter dtype, "bfloat16" or "float32".
        overwrite: replace an existing checkpoint at `out_dir` (never a directory
            that is not one, and `out_dir` may not hold or lie inside `hf_dir`).
        quantize: a quant.MODES mode: the weights it covers stored quantized
            (quant.py), each rounded to `dtype` first, so the checkpoint equals
            `load(float checkpoint in dtype, quantize=...)`.

    Returns:
        The absolute path of the checkpoint directory.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    quant.check_mode(quantize)
    out = os.path.abspath(os.fspath(out_dir))
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF checkpoint directory {hf_dir} does not exist.")
    ckpt_files.check_destination(out, overwrite, protect=(os.fspath(hf_dir),))
    cfg = load_config(hf_dir)
    hf = HFCheckpoint(hf_dir)
    check_tensors(hf, cfg)

    start = time.time()
    with ckpt_files.staged(out) as built:
        os.makedirs(built)
        _write_checkpoint(hf, cfg, DTYPES[dtype], built, quantize)
    logging.info("wrote %s in %.1f s", out, time.time() - start)
    return out


def _write_checkpoint(hf: HFCheckpoint, cfg: MixtralConfig, dtype: np.dtype, directory: str,
                      quantize: str | None = None) -> None:
    """Streams every tensor of `hf` into an Orbax checkpoint (plus config.json) in `directory`."""
    arrays = checkpoint.target_arrays(cfg, dtype, quantize=quantize)
    writer = checkpoint.ArrayWriter(directory, arrays)
    start = time.time()
    logging.info("converting %s (%.2f GB of tensors) to %s", hf.hf_dir, hf.nbytes() / 1e9, dtype.name)

    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays.values())
    written = 0

    def put(path, index, value):
        nonlocal written
        value = np.ascontiguousarray(value, dtype=arrays[path].dtype)
        writer.write(path, index, value)
        written += value.nbytes

    quantized = model_lib.quantized(quantize)

    def put_weight(path, index, value):
        """A weight as stored: float in `dtype`, or quantized from its `dtype` values."""
        if path not in quantized:
            return put(path, index, value)
        for part, q in quant.quantize(np.asarray(value, dtype), *quantized[path]).items():
            put((*path, part), index, q)

    try:
        for name, (key, fn) in GLOBAL_KEYS.items():
            axis = GLOBAL_ROW_AXIS[name]
            # The lm_head's rows in HF are its output channels, the embedding's its tokens: either way a block
            # of them quantizes on its own.
            block = arrays[(name, "qvalue") if (name,) in quantized else (name,)].chunks[axis]
            for r in range(0, hf.shape(key)[0], block):
                index = (slice(None),) * axis + (slice(r, r + block),)
                put_weight((name,), index, fn(hf.read(key, slice(r, r + block)), cfg))
        for l in range(cfg.num_hidden_layers):
            for name, (tmpl, fn) in LAYER_KEYS.items():
                put_weight(("layers", name), (l,), fn(hf.read(tmpl.format(l=l)), cfg))
            for name in EXPERT_KEYS:
                for e in range(cfg.num_local_experts):
                    put_weight(("layers", name), (l, e), convert_expert(hf.read, name, l, e).astype(dtype))
            elapsed = time.time() - start
            logging.info("layer %d/%d written: %.2f / %.2f GB, %.2f GB/s, %.0f s elapsed, about %.0f s left",
                         l + 1, cfg.num_hidden_layers, written / 1e9, total / 1e9, written / 1e9 / max(elapsed, 1e-9),
                         elapsed, elapsed * (total - written) / max(written, 1))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    checkpoint.write_config(dataclasses.replace(cfg, dtype=dtype.name), directory)


def _define_flags() -> None:
    # Only when run as a program: importing the library must register no flags.
    flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + *.safetensors).")
    flags.DEFINE_string("out", None, "Output checkpoint directory (created; must be empty, absent, or with "
                        "--overwrite an earlier checkpoint); never the --hf_dir or a directory around it.")
    flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "Stored parameter dtype.")
    flags.DEFINE_string("quantize", None, "Store the weights quantized: int8 (experts and lm_head per output "
                        "channel, attention in groups of 32 inputs) or int4 (experts in groups of 32, attention and "
                        "lm_head int8); int8-experts / int4-experts: the experts only; default: --dtype.")
    flags.DEFINE_boolean("overwrite", False, "Replace the checkpoint at --out (only once the new one is complete).")
    flags.mark_flags_as_required(["hf_dir", "out"])


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags look like --hf_dir DIR --out DIR.", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        convert_hf_checkpoint(FLAGS.hf_dir, FLAGS.out, FLAGS.dtype, overwrite=FLAGS.overwrite,
                              quantize=FLAGS.quantize)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
