"""Device check: is this accelerator right, and how far from its roofline are prefill and decode?

    python launch/device_check.py            # one GPU or TPU chip, a few minutes
    python launch/device_check.py --json     # ... ending with one JSON line

1. Logits: the tiny preset with random weights, float32, on this device vs the
   same weights on the host CPU (the reference), at full float32 matmul
   precision and at the platform's default one, and in bfloat16. Then the
   same with the weights quantized (`--quantize`, int8 and int4 by default):
   on TPU their products run through quant_tpu.py's Pallas kernels, on the
   CPU through XLA's dequantize, on the same quantized values.
2. Speed: an 8x7B-shaped model cut to 2 layers (every matrix 8x7B's size,
   6.3 GB in bfloat16), random weights on the device: a 2048-token prefill
   (batch 1) and decode steps at batch 1 and 64 over a 2048-slot cache, in
   bfloat16 and then quantized. Each is compiled first, then timed over
   several calls. The roofline fraction is the time the chip's published
   peak would need over the time measured: decode by HBM bytes (the weights
   a step reads, as stored: all but the unchosen experts, whose share is the
   expected one for random routing, plus the KV cache), prefill by FLOPs (2
   per active parameter per token, plus causal attention).

Nothing here is judged about speed. The float32 logits check exits 1 when it fails, and so do the
quantized ones past 1e-2 (the products' order and precision differ by far less; a kernel reading a
wrong tile errs by the logits' own size).
"""

import argparse
import dataclasses
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from mixtral_jax import model as model_lib, quant, topology
from mixtral_jax.generate import SamplingParams, decode_step, init_cache, prefill
from mixtral_jax.layout import EXPERT_PARAMS
from mixtral_jax.model import Mixtral

# Published dense bf16 FLOP/s and HBM bytes/s: NVIDIA's H100, H200 and A100 datasheets (SXM
# parts; H100 PCIe separately) and, for TPUs, mixtral_jax.topology.CHIPS (Cloud TPU pages).
GPUS = {
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.039e12),
}
TPUS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e"}


def peak_rates(device) -> tuple[float, float] | None:
    """(bf16 FLOP/s, HBM bytes/s) of `device` from the tables, or None if it is not listed."""
    kind = device.device_kind
    if kind in TPUS:
        chip = topology.CHIPS[TPUS[kind]]
        return chip.bf16_flops, chip.hbm_bytes_per_s
    for name, rates in GPUS.items():  # the more specific names first
        if name in kind:
            return rates
    return None


def check_logits(device, quantize: str | None = None) -> dict:
    """Relative max error of this device's logits vs the host CPU's, for the tiny preset (its weights
    quantized with `quantize`, the same values on both: only the activations' dtype changes)."""
    cfg = mj.load_config("tiny")
    cpu = jax.devices("cpu")[0]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24), dtype=np.int32)
    with jax.default_device(cpu):
        ref_model = mj.init_random(cfg, seed=0, dtype="float32", layout="stacked", quantize=quantize)
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(mj.forward(ref_model, tokens))
    params = ref_model.params()
    out = {}
    for name, dtype, precision in (("float32_highest", jnp.float32, "highest"),
                                   ("float32_default", jnp.float32, None),
                                   ("bfloat16", jnp.bfloat16, None)):
        # Quantized weights (values and scales) stay as stored; the rest take the activations' dtype.
        cast = jax.tree.map(lambda a: a if quant.is_quantized(a) else a.astype(dtype), params, is_leaf=quant.is_quantized)
        on_device = jax.device_put(cast, device)
        model = Mixtral(cfg, on_device)
        if precision:
            with jax.default_matmul_precision(precision):
                got = np.asarray(mj.forward(model, jnp.asarray(tokens)))
        else:
            got = np.asarray(mj.forward(model, jnp.asarray(tokens)))
        out[name] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    return out


