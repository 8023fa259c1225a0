"""Reference numbers: XLA f32 matvec streaming bandwidth (W bigger than the
260 MiB L3 and also a 117 MB W), XLA f32 matmul GFLOP/s, torch/numpy matvec
bandwidth.  Run with different XLA_FLAGS to compare backends."""
import os, sys, time, statistics
import numpy as np
import jax, jax.numpy as jnp
from common import bench, wait_quiet

def qbench(*a, **k):
    wait_quiet()
    return bench(*a, **k)

D, F = 1024, 3584
rng = np.random.default_rng(0)
print("XLA_FLAGS=", os.environ.get("XLA_FLAGS", ""))

def report(name, t, nbytes=None, flops=None):
    s = f"{name:55s} {t*1e3:8.2f} ms"
    if nbytes: s += f"  {nbytes/t/1e9:6.1f} GB/s"
    if flops: s += f"  {flops/t/1e9:7.1f} GFLOP/s"
    print(s, flush=True)

for (K, N) in [(D, 8 * F), (D, 32 * F)]:   # 117 MB (fits L3) and 470 MB (does not)
    W = jnp.asarray(rng.standard_normal((K, N), dtype=np.float32))
    WT = jnp.asarray(np.asarray(W).T.copy())
    for B in (1, 4, 16):
        x = jnp.asarray(rng.standard_normal((B, K), dtype=np.float32))
        f = jax.jit(lambda x, W: x @ W)
        t, _, _ = qbench(f, x, W, reps=9)
        report(f"xla x[{B},{K}] @ W[{K},{N}]  ({W.size*4/1e6:.0f} MB)", t, nbytes=W.size * 4)
        f = jax.jit(lambda x, WT: jnp.einsum('bk,nk->bn', x, WT))
        t, _, _ = qbench(f, x, WT, reps=9)
        report(f"xla x[{B},{K}] . WT[{N},{K}] (out x in)", t, nbytes=W.size * 4)
    del W, WT

if os.environ.get("SKIP_MATMUL"): sys.exit()
for (M, K, N) in [(128, 1024, 3584), (512, 1024, 3584), (1024, 1024, 3584), (2048, 2048, 2048)]:
    a = jnp.asarray(rng.standard_normal((M, K), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((K, N), dtype=np.float32))
    f = jax.jit(lambda a, b: a @ b)
    t, _, _ = qbench(f, a, b, reps=7)
    report(f"xla matmul [{M},{K}]x[{K},{N}]", t, flops=2 * M * K * N)
# batched matmul (prefill grouped shape)
a = jnp.asarray(rng.standard_normal((8, 128, 1024), dtype=np.float32))
b = jnp.asarray(rng.standard_normal((8, 1024, 3584), dtype=np.float32))
f = jax.jit(lambda a, b: jnp.einsum('ecd,edf->ecf', a, b))
t, _, _ = qbench(f, a, b, reps=7)
report("xla bmm [8,128,1024]x[8,1024,3584]", t, flops=2 * 8 * 128 * 1024 * 3584)

if os.environ.get("SKIP_TORCH"): sys.exit()
import torch
torch.set_num_threads(2)
print("torch threads", torch.get_num_threads())
def tbench(fn, reps=9):
    wait_quiet()
    for _ in range(2): fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
for (K, N) in [(D, 8 * F), (D, 32 * F)]:
    W = torch.randn(K, N)
    WT = W.t().contiguous()  # [N, K] torch Linear layout
    for B in (1, 4, 16):
        x = torch.randn(B, K)
        t = tbench(lambda: x @ W); report(f"torch x[{B},{K}] @ W[{K},{N}]", t, nbytes=W.numel() * 4)
        t = tbench(lambda: torch.nn.functional.linear(x, WT)); report(f"torch linear x[{B},{K}], W[{N},{K}]", t, nbytes=W.numel() * 4)
    Wn = W.numpy(); xn = np.random.randn(1, K).astype(np.float32)
    t = tbench(lambda: xn @ Wn); report(f"numpy x[1,{K}] @ W[{K},{N}]", t, nbytes=W.numel() * 4)
    del W, WT
a = torch.randn(1024, 1024); b = torch.randn(1024, 3584)
t = tbench(lambda: a @ b, reps=7); report("torch matmul [1024,1024]x[1024,3584]", t, flops=2*1024*1024*3584)
