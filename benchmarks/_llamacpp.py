"""llama.cpp's side of benchmarks/ab_llamacpp.py: HF export, GGUF conversion, llama-bench, llama-perplexity, logits.

The llama.cpp tree is the one /work/shared/tools/build_llamacpp.sh builds from the llama-cpp-python sdist:
ROOT/build/bin holds the tools and libllama.so, ROOT/src the Python bindings (llama_cpp/) and ROOT/src/vendor/llama.cpp
the converter. Run as a script (`python _llamacpp.py logits ...`) it evaluates a GGUF in a process of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np


class Tools:
    """Paths of one llama.cpp build (ROOT as build_llamacpp.sh lays it out)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.bin = os.path.join(self.root, "build", "bin")
        self.converter = os.path.join(self.root, "src", "vendor", "llama.cpp", "convert_hf_to_gguf.py")
        missing = [p for p in (self.tool("llama-bench"), self.tool("llama-quantize"), self.tool("llama-perplexity"),
                               self.converter) if not os.path.exists(p)]
        if missing:
            raise SystemExit(f"llama.cpp build incomplete under {self.root} (missing {', '.join(missing)}); build "
                             f"it with /work/shared/tools/build_llamacpp.sh DIR and pass --llamacpp DIR "
                             f"(or set LLAMACPP_DIR).")

    def tool(self, name: str) -> str:
        return os.path.join(self.bin, name)


# ---------------------------------------------------------------------------------------------
# Our stacked parameters -> a Hugging Face Mixtral checkpoint (the inverse of convert.py's tables).

def hf_tensors(params, cfg, layer: int | None):
    """{HF key: float32 [out, in] array} of one decoder layer of stacked float params (model.params() of a
    layout="stacked" model), or of the embedding, final norm and lm_head for layer None."""
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    if layer is None:
        return {"model.embed_tokens.weight": f32(params["embed"]), "model.norm.weight": f32(params["final_norm"]),
                "lm_head.weight": f32(np.asarray(params["lm_head"]).T)}
    lay, l, p = params["layers"], layer, f"model.layers.{layer}."
    d, hq, hkv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {p + "input_layernorm.weight": f32(lay["attn_norm"][l]),
           p + "post_attention_layernorm.weight": f32(lay["mlp_norm"][l]),
           p + "self_attn.q_proj.weight": f32(np.asarray(lay["wq"][l]).reshape(d, hq).T),
           p + "self_attn.k_proj.weight": f32(np.asarray(lay["wk"][l]).reshape(d, hkv).T),
           p + "self_attn.v_proj.weight": f32(np.asarray(lay["wv"][l]).reshape(d, hkv).T),
           p + "self_attn.o_proj.weight": f32(np.asarray(lay["wo"][l]).reshape(hq, d).T),
           p + "block_sparse_moe.gate.weight": f32(np.asarray(lay["router"][l]).T)}
    for name in ("w1", "w3", "w2"):
        w = np.asarray(lay[name][l])
        for e in range(cfg.num_local_experts):
            out[p + f"block_sparse_moe.experts.{e}.{name}.weight"] = f32(w[e].T)
    return out


def write_hf_checkpoint(params, cfg, out_dir: str, tokenizer_model: str) -> None:
    """config.json, one safetensors file per layer (one more for the rest) and tokenizer.model: what the
    converter reads. One layer in memory at a time besides `params`."""
    import shutil

    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    index, total = {}, 0
    for i, layer in enumerate([None] + list(range(cfg.num_hidden_layers))):
        fname = f"model-{i:05d}.safetensors"
        state = hf_tensors(params, cfg, layer)
        save_file(state, os.path.join(out_dir, fname), metadata={"format": "pt"})
        index.update({k: fname for k in state})
        total += sum(a.nbytes for a in state.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "float32"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))