def _time(fn, runs: int) -> float:
    """Median seconds of `fn()` (which returns arrays to wait for) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def decode_bytes(cfg, batch: int, cache_len: int, quantize: str | None = None) -> float:
    """Bytes one decode step reads, the weights in bfloat16 or quantized as stored: every weight but the
    unchosen experts' (expected share under random routing of `batch` tokens), the embedding's looked-up
    rows only, and the bfloat16 KV cache."""
    shapes = model_lib.abstract_params(cfg, "bfloat16", quantize=quantize)
    nbytes = lambda tree: sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    touched = 1 - (1 - k / e) ** batch  # expected fraction of a layer's experts some token picks
    experts = nbytes([shapes["layers"][n] for n in EXPERT_PARAMS])
    embed = nbytes(shapes["embed"])
    weights = nbytes(shapes) - experts - embed + experts * touched + embed * batch / cfg.vocab_size
    cache = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * cache_len * cfg.head_dim * 2
    return weights + cache


def prefill_flops(cfg, batch: int, prompt_len: int) -> float:
    """2 FLOPs per active non-embedding parameter per token, plus causal attention (QK and PV)."""
    counts = mj.param_count(cfg)
    active = counts["active"] - cfg.vocab_size * cfg.hidden_size  # the embedding is a lookup
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * prompt_len * prompt_len / 2
    return batch * (2 * active * prompt_len + attn)


def measure_speed(device, layers: int, prompt_len: int, batches: list[int], runs: int, config: str,
                  quantize: str | None = None) -> dict:
    cfg = dataclasses.replace(mj.load_config(config), num_hidden_layers=layers)
    rates = peak_rates(device)
    with jax.default_device(device):
        model = mj.init_random(cfg, seed=0, dtype="bfloat16", layout="stacked", quantize=quantize)
        params = model.params()
        run = dict(cfg=cfg, strategy="sparse", sampling=SamplingParams(), mesh=None)
        key = jax.random.key(0)
        results = {"config": f"{cfg.name} cut to {layers} layers", "weights": quantize or "bfloat16",
                   "param_bytes": mj.param_bytes(cfg, "bfloat16", quantize=quantize)["total"]}

        tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, prompt_len), dtype=np.int32))
        positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (1, prompt_len))
        cache = [init_cache(cfg, 1, prompt_len, jnp.bfloat16)]

        def run_prefill():
            nxt, logits, cache[0] = prefill(params, tokens, positions, cache[0], key, **run)
            return nxt, logits

        t = _time(run_prefill, runs)
        flops = prefill_flops(cfg, 1, prompt_len)
        results["prefill"] = {"tokens": prompt_len, "seconds": t, "tokens_per_s": prompt_len / t, "flops": flops,
                              "roofline_fraction": None if rates is None else flops / rates[0] / t}

        for b in batches:
            cache = [init_cache(cfg, b, prompt_len, jnp.bfloat16)]
            prev = jnp.zeros((b,), jnp.int32)
            pos = jnp.full((b,), prompt_len - 1, jnp.int32)

            def step(b=b, prev=prev, pos=pos):
                nxt, logits, cache[0] = decode_step(params, prev, pos, jnp.int32(prompt_len - 1), cache[0],
                                                             key, jnp.int32(1), **run)
                return nxt, logits

            t = _time(step, runs)
            moved = decode_bytes(cfg, b, prompt_len, quantize)
            results[f"decode_batch_{b}"] = {"seconds_per_step": t, "tokens_per_s": b / t, "hbm_bytes": moved,
                                            "roofline_fraction": None if rates is None else moved / rates[1] / t}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="layers of the 8x7B-shaped model to time")
    parser.add_argument("--prompt_len", type=int, default=2048)
    parser.add_argument("--batches", default="1,64", help="decode batch sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="timed calls of each step after the warm-up")
    parser.add_argument("--config", default="8x7b", help="preset whose shapes are timed (tiny: a smoke test)")
    parser.add_argument("--allow_cpu", action="store_true", help="run on the CPU when no accelerator is present")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--quantize", default="int8,int4",
                        help="quantized weights to check and time too, comma-separated (\"\": none)")
    args = parser.parse_args()
    modes = [m for m in args.quantize.split(",") if m]
    try:
        for m in modes:
            quant.check_mode(m)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    device = jax.devices()[0]
    if device.platform == "cpu" and not args.allow_cpu:
        print("error: no GPU or TPU is visible to JAX; run this on an accelerator host (or pass --allow_cpu "
              "with --config tiny for a smoke test).", file=sys.stderr)
        return 2
    rates = peak_rates(device)
    print(f"[device_check] {device.device_kind} ({device.platform}), jax {jax.__version__}; peak "
          + ("unknown (not in the table)" if rates is None else
             f"{rates[0] / 1e12:.0f} TFLOP/s bf16, {rates[1] / 1e12:.2f} TB/s HBM"), flush=True)
    t0 = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    frac = lambda r: "" if r["roofline_fraction"] is None else f", {r['roofline_fraction']:.0%} of the roofline"
    results, all_ok = {}, True
    for mode in [None, *modes]:
        errors = check_logits(device, mode)
        # float32 at full precision must match the host; the others show what the defaults cost (TF32 on
        # NVIDIA GPUs, bfloat16 rounding) and are reported, not judged. Quantized weights: see the docstring.
        ok = errors["float32_highest"] < (1e-4 if mode is None else 1e-2)
        all_ok &= ok
        print(f"logits{'' if mode is None else ', ' + mode + ' weights,'} vs float32 CPU (max |diff| / max |ref|): "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + f" -> {'ok' if ok else 'FAILED'}", flush=True)
        speed = measure_speed(device, args.layers, args.prompt_len, batches, args.runs, args.config, mode)
        p = speed["prefill"]
        print(f"{speed['config']} {mode or 'bf16'}: prefill {p['tokens']} tokens {p['seconds'] * 1e3:.1f} ms "
              f"({p['tokens_per_s']:,.0f} tokens/s{frac(p)})")
        for name, r in speed.items():
            if name.startswith("decode_batch_"):
                print(f"  decode batch {name.rsplit('_', 1)[1]}: {r['seconds_per_step'] * 1e3:.2f} ms/step "
                      f"({r['tokens_per_s']:,.0f} tokens/s{frac(r)})", flush=True)
        results[mode] = {"logits_rel_err": errors, "logits_ok": ok, **speed}
    print(f"[device_check] {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        print(json.dumps({"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
                          **results.pop(None), "quantized": results}))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
