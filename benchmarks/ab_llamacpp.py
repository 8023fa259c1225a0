"""mixtral_jax's float32 / bf16-expert / int8 / int4 models against llama.cpp's f32 / bf16 / q8_0 / q4_0 / q4_K_M
GGUFs of the same weights on the CPU: speed, weight memory and accuracy, in one run.

  python benchmarks/ab_llamacpp.py [CKPT_DIR] [--llamacpp DIR] [--rounds 3] [--text FILE] [--ctx 512] [--chunks 2]

llama.cpp is the build of /work/shared/tools/build_llamacpp.sh (the llama-cpp-python 0.3.36 sdist's llama.cpp):
--llamacpp DIR, else $LLAMACPP_DIR, else /work/llamacpp. Without CKPT_DIR the model is the bench model (D 1024,
F 3584, 8 layers, 8 experts, vocab 32000, random weights seed 0, as benchmarks/ab_quant.py); with it, a checkpoint
mj.load reads (e.g. a trained tiny model; pass --ctx 256 --chunks 64 --text heldout.jsonl).

1. Weights -> GGUF: our float32 weights are written as a Hugging Face checkpoint (safetensors + config.json +
   mistral-common's tokenizer.model.v1), converted by llama.cpp's convert_hf_to_gguf.py --outtype f32 and
   quantized by llama-quantize (a type TYPE+8, e.g. q4_K_M+8: TYPE for the experts, q8_0 for every other matrix,
   our int4's layout). Files go to --work (default /tmp/ab_llamacpp); --reuse keeps existing GGUFs.
2. Accuracy on identical token streams: llama-perplexity --kl-divergence-base on the f32 GGUF tokenizes --text
   (default: the source of Python's argparse module) into --chunks chunks of --ctx tokens, BOS first, and scores
   the second half of each chunk; --kl-divergence then reports each quantized GGUF's KLD, RMS Δp and same-top-p
   against it. Our models read the tokens from that same file, and the same statistics are computed in numpy for
   every model against its own engine's float32 logits (llama.cpp's raw logits come from libllama through the
   sdist's ctypes bindings), plus the relative max / RMS logit error; our float32 is also compared with
   llama.cpp's f32 as a sanity check.
3. Speed, in pairs: each round times each of our models (benchmarks/_alternate.py: decode batch 1 after a 16-token
   prompt, --gen new tokens; a 512-token prefill; each right after a warm-up run) and, right before or after it,
   runs llama-bench once per GGUF of the same width (-p 512 -n GEN -t THREADS -r 1, its own warm-up); the order
   reversed every round. A ratio is the median of the rounds' ratios, each of two timings seconds apart (the
   host's speed drifts over minutes); rates are medians over --rounds.
"""
import argparse
import json
import os
import time
from importlib import resources

import jax
import numpy as np

import _alternate
import _llamacpp as lc
import mixtral_jax as mj
from mixtral_jax import config

OURS = {"float32": {}, "bf16 experts": {"expert_dtype": "bfloat16"}, "int8": {"quantize": "int8"},
        "int4": {"quantize": "int4"}}
# Which of our models each GGUF type is timed next to (the targets: int4 against q4_K_M and q4_0).
PARTNER = {"f32": "float32", "bf16": "bf16 experts", "q8_0": "int8", "q4_0": "int4", "q4_K_M": "int4"}
BENCH_HF = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 8,
            "num_attention_heads": 16, "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
            "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-5}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("ckpt", nargs="?", help="checkpoint directory (default: the random bench model)")
parser.add_argument("--llamacpp", default=os.environ.get("LLAMACPP_DIR", "/work/llamacpp"),
                    help="llama.cpp built by build_llamacpp.sh (default $LLAMACPP_DIR or /work/llamacpp)")
parser.add_argument("--work", default="/tmp/ab_llamacpp", help="where the HF checkpoint, GGUFs and logits go")
parser.add_argument("--reuse", action="store_true", help="keep GGUFs already in --work (same weights!)")
parser.add_argument("--types", default="f32,bf16,q8_0,q4_0,q4_K_M",
                    help="GGUF types (f32 is always made; TYPE+8: TYPE for the experts, q8_0 for the rest, as our int4)")