def run(cmd: list[str], log: str) -> str:
    """Runs a tool, appending its output to `log`; a failure prints the tail and exits."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
    p = subprocess.run(cmd, capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-15:])
        raise SystemExit(f"{os.path.basename(cmd[0]) if 'python' not in cmd[0] else cmd[1]} failed "
                         f"(exit {p.returncode}); last lines:\n{tail}\nfull log: {log}")
    return p.stdout + p.stderr


# "TYPE+8": llama.cpp's TYPE for the experts and q8_0 for every other matrix, the layout of our int4 (experts in 4
# bits, the rest in 8), where llama-quantize's own TYPE mixes 4, 5, 6 and 8 bits in those.
REST_Q8 = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0",
           *(a for name in ("attn_q", "attn_k", "attn_v", "attn_output") for a in ("--tensor-type", f"{name}=q8_0"))]


def base_type(t: str) -> str:
    """The llama.cpp type of a type name ("q4_K_M+8" -> "q4_K_M")."""
    return t.split("+")[0]


def make_ggufs(tools: Tools, write_hf, out_dir: str, types: list[str], threads: int, log: str,
               reuse: bool = False) -> dict[str, str]:
    """{type: path}: the f32 GGUF by llama.cpp's converter from the HF checkpoint `write_hf(dir)` writes, each other
    type by llama-quantize from it ("TYPE+8": REST_Q8's layout); with `reuse`, files already there are kept."""
    import shutil

    paths = {t: os.path.join(out_dir, f"model-{t}.gguf") for t in ["f32"] + [t for t in types if t != "f32"]}
    if not (reuse and os.path.exists(paths["f32"])):
        hf_dir = os.path.join(out_dir, "hf")
        shutil.rmtree(hf_dir, ignore_errors=True)
        write_hf(hf_dir)
        run([sys.executable, tools.converter, hf_dir, "--outtype", "f32", "--outfile", paths["f32"]], log)
        shutil.rmtree(hf_dir)
        reuse = False  # new weights: every quantized file is stale
    for t, path in paths.items():
        if t != "f32" and not (reuse and os.path.exists(path)):
            extra = REST_Q8 if t.endswith("+8") else []
            run([tools.tool("llama-quantize"), *extra, paths["f32"], path, base_type(t).upper(), str(threads)], log)
    return paths


# ---------------------------------------------------------------------------------------------
# Speed: llama-bench, one invocation (warm-up + 1 repetition) per model and round.

def bench(tools: Tools, gguf: str, n_prompt: int, n_gen: int, threads: int) -> dict[str, float]:
    """{"prefill": tok/s, "decode": tok/s, "maxrss": peak resident bytes} of one llama-bench run (-r 1 after its
    own warm-up)."""
    import tempfile

    cmd = [tools.tool("llama-bench"), "-m", gguf, "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
           "-r", "1", "-o", "json"]
    peak = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        # VmHWM of the running tool: rusage's maxrss would also count the forked Python's pages.
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    peak = max(peak, int(re.search(r"VmHWM:\s*(\d+)", f.read()).group(1)) * 1024)
            except (OSError, AttributeError):
                pass
            time.sleep(0.05)
        out.seek(0), err.seek(0)
        text, errors = out.read(), err.read()
    if p.returncode:
        raise SystemExit(f"llama-bench failed on {gguf} (exit {p.returncode}):\n{errors[-2000:]}")
    res = {"maxrss": peak}
    for test in json.loads(text):
        res["prefill" if test["n_prompt"] else "decode"] = float(test["avg_ts"])
    return res


# ---------------------------------------------------------------------------------------------
# Accuracy: llama-perplexity's KL-divergence files and report, and the same statistics in numpy.

def perplexity_base(tools: Tools, gguf: str, text: str, base: str, ctx: int, chunks: int, threads: int, log: str):
    """llama-perplexity on `gguf` writing its log-probabilities (and tokens) to `base`; returns its PPL."""
    out = run([tools.tool("llama-perplexity"), "-m", gguf, "-f", text, "-c", str(ctx), "-b", str(ctx),
               "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", base], log)
    m = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    return float(m.group(1)) if m else float("nan")


def perplexity_kld(tools: Tools, gguf: str, base: str, ctx: int, chunks: int, threads: int, log: str) -> dict:
    """llama-perplexity --kl-divergence of `gguf` against `base`: its own summary lines, parsed."""
    cmd = [tools.tool("llama-perplexity"), "-m", gguf, "--kl-divergence-base", base, "--kl-divergence",
           "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    out = run(cmd, log)
    if "Same top p:" not in out:  # its asynchronous log thread has lost the summary on a loaded host: once more
        out = run(cmd, log)
    pats = {"ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
            "kld": r"Mean\s+KLD:\s*([-\d.e]+)", "rms_dp": r"RMS Δp\s*:\s*([\d.]+)",
            "same_top": r"Same top p:\s*([\d.]+)"}
    res = {}
    for k, pat in pats.items():
        m = re.search(pat, out)
        res[k] = float(m.group(1)) if m else float("nan")
    res["rms_dp"] /= 100
    res["same_top"] /= 100
    return res


def read_base(path: str):
    """A --kl-divergence-base file: (tokens [chunks, ctx], log-probs [chunks, ctx - 1 - ctx // 2, vocab])."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise SystemExit(f"{path} is not a llama-perplexity --kl-divergence-base file.")
        n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), np.int32)
        tokens = np.frombuffer(f.read(4 * n_chunk * n_ctx), np.int32).reshape(n_chunk, n_ctx)
        nv = 2 * ((n_vocab + 1) // 2) + 4
        n = n_ctx - 1 - n_ctx // 2
        raw = np.frombuffer(f.read(2 * n_chunk * n * nv), np.uint16).reshape(n_chunk, n, nv)
    head = np.ascontiguousarray(raw[..., :4]).view(np.float32)  # scale, min log-prob per position
    logp = raw[..., 4:4 + n_vocab].astype(np.float32) * head[..., :1] + head[..., 1:2]
    return tokens.copy(), logp


def scored(tokens: np.ndarray, logits: np.ndarray):
    """llama-perplexity's scored positions: the second half of each chunk, each predicting the next token."""
    ctx = tokens.shape[1]
    first = ctx // 2
    return logits[:, first:ctx - 1], tokens[:, first + 1:]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def partial_stats(logits, targets, ref_logits=None, ref_logp=None, lp=None) -> dict:
    """Sums over one batch of positions for `combine`: llama-perplexity's statistics of `logits` [..., V] against a
    reference (its raw logits, or log-probs as a --kl-divergence-base file holds them) with its definitions: KLD
    summed over the reference's tokens with log p > -16, Δp of the target token's probability, same argmax; plus
    the relative max / RMS logit error where the reference's raw logits are given. `lp`, `ref_logp`: the log-probs
    when already computed."""
    lp = log_softmax(logits) if lp is None else lp
    ref = log_softmax(ref_logits) if ref_logp is None else np.asarray(ref_logp, np.float64)
    t = np.asarray(targets)[..., None]
    nll, nll_ref = -np.take_along_axis(lp, t, -1)[..., 0], -np.take_along_axis(ref, t, -1)[..., 0]
    kld = np.where(ref > -16, np.exp(ref) * (ref - lp), 0).sum(-1)
    dp = np.exp(-nll) - np.exp(-nll_ref)
    out = {"n": nll.size, "nll": nll.sum(), "nll_ref": nll_ref.sum(), "kld": kld.sum(), "dp2": (dp ** 2).sum(),
           "same_top": (lp.argmax(-1) == ref.argmax(-1)).sum()}
    if ref_logits is not None:
        err = np.asarray(logits, np.float64) - np.asarray(ref_logits, np.float64)
        out.update(err_max=np.abs(err).max(), ref_max=np.abs(ref_logits).max(), err2=(err ** 2).sum(),
                   ref2=(np.asarray(ref_logits, np.float64) ** 2).sum(), count=err.size)
    return out


def combine(parts: list[dict]) -> dict:
    """PPL, PPL of the reference, mean KLD, RMS Δp, same-top share and (with raw reference logits) the relative
    max |error| / max |reference| and RMS error / RMS reference over all positions of `partial_stats` sums."""
    s = {k: sum(p[k] for p in parts) for k in parts[0] if k not in ("err_max", "ref_max")}
    n = s["n"]
    out = {"positions": int(n), "ppl": float(np.exp(s["nll"] / n)), "ppl_base": float(np.exp(s["nll_ref"] / n)),
           "kld": float(s["kld"] / n), "rms_dp": float(np.sqrt(s["dp2"] / n)), "same_top": float(s["same_top"] / n)}
    if "err_max" in parts[0]:
        out["rel_max"] = float(max(p["err_max"] for p in parts) / max(p["ref_max"] for p in parts))
        out["rel_rms"] = float(np.sqrt(s["err2"] / s["ref2"]))
    return out


# ---------------------------------------------------------------------------------------------
# Raw logits from libllama through llama-cpp-python's ctypes bindings, in a process of its own.

def logits(root: str, gguf: str, tokens: np.ndarray, threads: int, out: str, kv: str = "f16") -> np.ndarray | None:
    """llama.cpp's float32 logits [chunks, ctx - 1 - ctx // 2, V] at the scored positions of each chunk (BOS
    first, as llama-perplexity feeds it), or None when the bindings do not load (the reason is printed). `kv`:
    "f16", llama.cpp's defaults as in llama-perplexity and llama-bench (float16 KV cache, flash attention on the
    CPU), or "f32": a float32 cache and no flash attention, all float32 arithmetic."""
    tok = out + ".tokens.npy"
    np.save(tok, tokens)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "logits", root, gguf, tok, str(threads), out, kv],
                       capture_output=True, text=True)
    os.remove(tok)
    if p.returncode:
        print(f"  (no raw llama.cpp logits for {os.path.basename(gguf)}: {(p.stderr or p.stdout).strip()[-300:]})")
        return None
    return np.load(out, mmap_mode="r")


