"""Prefill-like MoE layer on XLA:CPU: T=512 tokens, top-2 of E=8, D=1024, F=3584, f32.
One layer's experts w1,w3 [E,D,F], w2 [E,F,D] passed as jit arguments.
Useful FLOPs = T*K*3*2*D*F = 22.5 GFLOP (dense all-experts does 4x that).

usage: python prefill_moe.py [--T 512] [--variants ...] [--reps 5]
"""
import argparse, os, time
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
from common import bench, hlo_materialisations, wait_quiet, QUIET_LOG

D, F, E, K = 1024, 3584, 8, 2
silu = jax.nn.silu


def dense(x, W, ids, g):
    """all experts for all tokens: batched einsum over E (x broadcast), gates 0 for unchosen."""
    w1, w3, w2 = W['w1'], W['w3'], W['w2']
    xb = jnp.broadcast_to(x, (E,) + x.shape)
    hmid = silu(jnp.einsum('etd,edf->etf', xb, w1)) * jnp.einsum('etd,edf->etf', xb, w3)
    y = jnp.einsum('etf,efd->etd', hmid, w2)
    gd = jnp.sum(jax.nn.one_hot(ids, E, dtype=x.dtype) * g[..., None], axis=1)   # [T,E]
    return jnp.einsum('te,etd->td', gd, y)


def _dispatch(ids, g, T, C):
    """sort (token,slot) assignments by expert; fixed capacity C per expert.
    returns tok [E*C] (token index per slot), gate [E*C] (0 for empty/dropped slots)."""
    e_flat = ids.reshape(-1)                                   # [T*K]
    t_flat = jnp.repeat(jnp.arange(T, dtype=jnp.int32), K)
    g_flat = g.reshape(-1)
    order = jnp.argsort(e_flat, stable=True)
    e_s, t_s, g_s = e_flat[order], t_flat[order], g_flat[order]
    counts = jnp.bincount(e_flat, length=E)
    starts = jnp.cumsum(counts) - counts
    pos = jnp.arange(T * K, dtype=jnp.int32) - starts[e_s]
    keep = pos < C
    slot = jnp.where(keep, e_s * C + pos, E * C)               # E*C = overflow bin (dropped)
    tok = jnp.zeros((E * C + 1,), jnp.int32).at[slot].set(t_s)[:E * C]
    gate = jnp.zeros((E * C + 1,), x_dtype := jnp.float32).at[slot].set(jnp.where(keep, g_s, 0.0))[:E * C]
    return tok, gate


def grouped(C):
    def f(x, W, ids, g):
        """sort by expert, capacity C, batched einsum [E,C,D]x[E,D,F], scatter-add back."""
        T = x.shape[0]
        tok, gate = _dispatch(ids, g, T, C)
        xg = x[tok].reshape(E, C, D)
        hmid = silu(jnp.einsum('ecd,edf->ecf', xg, W['w1'])) * jnp.einsum('ecd,edf->ecf', xg, W['w3'])
        y = jnp.einsum('ecf,efd->ecd', hmid, W['w2']).reshape(E * C, D) * gate[:, None]
        return jnp.zeros_like(x).at[tok].add(y)
    f.__doc__ = f"grouped capacity C={C}: sort by expert, batched einsum over [E,C,D]x[E,D,F], scatter-add"
    return f


def grouped_t(C):
    def f(x, W, ids, g):
        T = x.shape[0]
        tok, gate = _dispatch(ids, g, T, C)
        xg = x[tok].reshape(E, C, D)
        hmid = silu(jnp.einsum('ecd,efd->ecf', xg, W['w1t'])) * jnp.einsum('ecd,efd->ecf', xg, W['w3t'])
        y = jnp.einsum('ecf,edf->ecd', hmid, W['w2t']).reshape(E * C, D) * gate[:, None]
        return jnp.zeros_like(x).at[tok].add(y)
    f.__doc__ = f"grouped C={C}, torch (out x in) weight layout"
    return f


def loop_experts(C, src):
    def f(x, W, ids, g):
        """python loop over experts; gather C tokens, [C,D]x[D,F] per expert, scatter-add."""
        T = x.shape[0]
        tok, gate = _dispatch(ids, g, T, C)
        out = jnp.zeros_like(x)
        for e in range(E):
            if src == 'stacked':
                w1, w3, w2 = W['w1'][e], W['w3'][e], W['w2'][e]
            else:
                w1, w3, w2 = W['w1l'][e], W['w3l'][e], W['w2l'][e]
            te, ge = tok[e * C:(e + 1) * C], gate[e * C:(e + 1) * C]
            xe = x[te]
            y = ((silu(xe @ w1) * (xe @ w3)) @ w2) * ge[:, None]
            out = out.at[te].add(y)
        return out
    f.__doc__ = f"loop over experts (C={C}), weights from {'static slice of stacked [E,D,F]' if src=='stacked' else 'separate per-expert buffers'}"
    return f