parser.add_argument("--rounds", type=int, default=3, help="alternating speed rounds (0: no speed)")
parser.add_argument("--gen", type=int, default=32, help="decode tokens per timing")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--text", help="text for accuracy (.txt, or .jsonl with a 'text' field per line)")
parser.add_argument("--ctx", type=int, default=512, help="llama-perplexity context (chunk length)")
parser.add_argument("--chunks", type=int, default=2, help="llama-perplexity chunks (0: no accuracy)")
parser.add_argument("--batch", type=int, default=8, help="chunks per forward of our models")
args = parser.parse_args()

tools = lc.Tools(args.llamacpp)
types = ["f32"] + [t for t in args.types.split(",") if t and t != "f32"]
os.makedirs(args.work, exist_ok=True)
log = os.path.join(args.work, "llamacpp.log")
open(log, "w").close()
if args.ckpt:
    try:
        cfg = mj.load(args.ckpt, dtype="float32", layout="stacked").cfg  # read once for its config
    except (mj.CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"{args.ckpt} is not a checkpoint mj.load reads ({e}); pass a checkpoint directory.")
    make = lambda **kw: mj.load(args.ckpt, dtype="float32", **kw)
else:
    cfg = config.from_hf_dict(BENCH_HF, name="bench")
    make = lambda **kw: mj.init_random(cfg, seed=0, dtype="float32", **kw)
tok_file = "tokenizer.model.v1" if cfg.vocab_size == 32000 else "mistral_instruct_tokenizer_240323.model.v3"
tokenizer_model = str(resources.files("mistral_common") / "data" / tok_file)
t_start, load_start = time.time(), os.getloadavg()

# 1. GGUFs of the same float32 weights.
t0 = time.time()


def write_hf(hf_dir):
    m = make(layout="stacked")
    lc.write_hf_checkpoint(m.params(), cfg, hf_dir, tokenizer_model)


ggufs = lc.make_ggufs(tools, write_hf, args.work, types, args.threads, log, args.reuse)
print(f"GGUFs ready in {time.time() - t0:.0f} s: " + ", ".join(f"{t} {os.path.getsize(p) / 2**20:.0f} MiB"
                                                               for t, p in ggufs.items()), flush=True)
models = {name: make(**kw) for name, kw in OURS.items()}
weight_bytes = {name: sum(a.nbytes for a in jax.tree.leaves(m.params())) for name, m in models.items()}
results = {"model": cfg.name, "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size",
           "num_hidden_layers", "num_local_experts", "vocab_size")}, "ours_weight_bytes": weight_bytes,
           "gguf_bytes": {t: os.path.getsize(p) for t, p in ggufs.items()}}

