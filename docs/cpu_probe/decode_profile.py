"""Where a decode step's time goes: a jax.profiler trace of mixtral_jax's decode, per step.

Loads a converted checkpoint, decodes B rows, traces 24 steps and splits each
step (from one lm_head product's end to the next's) into XLA:CPU op time,
summed by op kind (cond = experts behind their lax.cond), and the gaps where no
op ran. Then times sparse against strategy="dense" (every expert) decode and
prints the weight bytes each streams per second.
  PYTHONPATH=. python docs/cpu_probe/decode_profile.py CKPT_DIR [B]
"""
import collections, glob, gzip, json, re, sys, tempfile, time
import numpy as np, jax
import mixtral_jax as mj

ckpt, batch = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
model = mj.load(ckpt, dtype="float32")
cfg = model.cfg
prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, 16)).tolist()


def step_s(n, strategy="sparse"):
    stamps = [time.perf_counter() for _ in mj.generate_stream(model, prompts, n, stop_tokens=[], strategy=strategy)]
    return (stamps[-1] - stamps[0]) / (n - 1)


step_s(4)
print(f"batch {batch}: untraced step {np.median([step_s(32) for _ in range(3)]) * 1e3:.1f} ms")
trace_dir = tempfile.mkdtemp()
with jax.profiler.trace(trace_dir):
    step_s(24)
events = [e for e in json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[-1]))["traceEvents"]
          if e.get("ph") == "X"]
ops = [e for e in events if re.match(r"[a-z_\-]+(\.\d+)*(\.clone)?$", e["name"])]  # XLA ops, not "end: ..." markers
# The lm_head product: the longest dot, once per step.
dots = collections.defaultdict(list)
for e in ops:
    if e["name"].startswith("dot"):
        dots[e["name"]].append(e["dur"])
lm_head = max((n for n, d in dots.items() if len(d) >= 20), key=lambda n: np.median(dots[n]))
marks = sorted((e for e in ops if e["name"] == lm_head), key=lambda e: e["ts"])
rows = collections.defaultdict(list)
for a, b in zip(marks[4:-2], marks[5:-1]):
    t0, t1 = a["ts"] + a["dur"], b["ts"] + b["dur"]
    top, end = [], {}
    for e in sorted((e for e in ops if t0 <= e["ts"] < t1), key=lambda e: e["ts"]):
        if e["ts"] >= end.get(e["tid"], -1):  # not nested in an op of its thread
            top.append(e)
            end[e["tid"]] = e["ts"] + e["dur"]
    covered, cur = 0.0, None
    for e in sorted(top, key=lambda e: e["ts"]):
        s, f = e["ts"], e["ts"] + e["dur"]
        if cur is None or s > cur[1]:
            covered += 0 if cur is None else cur[1] - cur[0]
            cur = [s, f]
        else:
            cur[1] = max(cur[1], f)
    covered += cur[1] - cur[0]
    kinds = collections.Counter()
    for e in top:
        kinds[re.sub(r"(\.\d+)+(\.clone)?$", "", e["name"])] += e["dur"]
    rows["step (traced)"].append(t1 - t0)
    rows["gaps: no op running"].append(t1 - t0 - covered)
    for k, v in kinds.items():
        rows["op: " + k].append(v)
print(f"lm_head product: {lm_head}, median {np.median(dots[lm_head]) / 1e3:.2f} ms")
for k, v in sorted(rows.items(), key=lambda kv: -np.median(kv[1]))[:10]:
    print(f"  {k:32s} {np.median(v) / 1e3:7.2f} ms (median of {len(v)} steps)")

if batch == 1:
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    expert = 3 * cfg.hidden_size * cfg.intermediate_size * 4 * cfg.num_hidden_layers
    active = mj.param_count(cfg)["active"] * 4 - cfg.vocab_size * cfg.hidden_size * 4  # minus the embedding rows
    dense = active + expert * (e - k)
    step_s(4, "dense")
    t = {"sparse": [], "dense": []}
    for rep in range(5):
        for s in t:
            t[s].append(step_s(16, s))
    sp, de = np.median(t["sparse"]), np.median(t["dense"])
    print(f"sparse {sp * 1e3:.1f} ms/step = {active / sp / 1e9:.1f} GB/s of weights; "
          f"dense {de * 1e3:.1f} ms/step = {dense / de / 1e9:.1f} GB/s; gain {de / sp:.2f}x")