def ragged(x, W, ids, g):
    """jax.lax.ragged_dot on tokens sorted by expert (group sizes = counts)."""
    T = x.shape[0]
    e_flat = ids.reshape(-1); t_flat = jnp.repeat(jnp.arange(T), K); g_flat = g.reshape(-1)
    order = jnp.argsort(e_flat, stable=True)
    xs = x[t_flat[order]]
    gs = jnp.bincount(e_flat, length=E).astype(jnp.int32)
    hmid = silu(lax.ragged_dot(xs, W['w1'], gs)) * lax.ragged_dot(xs, W['w3'], gs)
    y = lax.ragged_dot(hmid, W['w2'], gs) * g_flat[order][:, None]
    return jnp.zeros_like(x).at[t_flat[order]].add(y)


def tiles(Tt, src):
    def f(x, W, ids, g):
        """exact (drop-free) grouping: each expert's rows padded to a multiple of Tt; fori_loop
        over row tiles, lax.switch(tile's expert) picks the weights; unused tiles skipped."""
        T = x.shape[0]
        A = T * K
        R = ((A + E * Tt) + Tt - 1) // Tt * Tt          # static bound on padded rows
        nt = R // Tt
        e_flat = ids.reshape(-1); t_flat = jnp.repeat(jnp.arange(T, dtype=jnp.int32), K); g_flat = g.reshape(-1)
        order = jnp.argsort(e_flat, stable=True)
        e_s, t_s, g_s = e_flat[order], t_flat[order], g_flat[order]
        counts = jnp.bincount(e_flat, length=E)
        pc = (counts + Tt - 1) // Tt * Tt
        pstart = jnp.cumsum(pc) - pc
        start = jnp.cumsum(counts) - counts
        row = pstart[e_s] + jnp.arange(A, dtype=jnp.int32) - start[e_s]
        tok = jnp.zeros((R,), jnp.int32).at[row].set(t_s)
        gate = jnp.zeros((R,), jnp.float32).at[row].set(g_s)
        tile_start = jnp.arange(nt, dtype=jnp.int32) * Tt
        pend = jnp.cumsum(pc)
        tile_e = jnp.searchsorted(pend, tile_start, side='right').astype(jnp.int32)   # == E -> unused
        Xp = x[tok]
        def branch(e):
            def b(xt):
                if src == 'sep':
                    w1, w3, w2 = W['w1l'][e], W['w3l'][e], W['w2l'][e]
                else:
                    w1, w3, w2 = W['w1'][e], W['w3'][e], W['w2'][e]
                return (silu(xt @ w1) * (xt @ w3)) @ w2
            return b
        branches = [branch(e) for e in range(E)] + [lambda xt: jnp.zeros_like(xt)]
        def body(i, Y):
            xt = lax.dynamic_slice_in_dim(Xp, i * Tt, Tt)
            return lax.dynamic_update_slice_in_dim(Y, lax.switch(tile_e[i], branches, xt), i * Tt, 0)
        Y = lax.fori_loop(0, nt, body, jnp.zeros((R, D), jnp.float32))
        return jnp.zeros_like(x).at[tok].add(Y * gate[:, None])
    f.__doc__ = f"tiles of {Tt} rows, switch on expert, weights {src}"
    return f


