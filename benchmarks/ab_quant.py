"""Quantized weights on the CPU against float32 and bfloat16 experts: speed and logit error, one process.

  python benchmarks/ab_quant.py [CKPT_DIR] [--rounds 4] [--accuracy_only] [--variants float32,int8,...]

The bench model's shapes (python -m mixtral_jax.bench's defaults: D 1024, F 3584, 8 layers, 8 experts,
vocab 32000), random weights (seed 0) unless CKPT_DIR gives a checkpoint; every variant holds the same
float32 weights (experts rounded to bfloat16, or quantized from them), per_expert layout on one CPU
device (the C++ kernel). Quantized: the experts only (int8-experts, int4-experts) or also the attention
projections and lm_head at int8 (int8, int4). Speed: decode batch 1 (16-token prompt, 32 new tokens) and a 512-token
prefill, medians of alternating rounds. Accuracy: teacher-forced logits of 2 x 256 positions against
float32's: relative max |error| / max |logit|, relative RMS error, and how often the argmax agrees.
"""
import argparse

import jax
import numpy as np

import _alternate
import mixtral_jax as mj
from mixtral_jax import config

parser = argparse.ArgumentParser()
parser.add_argument("ckpt", nargs="?")
parser.add_argument("--rounds", type=int, default=4)
parser.add_argument("--accuracy_only", action="store_true")
parser.add_argument("--variants", default="float32,bf16 experts,int8-experts,int8,int4-experts,int4",
                    help="comma-separated; the speed run holds them all at once (float32 first: the baseline)")
args = parser.parse_args()

VARIANTS = {"float32": {}, "bf16 experts": {"expert_dtype": "bfloat16"},
            **{mode: {"quantize": mode} for mode in ("int8-experts", "int8", "int4-experts", "int4")}}
names = ["float32"] + [n for n in args.variants.split(",") if n != "float32"]
if args.ckpt:
    make = lambda kw: mj.load(args.ckpt, dtype="float32", **kw)
else:
    cfg = config.from_hf_dict({"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 3584,
                               "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
                               "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
                               "rope_theta": 1e6, "rms_norm_eps": 1e-5}, name="bench")
    make = lambda kw: mj.init_random(cfg, seed=0, dtype="float32", **kw)

rng = np.random.default_rng(0)
tokens = rng.integers(3, 32000, (2, 256))
models = {"float32": make({})}
ref = np.asarray(mj.forward(models["float32"], tokens), np.float64)
for name in names:
    m = models["float32"] if name == "float32" else make(VARIANTS[name])
    mib = sum(a.nbytes for a in jax.tree.leaves(m.params())) / 2**20
    if name != "float32":
        out = np.asarray(mj.forward(m, tokens), np.float64)
        err = out - ref
        print(f"accuracy {name}: rel max {np.abs(err).max() / np.abs(ref).max():.3e}, rel RMS "
              f"{np.sqrt((err ** 2).mean() / (ref ** 2).mean()):.3e}, argmax agreement "
              f"{(out.argmax(-1) == ref.argmax(-1)).mean():.4f} of {ref.shape[0] * ref.shape[1]} positions, "
              f"{mib:.0f} MiB of weights", flush=True)
    else:
        print(f"float32: {mib:.0f} MiB of weights", flush=True)
    if not args.accuracy_only:  # accuracy alone holds one model beside float32 at a time
        models[name] = m
    del m
if args.accuracy_only:
    raise SystemExit

for what, med in _alternate.medians(models, args.rounds).items():
    print(f"{what} tok/s: " + ", ".join(f"{name} {v:.1f} ({v / med['float32']:.2f}x)" for name, v in med.items()),
          flush=True)