def _logits_main(root, gguf, tok_path, threads, out, kv):
    import ctypes
    import types

    os.environ["LLAMA_CPP_LIB_PATH"] = os.path.join(root, "build", "bin")
    # Only the ctypes layer: the package's __init__ pulls in the high-level API and its extra dependencies.
    package = types.ModuleType("llama_cpp")
    package.__path__ = [os.path.join(root, "src", "llama_cpp")]
    sys.modules["llama_cpp"] = package
    import llama_cpp.llama_cpp as L

    tokens = np.load(tok_path)
    n_chunk, ctx = tokens.shape
    first = ctx // 2
    quiet = L.llama_log_callback(lambda *a: None)  # kept referenced: libllama calls it later
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = ctx, ctx, ctx
    cp.n_threads = cp.n_threads_batch = threads
    if kv == "f32":  # the float32 cache alone changes nothing: the CPU flash-attention kernel rounds Q to float16
        cp.type_k = cp.type_v = L.GGML_TYPE_F32
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    lctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    result = np.lib.format.open_memmap(out, "w+", np.float32, (n_chunk, ctx - 1 - first, n_vocab))
    batch = L.llama_batch_init(ctx, 0, 1)
    for c in range(n_chunk):
        L.llama_memory_clear(L.llama_get_memory(lctx), True)
        for i in range(ctx):
            batch.token[i] = L.llama_vocab_bos(vocab) if i == 0 else int(tokens[c, i])
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i >= first
        batch.n_tokens = ctx
        if L.llama_decode(lctx, batch):
            raise SystemExit("llama_decode failed")
        ptr = L.llama_get_logits(lctx)
        result[c] = np.ctypeslib.as_array(ptr, shape=(ctx - first, n_vocab))[:ctx - 1 - first]
    result.flush()
    L.llama_batch_free(batch)
    L.llama_free(lctx)
    L.llama_model_free(model)


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "logits":
    _logits_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7])