def masked_dense_loop(x, W, ids, g):
    """loop over experts, each expert on ALL T tokens (mask via gate); separate buffers."""
    gd = jnp.sum(jax.nn.one_hot(ids, E, dtype=x.dtype) * g[..., None], axis=1)
    out = jnp.zeros_like(x)
    for e in range(E):
        out = out + gd[:, e:e + 1] * ((silu(x @ W['w1l'][e]) * (x @ W['w3l'][e])) @ W['w2l'][e])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--T', type=int, default=512)
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--variants', default='')
    a = ap.parse_args()
    T = a.T
    rng = np.random.default_rng(0)
    def rnd(s, sc):
        z = rng.standard_normal(s, dtype=np.float32); z *= sc; return z
    w1, w3, w2 = rnd((E, D, F), D ** -0.5), rnd((E, D, F), D ** -0.5), rnd((E, F, D), F ** -0.5)
    W = {'w1': jnp.asarray(w1), 'w3': jnp.asarray(w3), 'w2': jnp.asarray(w2),
         'w1t': jnp.asarray(np.ascontiguousarray(w1.transpose(0, 2, 1))), 'w3t': jnp.asarray(np.ascontiguousarray(w3.transpose(0, 2, 1))),
         'w2t': jnp.asarray(np.ascontiguousarray(w2.transpose(0, 2, 1))),
         'w1l': [jnp.asarray(w1[e]) for e in range(E)], 'w3l': [jnp.asarray(w3[e]) for e in range(E)], 'w2l': [jnp.asarray(w2[e]) for e in range(E)]}
    del w1, w3, w2
    x = jnp.asarray(rng.standard_normal((T, D), dtype=np.float32))
    ids = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32))
    g = rng.random((T, K)).astype(np.float32); g /= g.sum(-1, keepdims=True); g = jnp.asarray(g)
    loads = np.bincount(np.asarray(ids).reshape(-1), minlength=E)
    cap = T * K // E
    V = {'dense_all_experts': dense}
    for C in (cap, cap * 9 // 8, cap * 5 // 4, cap * 3 // 2, cap * 2):
        V[f'grouped_C{C}'] = grouped(C)
    for C in (cap, cap * 5 // 4, cap * 3 // 2):
        V[f'grouped_t_C{C}'] = grouped_t(C)
    V.update({
         f'loop_experts_stacked_C{cap*5//4}': loop_experts(cap * 5 // 4, 'stacked'),
         f'loop_experts_sep_C{cap*5//4}': loop_experts(cap * 5 // 4, 'sep'),
         'ragged_dot': ragged, 'masked_dense_loop_sep': masked_dense_loop,
         'tiles_sep_T128': tiles(128, 'sep'), 'tiles_sep_T64': tiles(64, 'sep'), 'tiles_sep_T32': tiles(32, 'sep'),
         'tiles_stacked_T128': tiles(128, 'stacked')})
    names = a.variants.split(',') if a.variants else list(V)
    useful = T * K * 3 * 2 * D * F
    print(f"T={T}  expert loads={loads.tolist()} (max {loads.max()}), useful FLOP={useful/1e9:.1f} G")
    refo = np.asarray(jax.jit(dense)(x, W, ids, g))
    mm = jax.jit(lambda a, b: a @ b); ma = jnp.asarray(rnd((512, D), 1.0)); mb_ = jnp.asarray(rnd((D, F), 1.0))
    print(f"{'variant':32s} {'ms':>8s} {'min':>8s} {'useful GFLOP/s':>14s} {'exec GFLOP/s':>12s} {'ref mm GF/s':>11s} {'frac':>5s} {'compile_s':>9s} {'relerr':>8s} {'busy':>4s}  big buffers")
    for n in names:
        f = V[n]
        t0 = time.perf_counter(); c = jax.jit(f).lower(x, W, ids, g).compile(); tc = time.perf_counter() - t0
        o = np.asarray(c(x, W, ids, g))
        err = float(np.max(np.abs(o - refo)) / np.max(np.abs(refo)))
        jax.block_until_ready(c(x, W, ids, g))
        ts, rg = [], []
        for _ in range(a.reps):
            wait_quiet()
            t1 = time.perf_counter(); jax.block_until_ready(mm(ma, mb_)); rg.append(2 * 512 * D * F / (time.perf_counter() - t1) / 1e9)
            t1 = time.perf_counter(); jax.block_until_ready(c(x, W, ids, g)); ts.append(time.perf_counter() - t1)
        med, mn, rgf = float(np.median(ts)), min(ts), float(np.median(rg))
        busy = max(QUIET_LOG[-a.reps:])
        if n.startswith('tiles'):
            Tt = int(n.split('_T')[-1]); execf = int(np.sum(-(-loads // Tt))) * Tt * 3 * 2 * D * F
        elif n.startswith('dense') or n.startswith('masked') or n == 'ragged_dot':
            execf = T * E * 3 * 2 * D * F if n != 'ragged_dot' else None
        else:
            C = int(n.split('_C')[-1]); execf = E * C * 3 * 2 * D * F
        mats = [m for m in hlo_materialisations(c.as_text(), min_bytes=8 << 20)]
        ex = f"{execf/med/1e9:12.1f}" if execf else f"{'?':>12s}"
        print(f"{n:32s} {med*1e3:8.1f} {mn*1e3:8.1f} {useful/med/1e9:14.1f} {ex} {rgf:11.1f} {(execf/med/1e9/rgf if execf else float('nan')):5.2f} {tc:9.1f} {err:8.1e} {busy:4.2f}  {'; '.join(sorted(set(mats)))[:200] or 'none'}", flush=True)


if __name__ == '__main__':
    main()