# 2. Accuracy on llama-perplexity's token streams.
if args.chunks:
    text = os.path.join(args.work, "text.txt")
    src = args.text or __import__("argparse").__file__
    with open(src) as f:
        body = "\n\n".join(json.loads(l)["text"] for l in f if l.strip()) if src.endswith(".jsonl") else f.read()
    with open(text, "w") as f:
        f.write(body)
    base = os.path.join(args.work, "f32.kld")
    lc.perplexity_base(tools, ggufs["f32"], text, base, args.ctx, args.chunks, args.threads, log)
    tokens, base_logp = lc.read_base(base)
    n_chunk = tokens.shape[0]
    ours_tok = [cfg.bos_token_id] + mj.load_tokenizer(tokenizer_model).encode(body, bos=False)
    flat = tokens.reshape(-1)
    same = np.asarray(ours_tok[:flat.size]) == flat if len(ours_tok) >= flat.size else np.zeros(flat.size, bool)
    results["tokens"] = {"chunks": n_chunk, "ctx": args.ctx, "scored": n_chunk * (args.ctx - 1 - args.ctx // 2),
                         "sentencepiece_equal": float(same.mean()),
                         "first_difference": int(np.argmin(same)) if not same.all() else None}
    print(f"tokens: {n_chunk} chunks x {args.ctx}; llama.cpp's tokens equal sentencepiece's at "
          f"{same.mean():.4%} of positions", flush=True)
    tool_kld = {t: lc.perplexity_kld(tools, ggufs[t], base, args.ctx, args.chunks, args.threads, log)
                for t in types if t != "f32"}
    theirs = {t: lc.logits(args.llamacpp, p, tokens, args.threads, os.path.join(args.work, f"logits-{t}.npy"))
              for t, p in ggufs.items()}
    if theirs["f32"] is None:
        theirs = {}
    theirs = {t: v for t, v in theirs.items() if v is not None}
    # llama.cpp's defaults round attention to float16 (cache, flash attention); all-float32 for the sanity row.
    kv32 = lc.logits(args.llamacpp, ggufs["f32"], tokens, args.threads, os.path.join(args.work, "logits-f32kv.npy"),
                     kv="f32") if theirs else None
    acc = {}

    def add(key, logits, targets, ref_logits=None, ref_logp=None, lp=None):
        acc.setdefault(key, []).append(lc.partial_stats(logits, targets, ref_logits, ref_logp, lp))

    for b in range(0, n_chunk, args.batch):
        toks = tokens[b:b + args.batch].copy()
        toks[:, 0] = cfg.bos_token_id
        targets = toks[:, args.ctx // 2 + 1:]
        ours = {name: lc.scored(toks, np.asarray(mj.forward(m, toks), np.float32))[0] for name, m in models.items()}
        mine = {t: np.asarray(x[b:b + args.batch]) for t, x in theirs.items()}
        lps = {("ours", n): lc.log_softmax(x) for n, x in ours.items()}
        lps.update({("llama.cpp", t): lc.log_softmax(x) for t, x in mine.items()})
        blp = base_logp[b:b + args.batch]
        for name, x in ours.items():
            lp = lps["ours", name]
            add(("ours", name, "own float32"), x, targets, ours["float32"], lps["ours", "float32"], lp)
            if "f32" in mine:
                add(("ours", name, "llama.cpp f32"), x, targets, mine["f32"], lps["llama.cpp", "f32"], lp)
        # Sanity rows: our float32 against llama.cpp's stored log-probs and its all-float32 attention, and
        # llama.cpp's raw f32 logits against the file it wrote itself.
        f32, lp32 = ours["float32"], lps["ours", "float32"]
        add(("ours", "float32", "llama.cpp f32 file"), f32, targets, ref_logp=blp, lp=lp32)
        if kv32 is not None:
            add(("ours", "float32", "llama.cpp f32, float32 attention"), f32, targets,
                np.asarray(kv32[b:b + args.batch]), lp=lp32)
        for t, x in mine.items():
            add(("llama.cpp", t, "own float32"), x, targets, mine["f32"], lps["llama.cpp", "f32"], lps["llama.cpp", t])
        if "f32" in mine:
            add(("llama.cpp", "f32", "llama.cpp f32 file"), mine["f32"], targets, ref_logp=blp,
                lp=lps["llama.cpp", "f32"])
    acc = {k: lc.combine(v) for k, v in acc.items()}
    results["accuracy"] = [{"engine": k[0], "model": k[1], "reference": k[2], **v} for k, v in acc.items()]
    results["llama_perplexity_tool"] = tool_kld
    print("\naccuracy (scored positions: second half of each chunk; reference = the engine's own float32 logits):")
    print("| engine | weights | PPL | ln(PPL/PPL_f32) | mean KLD | RMS Δp | same top | rel max logit err | "
          "rel RMS logit err | llama-perplexity's KLD / RMS Δp / same top |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for (engine, name, ref), v in acc.items():
        if ref != "own float32":
            continue
        tool = tool_kld.get(name, {}) if engine == "llama.cpp" else {}
        tool_s = f"{tool['kld']:.6f} / {tool['rms_dp']:.3%} / {tool['same_top']:.3%}" if tool else ""
        print(f"| {engine} | {name} | {v['ppl']:.4f} | {np.log(v['ppl'] / v['ppl_base']):+.5f} | {v['kld']:.3e} | "
              f"{v['rms_dp']:.2e} | {v['same_top']:.2%} | {v.get('rel_max', float('nan')):.3e} | "
              f"{v.get('rel_rms', float('nan')):.3e} | {tool_s} |")
    print("\ncross-engine (against llama.cpp's f32; our float32 row is the sanity check):")
    for (engine, name, ref), v in acc.items():
        if ref != "own float32":
            print(f"  {engine} {name} vs {ref}: KLD {v['kld']:.3e}, RMS Δp {v['rms_dp']:.2e}, same top "
                  f"{v['same_top']:.2%}" + (f", rel max {v['rel_max']:.3e}, rel RMS {v['rel_rms']:.3e}"
                                            if "rel_max" in v else ""))
    for t in list(theirs) + (["f32kv"] if kv32 is not None else []):
        os.remove(os.path.join(args.work, f"logits-{t}.npy"))
    print(flush=True)

# 3. Speed, each of our models next to its llama.cpp partners.
if args.rounds:
    ours_rates, their_rates, rss = {n: {"decode": [], "prefill": []} for n in models}, {}, {}
    ratios = {}  # (ours, theirs) -> per-round decode and prefill ratios, both timed within seconds
    partners = {n: [t for t in ggufs if PARTNER.get(lc.base_type(t)) == n] for n in models}
    loads = []
    for r in range(args.rounds):
        for n in (list(models) if r % 2 == 0 else list(models)[::-1]):
            def run_ours():
                med = _alternate.medians({n: models[n]}, 1)
                ours_rates[n]["decode"].append(med["decode b1"][n])
                ours_rates[n]["prefill"].append(med["prefill 512"][n])

            def run_theirs():
                for t in (partners[n] if r % 2 == 0 else partners[n][::-1]):
                    res = lc.bench(tools, ggufs[t], 512, args.gen, args.threads)
                    their_rates.setdefault(t, {"decode": [], "prefill": []})
                    their_rates[t]["decode"].append(res["decode"])
                    their_rates[t]["prefill"].append(res["prefill"])
                    rss[t] = max(rss.get(t, 0), res["maxrss"])

            for step in ((run_ours, run_theirs) if r % 2 == 0 else (run_theirs, run_ours)):
                step()
            for t in partners[n]:
                pair = ratios.setdefault((n, t), {"decode": [], "prefill": []})
                for k in pair:
                    pair[k].append(ours_rates[n][k][-1] / their_rates[t][k][-1])
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done, load average {loads[-1]:.2f}", flush=True)
    med = lambda v: float(np.median(v))
    results["speed"] = {"rounds": args.rounds, "gen": args.gen, "threads": args.threads, "load_average": loads,
                        "ours": {n: {k: med(v) for k, v in d.items()} for n, d in ours_rates.items()},
                        "llama.cpp": {t: {k: med(v) for k, v in d.items()} for t, d in their_rates.items()},
                        "llama.cpp_maxrss": rss,
                        "ratios": {f"{n} / {t}": {k: med(v) for k, v in d.items()} for (n, t), d in ratios.items()},
                        "ratio_rounds": {f"{n} / {t}": d for (n, t), d in ratios.items()}}
    print("\n| engine | weights | prefill 512 tok/s | decode b1 tok/s | weight bytes (MiB) |")
    print("|---|---|---:|---:|---:|")
    for n, d in results["speed"]["ours"].items():
        print(f"| mixtral_jax | {n} | {d['prefill']:.0f} | {d['decode']:.1f} | {weight_bytes[n] / 2**20:.0f} |")
    for t, d in results["speed"]["llama.cpp"].items():
        print(f"| llama.cpp | {t} | {d['prefill']:.0f} | {d['decode']:.1f} | "
              f"{results['gguf_bytes'][t] / 2**20:.0f} (GGUF; peak RSS {rss[t] / 2**20:.0f}) |")

    print("\nratios (ours / theirs): the median of each round's, the two timed back to back; each round's in brackets")
    for (n, t), d in ratios.items():
        rounds = lambda k: ", ".join(f"{v:.2f}" for v in d[k])
        print(f"  {n} / {t}: decode {med(d['decode']):.2f}x ({rounds('decode')}), "
              f"prefill {med(d['prefill']):.2f}x ({rounds('prefill')}), "
              f"weights {weight_bytes[n] / results['gguf_bytes'][t]:.2f}x")

results["load_average_start"], results["load_average_end"] = load_start, os.getloadavg()
results["seconds"] = time.time() - t_start
with open(os.path.join(args.work, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
print(f"\n{results['seconds']:.0f} s; load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
      f"results in {os.path.join(args.work, 'results.json')}")
