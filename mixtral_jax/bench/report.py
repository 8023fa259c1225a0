"""The bench's report: the markdown tables, the plot, and benchmarks.md (command, machine, tables, method)."""

from __future__ import annotations

from typing import Any


def _fmt(value, spec: str = ".1f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _times(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def render_table(r: dict[str, Any]) -> str:
    """The results as markdown: the speed table, then the derived numbers."""
    p, host = r["prefill"], r["host"]
    lines = ["| measurement | mixtral_jax | transformers | ratio |", "|---|---:|---:|---:|",
             f"| prefill tok/s ({p['prompt_len']}-token prompt, batch 1) | {_fmt(p['ours_tok_s'])} | "
             f"{_fmt(p['theirs_tok_s'])} | {_times(p['ratio'])} |"]
    for d in r["decode"]:
        lines.append(f"| decode tok/s, batch {d['batch']} ({r['decode_prompt_len']}-token prompts, "
                     f"{d['new_tokens']} new) | {_fmt(d['ours_tok_s'])} | {_fmt(d['theirs_tok_s'])} | "
                     f"{_times(d['ratio'])} |")
    roof, sg = r["roofline"], r["sparse_gain"]
    match = {True: "yes", False: "NO", None: "not checked"}
    per_batch = ", ".join(f"batch {d['batch']}: {match[d['tokens_match']]}" for d in r["decode"])
    counts = r["compile_counts"]
    count_text = ", ".join(
        f"`{name}` {counts['start'][name]} → {counts['after_warmup'][name]} → {counts['end'][name]}"
        for name in counts["end"])
    compile_s = ", ".join([f"prefill {p['compile_s']:.1f} s"]
                          + [f"batch {d['batch']} {d['compile_s']:.1f} s" for d in r["decode"]]
                          + [f"dense {sg['dense_compile_s']:.1f} s"])
    load = host["loadavg_start"], host["loadavg_end"]
    hf = r["transformers"]
    same_dtype = r["model"].get("expert_dtype", r["model"]["dtype"]) == r["model"]["dtype"]
    lines += [
        "", "| derived | value |", "|---|---|",
        f"| decode roofline fraction, batch 1 | {_fmt(roof['fraction'], '.0%')} of {_fmt(roof['tok_s'])} tok/s = "
        f"{_fmt(host['read_gb_s'])} GB/s ÷ "
        f"{r['model']['active_bytes_per_token'] / 1e6:.0f} MB active weights per token "
        + (f"(transformers: {_fmt(roof['theirs_fraction'], '.0%')})" if same_dtype else
           f"(transformers, whose weights are all {r['model']['dtype']}: {_fmt(roof['theirs_fraction'], '.0%')} "
           f"of its own roofline, {_fmt(roof['theirs_tok_s'])} tok/s)")
        + " |",
        f"| sparse gain, batch 1 | {_times(sg['gain'])}: "
        f"{_fmt(sg['sparse_tok_s'])} tok/s vs {_fmt(sg['dense_tok_s'])} tok/s computing all "
        f"{r['model']['hf_config']['num_local_experts']} experts ({sg['dense_new_tokens']} new) |",
        f"| prefill efficiency | {_fmt(p['matmul_fraction'], '.0%')} of XLA's matmul rate: "
        f"{p['useful_gflop']:.1f} useful GFLOP at {_fmt(p['ours_useful_gflop_s'])} GFLOP/s |",
        "| experts touched per decode step (of "
        f"{r['model']['hf_config']['num_local_experts']}) | "
        + ", ".join(f"batch {d['batch']}: {d['experts_touched']:.2f}" for d in r["decode"]) + " |",
        f"| greedy tokens match transformers | {per_batch} |",
        f"| compiled shapes (start → after warm-up → end) | {count_text}; "
        f"{r['recompiles_during_timed_runs']} during timed runs |",
        f"| compile time of our first calls (jax compile events) | {compile_s}; "
        f"{r['compile_s_during_timed_runs']:.2f} s during timed runs |",
        f"| host: f32 streaming read, {host['matvec_weight_mb']:.0f} MB weight | XLA matvec "
        f"{_fmt(host['matvec_gb_s'])} GB/s, CPU kernel {_fmt(host['kernel_gb_s'])} GB/s (the faster is the "
        "roofline's) |",
        f"| host: XLA f32 matmul {'×'.join(map(str, host['matmul_shape']))} | {_fmt(host['matmul_gflop_s'], '.0f')} "
        "GFLOP/s |",
        "| load average (1/5/15 min) before the run; after it (includes the bench) | "
        + "; ".join(" / ".join(f"{v:.2f}" for v in three) for three in load) + " |",
        f"| other processes' CPU during timed runs | {_fmt(host['other_processes_cores'], '.2f')} cores |",
    ]
    if hf is not None:
        lines.append(f"| transformers set-up | attention `{hf['attn_implementation']}`, experts "
                     f"`{hf['experts_implementation']}`, {hf['torch_threads']} torch threads |")
    return "\n".join(lines)


def write_plot(r: dict[str, Any], path: str) -> None:
    """Decode tok/s vs batch (log x) for both sides, and prefill tok/s bars, into a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_decode, ax_prefill = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    batches = [d["batch"] for d in r["decode"]]
    ax_decode.plot(batches, [d["ours_tok_s"] for d in r["decode"]], "o-", label="mixtral_jax")
    if r["transformers"] is not None:
        ax_decode.plot(batches, [d["theirs_tok_s"] for d in r["decode"]], "s--", label="transformers")
    ax_decode.axhline(r["roofline"]["tok_s"], color="gray", linestyle=":", label="batch-1 roofline")
    ax_decode.set_xscale("log", base=2)
    ax_decode.set_xticks(batches, [str(b) for b in batches])
    ax_decode.set_xlabel("batch")
    ax_decode.set_ylabel("decode tokens/s")
    ax_decode.set_title("decode")
    ax_decode.grid(alpha=0.3)
    ax_decode.legend()
    names, values = ["mixtral_jax"], [r["prefill"]["ours_tok_s"]]
    if r["prefill"]["theirs_tok_s"] is not None:
        names.append("transformers")
        values.append(r["prefill"]["theirs_tok_s"])
    ax_prefill.bar(names, values, color=["C0", "C1"][:len(names)])
    ax_prefill.set_ylabel("prefill tokens/s")
    ax_prefill.set_title(f"prefill, {r['prefill']['prompt_len']}-token prompt")
    cfg = r["model"]["hf_config"]
    fig.suptitle(f"Mixtral D={cfg['hidden_size']} F={cfg['intermediate_size']} L={cfg['num_hidden_layers']} "
                 f"E={cfg['num_local_experts']} top-{cfg['num_experts_per_tok']}, {r['model']['dtype']}, "
                 f"{r['machine']['nproc']}-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


METHOD = """\
How each number is measured (all in one process, the two sides alternating
within every timed round, the side that goes first swapping each round;
medians over the rounds):

- Both sides load the same random-weight checkpoint: transformers
  `from_pretrained` of the HF directory, mixtral_jax `load` of its
  `convert_hf_checkpoint` conversion. torch runs on 2 threads.
- Prefill: one prompt, one new token; wall time of `mj.generate` vs
  transformers' `generate(max_new_tokens=1)`. tok/s = prompt tokens ÷ time.
- Decode at batch B: B random prompts, greedy, every row to the end
  (`stop_tokens=[]`; transformers `min_new_tokens`). Ours: time from the first
  to the last token of `mj.generate_stream`. transformers: t(N new) − t(1 new).
  tok/s = (N − 1) × B ÷ that time. Fewer new tokens at big batches bound the work.
- Every shape runs once before timing (compilation, allocator warm-up). Compile
  time is what jax reports (its jax.monitoring compile events) during those first
  calls; compiled-shape counts come from the jitted `prefill` / `decode_step`.
- Roofline: active weight bytes per token (active parameters minus the
  embedding table, which is a one-row gather) ÷ this host's streaming-read
  bandwidth: the faster of an XLA f32 matvec and the CPU MoE kernel on one row
  (`mixtral_jax.cpu_kernel`, where it is built), each on a weight that exceeds
  the L3 cache, sampled next to every measurement.
- Prefill efficiency: useful FLOPs (2 × active layer weights × tokens, causal
  attention; the lm_head and the last layer, but for its keys and values, for the
  last token only, as only its logits are needed) ÷ time, against an XLA f32
  matmul of the same round.
- Sparse gain: our batch-1 decode against `strategy="dense"` (all experts computed).
- Experts touched: `mj.expert_routing` on the decoded sequences; per layer and
  decode step, the distinct experts chosen by that step's B tokens; mean.
- Load: before each timed measurement the bench waits (up to 20 s) for other
  processes to go idle; the load average, and the CPU time other processes used
  during the timed rounds (from /proc/stat), say how noisy the machine still was.
"""


def write_markdown(r: dict[str, Any], path: str, png_name: str) -> None:
    """docs/benchmarks.md: command, date, machine, model, the tables, the plot and the method."""
    m, cfg = r["machine"], r["model"]["hf_config"]
    model_line = (f"hidden {cfg['hidden_size']}, ffn {cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, "
                  f"{cfg['num_attention_heads']} heads, {cfg['num_key_value_heads']} kv heads, "
                  f"{cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}, vocab {cfg['vocab_size']}: "
                  f"{r['model']['total'] / 1e6:.0f}M parameters, {r['model']['active'] / 1e6:.0f}M active per token, "
                  f"{r['model']['dtype']}; mixtral_jax layout `{r['model']['layout']}`")
    stored, experts = r["model"].get("checkpoint_dtype"), r["model"].get("expert_dtype")
    if stored and stored != r["model"]["dtype"]:
        model_line += (f"; checkpoint written in {stored}, both sides compute in {r['model']['dtype']}, "
                       f"mixtral_jax keeps the experts in {experts}")
    setup = ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.1f} s"
                      for name, seconds in r["setup_s"].items())
    text = f"""# Benchmarks

`{r['command']}` on {r['date']}.

- Machine: {m['nproc']} CPU cores ({m['cpu']}, L3 {m['l3_cache'] or 'unknown'}), {m['memory_gib']} GiB memory,
  jax backend `{r['jax_backend']}`.
- Versions: python {m['python']}, jax {m['jax']}, torch {m['torch']}, transformers {m['transformers']}.
- Model (random weights): {model_line}.
- {r['repeats']} timed rounds; set-up: {setup}.

{render_table(r)}

![decode and prefill tokens/s]({png_name})

{METHOD}"""
    with open(path, "w") as f:
        f.write(text)
