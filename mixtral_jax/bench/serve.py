"""`python -m mixtral_jax.bench.serve`: the server under load, against static batching.

Starts `mixtral_jax.serve`'s app in this process (random weights of --config)
and drives it over HTTP with streaming clients: closed loop at each
--concurrency (every client sends its next request as soon as the last one
ends) and open loop (Poisson arrivals at --rate). Prompts and output lengths
are drawn uniformly from --prompt_len and --output_len (seeded); outputs are
greedy and run to their length (no EOS stop). Reports output tokens/s, time
to first token and inter-token latency (p50/p99; the gaps between streamed
chunks), and compares 16 requests sent at once with `mj.generate` on the
same 16 prompts as one static batch, alternating, best of --rounds (its
output tokens/s counts the tokens the requests asked for; the batch runs
until its longest row ends). Then a head-of-line check: a short request
arriving five times, at random moments, while max_batch - 1 long ones stream,
its first-token time against its time alone. --plot draws throughput and
latency against concurrency. --config bench serves `python -m
mixtral_jax.bench`'s model (D 1024, F 3584, 8 layers, 8 experts, vocab 32000).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import socket
import sys
import threading
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Preset, config.json path, or bench: python -m mixtral_jax.bench's default "
                    "model (random weights in every case).")
flags.DEFINE_integer("max_batch", 16, "Engine slots.")
flags.DEFINE_integer("max_seq_len", 512, "Positions per request.")
flags.DEFINE_integer("prefill_chunk", 64, "Prompt tokens per prefill chunk.")
flags.DEFINE_integer("prefill_batch", None, "Prompts prefilled together at most (default min(max_batch, 8)).")
flags.DEFINE_list("concurrency", ["1", "4", "16"], "Closed-loop client counts.")
flags.DEFINE_integer("requests", 32, "Requests per closed-loop run (concurrency 1: a quarter of them).")
flags.DEFINE_list("prompt_len", ["16", "128"], "Prompt lengths: uniform in [lo, hi].")
flags.DEFINE_list("output_len", ["32", "128"], "Output lengths: uniform in [lo, hi].")
flags.DEFINE_float("rate", 0.0, "Open-loop arrivals per second; 0: half the concurrency-16 request rate.")
flags.DEFINE_integer("seed", 0, "Workload and weight seed.")
flags.DEFINE_integer("rounds", 3, "Rounds of the 16-at-once against static batch comparison (the best counts).")
flags.DEFINE_string("plot", None, "Also write output tokens/s and latencies against concurrency to this PNG.")


def _workload(n: int, vocab: int, rs) -> list[tuple[list[int], int]]:
    lo, hi = map(int, FLAGS.prompt_len)
    olo, ohi = map(int, FLAGS.output_len)
    return [([1] + rs.randint(3, vocab, rs.randint(lo, hi + 1) - 1).tolist(), int(rs.randint(olo, ohi + 1)))
            for _ in range(n)]


def _stream(port: int, prompt: list[int], n: int, on_first=None) -> dict:
    """One streamed completion; returns its send time, chunk arrival times and token count. Calls `on_first()`
    when the first chunk arrives."""
    body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "stop_token_ids": []})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    stamps, tokens = [], 0
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"]:
            stamps.append(time.perf_counter())
            if on_first is not None and len(stamps) == 1:
                on_first()
        elif chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return {"t0": t0, "stamps": stamps, "tokens": tokens}


def _summary(results: list[dict], wall: float) -> dict:
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")
    return {"requests": len(results), "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in results) / wall, "req_s": len(results) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def closed_loop(port: int, work, concurrency: int) -> dict:
    """`concurrency` clients, each sending its next request when its last one ends."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda w: _stream(port, *w), work))
    return _summary(results, time.perf_counter() - t0)


def open_loop(port: int, work, rate: float, rs) -> dict:
    """Requests arriving as a Poisson process of `rate` per second, whatever is still running."""
    gaps = rs.exponential(1.0 / rate, len(work))
    results, threads = [None] * len(work), []
    t0 = time.perf_counter()
    for i, (w, gap) in enumerate(zip(work, gaps)):
        time.sleep(gap)
        th = threading.Thread(target=lambda i=i, w=w: results.__setitem__(i, _stream(port, *w)))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return _summary(results, time.perf_counter() - t0)


def static_batch(model, work) -> dict:
    """mj.generate on the same prompts as one batch (compiled by an earlier call of the same shapes)."""
    import mixtral_jax as mj

    prompts, lengths = [p for p, _ in work], [n for _, n in work]
    t0 = time.perf_counter()
    mj.generate(model, prompts, max_new_tokens=max(lengths), stop_tokens=[])
    wall = time.perf_counter() - t0
    return {"requests": len(work), "tokens": sum(lengths), "wall_s": wall, "tok_s": sum(lengths) / wall}


def direct(engine, work) -> dict:
    """The same requests submitted to the engine at once, without HTTP."""
    from mixtral_jax.engine import Request

    t0 = time.perf_counter()
    reqs = [engine.submit(Request(p, n, stop_tokens=[])) for p, n in work]
    for r in reqs:
        while r.finish_reason is None:
            time.sleep(0.001)
    wall = time.perf_counter() - t0
    return {"requests": len(work), "tokens": sum(len(r.tokens) for r in reqs), "wall_s": wall,
            "tok_s": sum(len(r.tokens) for r in reqs) / wall}


def versus_static(model, engine, port: int, work, rounds: int) -> tuple[dict, dict, dict]:
    """The same requests all at once to the server, to the engine directly and as one mj.generate batch,
    alternating for `rounds` rounds (this host's other load drifts); the best round of each."""
    static_batch(model, work)  # compiles
    served, engine_only, static = [], [], []
    for _ in range(rounds):
        served.append(closed_loop(port, work, len(work)))
        engine_only.append(direct(engine, work))
        static.append(static_batch(model, work))
    best = lambda runs: max(runs, key=lambda r: r["tok_s"])
    return best(served), best(engine_only), best(static)


def head_of_line(port: int, work, slots: int, probes: int = 5) -> tuple[float, list[float]]:
    """First-token times (seconds) of a 16-token request: alone (best of 3), and arriving `probes` times at
    random moments while slots - 1 long requests stream."""
    short = (work[0][0][:16], 1)
    alone = min(r["stamps"][0] - r["t0"] for r in (_stream(port, *short) for _ in range(3)))
    long = [(p, FLAGS.max_seq_len - len(p)) for p, _ in work[1:slots]]
    streaming = threading.Semaphore(0)
    rs = np.random.RandomState(FLAGS.seed + 1)
    busy = []
    with concurrent.futures.ThreadPoolExecutor(len(long)) as pool:
        running = [pool.submit(_stream, port, *w, streaming.release) for w in long]
        for _ in long:  # every long request is decoding
            streaming.acquire()
        for _ in range(probes):
            time.sleep(rs.uniform(0, 0.2))  # arrive at a random moment of a decode step
            r = _stream(port, *short)
            busy.append(r["stamps"][0] - r["t0"])
        for f in running:
            f.result()
    return alone, busy


def _model_config():
    import mixtral_jax as mj

    if FLAGS.config != "bench":
        return mj.load_config(FLAGS.config)
    from mixtral_jax.bench.settings import MODEL, hf_config_fields
    from mixtral_jax.config import from_hf_dict

    return from_hf_dict(hf_config_fields(**MODEL, max_positions=FLAGS.max_seq_len), name="bench")


def write_plot(rows: dict, static: dict, title: str, path: str) -> None:
    """Closed-loop output tokens/s (against the static batch of 16) and TTFT / ITL percentiles per concurrency."""
    from matplotlib.figure import Figure

    closed = [(int(name.rsplit(" ", 1)[1]), r) for name, r in rows.items() if name.startswith("closed loop")]
    cs = [c for c, _ in closed]
    fig = Figure(figsize=(10, 4))
    ax_tput, ax_lat = fig.subplots(1, 2)
    ax_tput.plot(cs, [r["tok_s"] for _, r in closed], "o-", label="server, closed loop")
    ax_tput.axhline(static["tok_s"], color="gray", linestyle=":", label="mj.generate, static batch 16")
    ax_tput.set_ylabel("output tokens/s")
    ax_tput.set_title("throughput")
    for key, style, label in (("ttft_p50", "o-", "TTFT p50"), ("ttft_p99", "o--", "TTFT p99"),
                              ("itl_p50", "s-", "inter-token p50"), ("itl_p99", "s--", "inter-token p99")):
        ax_lat.plot(cs, [r[key] for _, r in closed], style, label=label)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("ms")
    ax_lat.set_title("latency")
    for ax in (ax_tput, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    import jax
    import uvicorn

    import mixtral_jax as mj
    from mixtral_jax.engine import Engine
    from mixtral_jax.serve import build_app
    from mixtral_jax.tokenizer import preset_for

    cfg = _model_config()
    model = mj.init_random(cfg, seed=FLAGS.seed)
    tok = mj.load_tokenizer(preset_for(cfg.vocab_size))
    engine = Engine(model, FLAGS.max_batch, FLAGS.max_seq_len, FLAGS.prefill_chunk, tok,
                    prefill_batch=FLAGS.prefill_batch)
    engine.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, tok, cfg.name), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    load_start = os.getloadavg()
    rs = np.random.RandomState(FLAGS.seed)
    work = _workload(FLAGS.requests, cfg.vocab_size, rs)
    _stream(port, *work[0])  # the HTTP path's first request
    rows = {}
    try:
        for c in map(int, FLAGS.concurrency):
            n = max(c, FLAGS.requests // 4 if c == 1 else FLAGS.requests)  # concurrency 1 is slow: fewer
            rows[f"closed loop, concurrency {c}"] = closed_loop(port, work[:n], c)
        c16 = rows.get("closed loop, concurrency 16")
        rate = FLAGS.rate or (c16["req_s"] / 2 if c16 else 1.0)
        rows[f"open loop, {rate:.2f} requests/s"] = open_loop(port, work, rate, rs)
        served, engine_only, static = versus_static(model, engine, port, work[:16], FLAGS.rounds)
        alone, busy = head_of_line(port, work, FLAGS.max_batch)
        load = os.getloadavg()
    finally:
        server.should_exit = True
        engine.stop()
    lo, hi = FLAGS.prompt_len
    olo, ohi = FLAGS.output_len
    title = (f"{cfg.name}, random weights, float32 on {jax.device_count()} {jax.default_backend()} device(s); "
          f"{FLAGS.max_batch} slots, {FLAGS.max_seq_len} positions, prefill chunk {FLAGS.prefill_chunk}; prompts "
          f"uniform [{lo}, {hi}] tokens, outputs uniform [{olo}, {ohi}], greedy; compiles after warm-up: "
          f"{engine.compiles}")
    print(f"{title}; load average (1 min) {load_start[0]:.1f} at the start, {load[0]:.1f} at the end\n")
    print("| load | requests | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['requests']} | {r['tok_s']:.0f} | {r['ttft_p50']:.1f} / {r['ttft_p99']:.1f} | "
              f"{r['itl_p50']:.1f} / {r['itl_p99']:.1f} |")
    best = f"best of {FLAGS.rounds}"
    print(f"| the first 16 requests at once, {best} | 16 | {served['tok_s']:.0f} | {served['ttft_p50']:.1f} / "
          f"{served['ttft_p99']:.1f} | {served['itl_p50']:.1f} / {served['itl_p99']:.1f} |")
    print(f"| the same 16 to the engine directly (no HTTP), {best} | 16 | {engine_only['tok_s']:.0f} | | |")
    print(f"| mj.generate, the same 16 as one static batch, {best} | 16 | {static['tok_s']:.0f} | | |")
    print(f"\n16 at once / static batch 16: {served['tok_s'] / static['tok_s']:.2f}x over HTTP, "
          f"{engine_only['tok_s'] / static['tok_s']:.2f}x engine alone (target >= 0.8)")
    c1 = rows.get("closed loop, concurrency 1")
    if c16 and c1:
        print(f"closed loop concurrency 16 / concurrency 1: {c16['tok_s'] / c1['tok_s']:.2f}x (target >= 5)")
    mid, worst = float(np.median(busy)), max(busy)
    print(f"head of line: a 16-token request's first token while {FLAGS.max_batch - 1} long ones stream, "
          f"{len(busy)} arrivals: median {mid * 1e3:.1f} ms, worst {worst * 1e3:.1f} ms; alone {alone * 1e3:.1f} ms "
          f"({mid / alone:.2f}x median, {worst / alone:.2f}x worst; target <= 2)")
    if FLAGS.plot:
        write_plot(rows, static, f"{cfg.name}: {FLAGS.max_batch} slots; prompts [{lo}, {hi}], outputs [{olo}, {ohi}] "
                   "tokens, greedy", FLAGS.plot)
        print(f"plot: {FLAGS.plot}")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
