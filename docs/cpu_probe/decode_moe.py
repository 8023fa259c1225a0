"""Decode-step MoE formulations on XLA:CPU.

Model: D=1024, F=3584, L=8, E=8, top-2, float32.
  w1, w3: [L, E, D, F]   w2: [L, E, F, D]   (x @ W layout, "in x out")
  wq, wo: [L, D, D]      (attention-like dense weights, 8 MB/layer)
Inputs: h [B, D], expert ids [L, B, 2] (int32, distinct per token), gates [L, B, 2].
Every variant is one jax.jit taking the stacked weights as *arguments*.

usage: python decode_moe.py [--B 1,4,16] [--variants a,b,...] [--reps 7]
"""
import argparse, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
from common import bench, hlo_materialisations, count_ops, RefMatvec, bench_interleaved, QUIET_LOG

D, F, L, E, K = 1024, 3584, 8, 8, 2
f32 = jnp.float32
silu = jax.nn.silu


def rms(h):
    return h * lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


def attn(h, wq, wo):
    """attention-like dense part (post-norm keeps the magnitudes O(1) across layers)."""
    return rms(h + jnp.tanh(h @ wq) @ wo)


# ----------------------------------------------------------------------------
# (a) scan with xs = stacked weights; per-layer slice then gather / index.
def v_a_take(h, P, ids, gates):
    """scan xs=weights; jnp.take of chosen experts -> [B,2,D,F] -> einsum."""
    def body(h, xs):
        wq, wo, w1, w3, w2, idl, gl = xs
        h = attn(h, wq, wo)
        W1 = jnp.take(w1, idl, axis=0); W3 = jnp.take(w3, idl, axis=0); W2 = jnp.take(w2, idl, axis=0)
        a = jnp.einsum('bd,bkdf->bkf', h, W1); c = jnp.einsum('bd,bkdf->bkf', h, W3)
        y = jnp.einsum('bkf,bkfd->bkd', silu(a) * c, W2)
        return h + jnp.einsum('bk,bkd->bd', gl, y), None
    return lax.scan(body, h, (P['wq'], P['wo'], P['w1'], P['w3'], P['w2'], ids, gates))[0]


def v_a_index(h, P, ids, gates):
    """scan xs=weights; per (token, slot) pair w1_l[e] (dynamic index) -> matvec."""
    B = h.shape[0]
    def body(h, xs):
        wq, wo, w1, w3, w2, idl, gl = xs
        h = attn(h, wq, wo)
        rows = []
        for b in range(B):
            x = h[b:b + 1]; acc = jnp.zeros_like(x)
            for k in range(K):
                e = idl[b, k]
                acc = acc + gl[b, k] * ((silu(x @ w1[e]) * (x @ w3[e])) @ w2[e])
            rows.append(acc)
        return h + jnp.concatenate(rows, 0), None
    return lax.scan(body, h, (P['wq'], P['wo'], P['w1'], P['w3'], P['w2'], ids, gates))[0]


# ----------------------------------------------------------------------------
# (b) scan over layer index; dynamic_slice straight out of the full [L,E,D,F].
def _ds(w, l, e):
    return lax.dynamic_slice(w, (l, e, 0, 0), (1, 1) + w.shape[2:]).reshape(w.shape[2:])


def _pairs_moe(h, l, idl, gl, P, mv):
    """loop over (token, slot) pairs; mv(x, W) is the matvec."""
    B = h.shape[0]
    rows = []
    for b in range(B):
        x = h[b:b + 1]; acc = jnp.zeros_like(x)
        for k in range(K):
            e = idl[b, k]
            acc = acc + gl[b, k] * mv(silu(mv(x, _ds(P['w1'], l, e))) * mv(x, _ds(P['w3'], l, e)), _ds(P['w2'], l, e))
        rows.append(acc)
    return jnp.concatenate(rows, 0)


def _layer_scan(h, P, ids, gates, moe):
    def body(h, xs):
        l, idl, gl = xs
        h = attn(h, lax.dynamic_index_in_dim(P['wq'], l, keepdims=False),
                 lax.dynamic_index_in_dim(P['wo'], l, keepdims=False))
        return h + moe(h, l, idl, gl, P), None
    return lax.scan(body, h, (jnp.arange(L), ids, gates))[0]


def v_b_dslice(h, P, ids, gates):
    """scan over l; dynamic_slice(w,(l,e,0,0)) per pair -> dot."""
    return _layer_scan(h, P, ids, gates, lambda h, l, i, g, P: _pairs_moe(h, l, i, g, P, lambda x, W: x @ W))


def v_b_gather(h, P, ids, gates):
    """scan over l; one gather w1[l, ids] -> [B,2,D,F] -> batched einsum."""
    def moe(h, l, idl, gl, P):
        W1 = P['w1'][l, idl]; W3 = P['w3'][l, idl]; W2 = P['w2'][l, idl]
        a = jnp.einsum('bd,bkdf->bkf', h, W1); c = jnp.einsum('bd,bkdf->bkf', h, W3)
        y = jnp.einsum('bkf,bkfd->bkd', silu(a) * c, W2)
        return jnp.einsum('bk,bkd->bd', gl, y)
    return _layer_scan(h, P, ids, gates, moe)


# (c) as (b) but matvec as multiply + reduce
def v_c_mulred(h, P, ids, gates):
    """scan over l; dynamic_slice + sum(x[:,:,None]*W, 1) (reduce over major dim)."""
    return _layer_scan(h, P, ids, gates, lambda h, l, i, g, P: _pairs_moe(
        h, l, i, g, P, lambda x, W: jnp.sum(x[:, :, None] * W[None], axis=1)))


def v_c_mulred_t(h, P, ids, gates):
    """torch layout (out x in) weights; dynamic_slice + sum(x[:,None,:]*Wt, -1) (minor-dim reduce)."""
    Pt = {'wq': P['wq'], 'wo': P['wo'], 'w1': P['w1t'], 'w3': P['w3t'], 'w2': P['w2t']}
    return _layer_scan(h, Pt, ids, gates, lambda h, l, i, g, P: _pairs_moe(
        h, l, i, g, P, lambda x, W: jnp.sum(x[:, None, :] * W[None], axis=-1)))


# (d) Python-unrolled layers, static l, dynamic e
def v_d_unrolled(h, P, ids, gates):
    """python loop over layers (static l), dynamic_slice expert (l static, e dynamic)."""
    for l in range(L):
        h = attn(h, P['wq'][l], P['wo'][l])
        h = h + _pairs_moe(h, l, ids[l], gates[l], P, lambda x, W: x @ W)
    return h


def v_d_unrolled_idx(h, P, ids, gates):
    """python loop over layers; w1[l][e] numpy-style indexing."""
    B = h.shape[0]
    for l in range(L):
        h = attn(h, P['wq'][l], P['wo'][l])
        rows = []
        for b in range(B):
            x = h[b:b + 1]; acc = jnp.zeros_like(x)
            for k in range(K):
                e = ids[l, b, k]
                acc = acc + gates[l, b, k] * ((silu(x @ P['w1'][l][e]) * (x @ P['w3'][l][e])) @ P['w2'][l][e])
            rows.append(acc)
        h = h + jnp.concatenate(rows, 0)
    return h


# (e) loop over experts, lax.cond(expert used) with static expert index
def v_e_cond(h, P, ids, gates):
    """scan over l; for e in range(E): cond(any token uses e, ffn on all B tokens, 0)."""
    def moe(h, l, idl, gl, P):
        out = jnp.zeros_like(h)
        for e in range(E):
            ge = jnp.sum(jnp.where(idl == e, gl, 0.0), axis=1)           # [B]
            used = jnp.any(idl == e)
            def comp(h, ge, l=l, e=e):
                W1 = _ds(P['w1'], l, e); W3 = _ds(P['w3'], l, e); W2 = _ds(P['w2'], l, e)
                return ge[:, None] * ((silu(h @ W1) * (h @ W3)) @ W2)
            out = out + lax.cond(used, comp, lambda h, ge: jnp.zeros_like(h), h, ge)
        return out
    return _layer_scan(h, P, ids, gates, moe)


def v_e_cond_xs(h, P, ids, gates):
    """scan xs=weights; for e: cond(used, ffn with w1_l[e] static slice, 0)."""
    def body(h, xs):
        wq, wo, w1, w3, w2, idl, gl = xs
        h = attn(h, wq, wo)
        out = jnp.zeros_like(h)
        for e in range(E):
            ge = jnp.sum(jnp.where(idl == e, gl, 0.0), axis=1)
            def comp(h, ge, e=e):
                return ge[:, None] * ((silu(h @ w1[e]) * (h @ w3[e])) @ w2[e])
            out = out + lax.cond(jnp.any(idl == e), comp, lambda h, ge: jnp.zeros_like(h), h, ge)
        return h + out, None
    return lax.scan(body, h, (P['wq'], P['wo'], P['w1'], P['w3'], P['w2'], ids, gates))[0]


# (f) dense all experts
def _dense_gates(idl, gl):
    return jnp.sum(jax.nn.one_hot(idl, E, dtype=f32) * gl[..., None], axis=1)   # [B,E]


def v_f_dense(h, P, ids, gates):
    """scan xs=weights; all E experts via einsum over E (gates 0 for unchosen)."""
    def body(h, xs):
        wq, wo, w1, w3, w2, idl, gl = xs
        h = attn(h, wq, wo)
        a = jnp.einsum('bd,edf->bef', h, w1); c = jnp.einsum('bd,edf->bef', h, w3)
        y = jnp.einsum('bef,efd->bed', silu(a) * c, w2)
        return h + jnp.einsum('be,bed->bd', _dense_gates(idl, gl), y), None
    return lax.scan(body, h, (P['wq'], P['wo'], P['w1'], P['w3'], P['w2'], ids, gates))[0]


# (g) other ideas
def v_g_fused13(h, P, ids, gates):
    """(b) with w1|w3 fused into one [L,E,D,2F] array: 2 matvecs per expert instead of 3."""
    def mv_pairs(h, l, idl, gl, P):
        B = h.shape[0]; rows = []
        for b in range(B):
            x = h[b:b + 1]; acc = jnp.zeros_like(x)
            for k in range(K):
                e = idl[b, k]
                ac = x @ _ds(P['w13'], l, e)
                acc = acc + gl[b, k] * ((silu(ac[:, :F]) * ac[:, F:]) @ _ds(P['w2'], l, e))
            rows.append(acc)
        return jnp.concatenate(rows, 0)
    return _layer_scan(h, P, ids, gates, mv_pairs)


def v_g_torch_layout(h, P, ids, gates):
    """(b) with torch (out x in) layout: w1t,w3t [L,E,F,D], w2t [L,E,D,F]; x . W^T via dot_general."""
    Pt = {'wq': P['wq'], 'wo': P['wo'], 'w1': P['w1t'], 'w3': P['w3t'], 'w2': P['w2t']}
    return _layer_scan(h, Pt, ids, gates, lambda h, l, i, g, P: _pairs_moe(
        h, l, i, g, P, lambda x, W: jnp.einsum('bk,nk->bn', x, W)))


def v_g_uniq(h, P, ids, gates):
    """scan over l; inner fori_loop over the n_used unique experts of the batch
    (sorted, dynamic count); each iteration dynamic_slices expert e and does an M=B matmul."""
    B = h.shape[0]
    def moe(h, l, idl, gl, P):
        used = jnp.zeros((E,), bool).at[idl.reshape(-1)].set(True)
        order = jnp.argsort(~used, stable=True).astype(jnp.int32)   # used experts first
        n_used = jnp.sum(used).astype(jnp.int32)
        def it(i, out):
            e = order[i]
            ge = jnp.sum(jnp.where(idl == e, gl, 0.0), axis=1)
            W1 = _ds(P['w1'], l, e); W3 = _ds(P['w3'], l, e); W2 = _ds(P['w2'], l, e)
            return out + ge[:, None] * ((silu(h @ W1) * (h @ W3)) @ W2)
        return lax.fori_loop(0, n_used, it, jnp.zeros_like(h))
    return _layer_scan(h, P, ids, gates, moe)


def v_g_uniq_t(h, P, ids, gates):
    """v_g_uniq with torch (out x in) layout weights."""
    Pt = {'wq': P['wq'], 'wo': P['wo'], 'w1': P['w1t'], 'w3': P['w3t'], 'w2': P['w2t']}
    def moe(h, l, idl, gl, P):
        used = jnp.zeros((E,), bool).at[idl.reshape(-1)].set(True)
        order = jnp.argsort(~used, stable=True).astype(jnp.int32)
        n_used = jnp.sum(used).astype(jnp.int32)
        mv = lambda x, W: jnp.einsum('bk,nk->bn', x, W)
        def it(i, out):
            e = order[i]
            ge = jnp.sum(jnp.where(idl == e, gl, 0.0), axis=1)
            return out + ge[:, None] * mv(silu(mv(h, _ds(P['w1'], l, e))) * mv(h, _ds(P['w3'], l, e)), _ds(P['w2'], l, e))
        return lax.fori_loop(0, n_used, it, jnp.zeros_like(h))
    return _layer_scan(h, Pt, ids, gates, moe)


def v_g_pairs_fori(h, P, ids, gates):
    """scan over l; inner fori_loop over the B*2 (token,slot) pairs, each a dynamic_slice matvec."""
    B = h.shape[0]
    def moe(h, l, idl, gl, P):
        def it(p, out):
            b, k = p // K, p % K
            e = idl[b, k]
            x = lax.dynamic_slice_in_dim(h, b, 1)
            y = gl[b, k] * ((silu(x @ _ds(P['w1'], l, e)) * (x @ _ds(P['w3'], l, e))) @ _ds(P['w2'], l, e))
            return lax.dynamic_update_slice_in_dim(out, lax.dynamic_slice_in_dim(out, b, 1) + y, b, 0)
        return lax.fori_loop(0, B * K, it, jnp.zeros_like(h))
    return _layer_scan(h, P, ids, gates, moe)


def v_g_while_layers(h, P, ids, gates):
    """layers via lax.while_loop (carry l) instead of scan; (b)-style dynamic_slice per pair."""
    def cond(c): return c[0] < L
    def body(c):
        l, h = c
        idl = lax.dynamic_index_in_dim(ids, l, keepdims=False)
        gl = lax.dynamic_index_in_dim(gates, l, keepdims=False)
        h = attn(h, lax.dynamic_index_in_dim(P['wq'], l, keepdims=False),
                 lax.dynamic_index_in_dim(P['wo'], l, keepdims=False))
        return l + 1, h + _pairs_moe(h, l, idl, gl, P, lambda x, W: x @ W)
    return lax.while_loop(cond, body, (jnp.int32(0), h))[1]


def v_g_map_layers(h, P, ids, gates):
    """scan xs=weights, but expert matvecs via lax.map over the B*2 pairs of gathered ids."""
    def body(h, xs):
        wq, wo, w1, w3, w2, idl, gl = xs
        h = attn(h, wq, wo)
        B = h.shape[0]
        xb = jnp.repeat(h, K, axis=0)                       # [B*2, D]
        def one(args):
            x, e = args
            x = x[None]
            return ((silu(x @ w1[e]) * (x @ w3[e])) @ w2[e])[0]
        y = lax.map(one, (xb, idl.reshape(-1)))             # [B*2, D]
        return h + jnp.sum(y.reshape(B, K, D) * gl[..., None], 1), None
    return lax.scan(body, h, (P['wq'], P['wo'], P['w1'], P['w3'], P['w2'], ids, gates))[0]


def v_f_dense_bat(h, P, ids, gates):
    """scan xs=weights; all E experts as a *batched* dot (batch dim E on both sides, no transpose)."""
    def body(h, xs):
        wq, wo, w1, w3, w2, idl, gl = xs
        h = attn(h, wq, wo)
        hb = jnp.broadcast_to(h, (E,) + h.shape)
        a = jnp.einsum('ebd,edf->ebf', hb, w1); c = jnp.einsum('ebd,edf->ebf', hb, w3)
        y = jnp.einsum('ebf,efd->ebd', silu(a) * c, w2)
        return h + jnp.einsum('be,ebd->bd', _dense_gates(idl, gl), y), None
    return lax.scan(body, h, (P['wq'], P['wo'], P['w1'], P['w3'], P['w2'], ids, gates))[0]


def v_f_dense_bat_unrolled(h, P, ids, gates):
    """python-unrolled layers; all E experts as batched dot on the static layer slice w1[l]."""
    for l in range(L):
        h = attn(h, P['wq'][l], P['wo'][l])
        hb = jnp.broadcast_to(h, (E,) + h.shape)
        a = jnp.einsum('ebd,edf->ebf', hb, P['w1'][l]); c = jnp.einsum('ebd,edf->ebf', hb, P['w3'][l])
        y = jnp.einsum('ebf,efd->ebd', silu(a) * c, P['w2'][l])
        h = h + jnp.einsum('be,ebd->bd', _dense_gates(ids[l], gates[l]), y)
    return h


# ---- (h) weights as separate per-(layer, expert) buffers (pytree of L*E arrays) --------------
def _list_ffn(x, P, l, i):
    return (silu(x @ P['w1l'][l][i]) * (x @ P['w3l'][l][i])) @ P['w2l'][l][i]


def v_h_list_switch(h, P, ids, gates):
    """python-unrolled layers; per (token,slot) pair lax.switch(e) over E branches, each reading
    its own per-expert buffer (no slicing of a stacked array at all)."""
    B = h.shape[0]
    for l in range(L):
        h = attn(h, P['wql'][l], P['wol'][l])
        rows = []
        for b in range(B):
            x = h[b:b + 1]; acc = jnp.zeros_like(x)
            for k in range(K):
                acc = acc + gates[l, b, k] * lax.switch(ids[l, b, k], [lambda x, i=i, l=l: _list_ffn(x, P, l, i) for i in range(E)], x)
            rows.append(acc)
        h = h + jnp.concatenate(rows, 0)
    return h


def v_h_list_cond(h, P, ids, gates):
    """python-unrolled layers; for each expert: cond(any token uses it, M=B FFN on its own buffer, 0)."""
    for l in range(L):
        h = attn(h, P['wql'][l], P['wol'][l])
        idl, gl = ids[l], gates[l]
        out = jnp.zeros_like(h)
        for e in range(E):
            ge = jnp.sum(jnp.where(idl == e, gl, 0.0), axis=1)
            out = out + lax.cond(jnp.any(idl == e), lambda h, ge, l=l, e=e: ge[:, None] * _list_ffn(h, P, l, e),
                                 lambda h, ge: jnp.zeros_like(h), h, ge)
        h = h + out
    return h


def v_h_list13_switch(h, P, ids, gates):
    """as h_list_switch but w1|w3 fused per expert ([D,2F] buffers)."""
    B = h.shape[0]
    def ffn(x, l, i):
        ac = x @ P['w13l'][l][i]
        return (silu(ac[:, :F]) * ac[:, F:]) @ P['w2l'][l][i]
    for l in range(L):
        h = attn(h, P['wql'][l], P['wol'][l])
        rows = []
        for b in range(B):
            x = h[b:b + 1]; acc = jnp.zeros_like(x)
            for k in range(K):
                acc = acc + gates[l, b, k] * lax.switch(ids[l, b, k], [lambda x, i=i, l=l: ffn(x, l, i) for i in range(E)], x)
            rows.append(acc)
        h = h + jnp.concatenate(rows, 0)
    return h



def v_h_list_cond_t(h, P, ids, gates):
    """h_list_cond with torch (out x in) layout per-expert buffers: w1t,w3t [F,D], w2t [D,F]."""
    mv = lambda x, W: jnp.einsum('bk,nk->bn', x, W)
    for l in range(L):
        h = attn(h, P['wql'][l], P['wol'][l])
        idl, gl = ids[l], gates[l]
        out = jnp.zeros_like(h)
        for e in range(E):
            ge = jnp.sum(jnp.where(idl == e, gl, 0.0), axis=1)
            def comp(h, ge, l=l, e=e):
                return ge[:, None] * mv(silu(mv(h, P['w1tl'][l][e])) * mv(h, P['w3tl'][l][e]), P['w2tl'][l][e])
            out = out + lax.cond(jnp.any(idl == e), comp, lambda h, ge: jnp.zeros_like(h), h, ge)
        h = h + out
    return h


def v_h_list13_fori(h, P, ids, gates):
    """h_list13_switch but the (token,slot) pairs are a fori_loop (switch inside): compile time
    independent of B."""
    B = h.shape[0]
    def ffn(x, l, i):
        ac = x @ P['w13l'][l][i]
        return (silu(ac[:, :F]) * ac[:, F:]) @ P['w2l'][l][i]
    for l in range(L):
        h = attn(h, P['wql'][l], P['wol'][l])
        idl, gl = ids[l].reshape(-1), gates[l].reshape(-1)
        def it(p, out, l=l, idl=idl, gl=gl, h=h):
            b = p // K
            x = lax.dynamic_slice_in_dim(h, b, 1)
            y = gl[p] * lax.switch(idl[p], [lambda x, i=i: ffn(x, l, i) for i in range(E)], x)
            return lax.dynamic_update_slice_in_dim(out, lax.dynamic_slice_in_dim(out, b, 1) + y, b, 0)
        h = h + lax.fori_loop(0, B * K, it, jnp.zeros_like(h))
    return h


def v_h_layer_dense(h, P, ids, gates):
    """per-layer buffers [E,D,F] (list over L, each a separate array); all experts as a batched
    dot reading the buffer in place (no copies).  Only sensible when ~all experts are used."""
    for l in range(L):
        h = attn(h, P['wql'][l], P['wol'][l])
        hb = jnp.broadcast_to(h, (E,) + h.shape)
        a = jnp.einsum('ebd,edf->ebf', hb, P['w1L'][l]); c = jnp.einsum('ebd,edf->ebf', hb, P['w3L'][l])
        y = jnp.einsum('ebf,efd->ebd', silu(a) * c, P['w2L'][l])
        h = h + jnp.einsum('be,ebd->bd', _dense_gates(ids[l], gates[l]), y)
    return h


def v_h_scan_switch(h, P, ids, gates):
    """lax.scan over layers (attention weights stacked, sliced by scan), MoE via
    lax.switch(l*E + e) over L*E branches, each branch reading its own per-(layer,expert)
    buffer (w1|w3 fused [D,2F], w2 [F,D]); pairs in a fori_loop."""
    B = h.shape[0]
    def ffn(x, j):
        l, i = divmod(j, E)
        ac = x @ P['w13l'][l][i]
        return (silu(ac[:, :F]) * ac[:, F:]) @ P['w2l'][l][i]
    branches = [lambda x, j=j: ffn(x, j) for j in range(L * E)]
    def body(h, xs):
        wq, wo, l, idl, gl = xs
        h = attn(h, wq, wo)
        idl, gl = idl.reshape(-1), gl.reshape(-1)
        def it(p, out):
            b = p // K
            x = lax.dynamic_slice_in_dim(h, b, 1)
            y = gl[p] * lax.switch(l * E + idl[p], branches, x)
            return lax.dynamic_update_slice_in_dim(out, lax.dynamic_slice_in_dim(out, b, 1) + y, b, 0)
        return h + lax.fori_loop(0, B * K, it, jnp.zeros_like(h)), None
    return lax.scan(body, h, (P['wq'], P['wo'], jnp.arange(L), ids, gates))[0]


def v_h_scan_cond_t(h, P, ids, gates):
    """lax.scan over layers (attention stacked, sliced by scan); for each expert e:
    lax.cond(e used by the batch, lax.switch(l, L branches reading the (l,e) buffer), 0);
    per-(layer,expert) buffers in torch (out x in) layout; M=B product per used expert."""
    mv = lambda x, W: jnp.einsum('bk,nk->bn', x, W)
    def ffn(h, l, e):
        return mv(silu(mv(h, P['w1tl'][l][e])) * mv(h, P['w3tl'][l][e]), P['w2tl'][l][e])
    def body(h, xs):
        wq, wo, l, idl, gl = xs
        h = attn(h, wq, wo)
        out = jnp.zeros_like(h)
        for e in range(E):
            ge = jnp.sum(jnp.where(idl == e, gl, 0.0), axis=1)
            def comp(h, ge, e=e):
                return ge[:, None] * lax.switch(l, [lambda h, l_=l_: ffn(h, l_, e) for l_ in range(L)], h)
            out = out + lax.cond(jnp.any(idl == e), comp, lambda h, ge: jnp.zeros_like(h), h, ge)
        return h + out, None
    return lax.scan(body, h, (P['wq'], P['wo'], jnp.arange(L), ids, gates))[0]


# ---- (i) XLA FFI custom call reading the stacked weights in place ---------------------------
def v_i_ffi(h, P, ids, gates):
    """scan over l; custom call y[p] = x[p] @ W[l*E + e_p] on the whole stacked array viewed as
    [L*E, D, F] (a bitcast): no slice is materialised; experts shared by several tokens are
    streamed once."""
    from ffi_moe import moe_mv
    B = h.shape[0]
    W1 = P['w1'].reshape(L * E, D, F); W3 = P['w3'].reshape(L * E, D, F); W2 = P['w2'].reshape(L * E, F, D)
    def moe(h, l, idl, gl, P):
        idx = (l * E + idl).reshape(-1)
        X = jnp.repeat(h, K, axis=0)                                  # [B*2, D]
        a = moe_mv(X, W1, idx); c = moe_mv(X, W3, idx)
        y = moe_mv(silu(a) * c, W2, idx)                              # [B*2, D]
        return jnp.sum(y.reshape(B, K, D) * gl[..., None], axis=1)
    return _layer_scan(h, P, ids, gates, moe)


VARIANTS = {
    'a_take': v_a_take, 'a_index': v_a_index,
    'b_dslice': v_b_dslice, 'b_gather': v_b_gather,
    'c_mulred': v_c_mulred, 'c_mulred_t': v_c_mulred_t,
    'd_unrolled': v_d_unrolled, 'd_unrolled_idx': v_d_unrolled_idx,
    'e_cond': v_e_cond, 'e_cond_xs': v_e_cond_xs,
    'f_dense': v_f_dense, 'f_dense_bat': v_f_dense_bat, 'f_dense_bat_unrolled': v_f_dense_bat_unrolled,
    'h_list_switch': v_h_list_switch, 'h_list_cond': v_h_list_cond, 'h_list13_switch': v_h_list13_switch,
    'g_fused13': v_g_fused13, 'g_torch_layout': v_g_torch_layout,
    'g_uniq': v_g_uniq, 'g_uniq_t': v_g_uniq_t, 'g_pairs_fori': v_g_pairs_fori,
    'g_while_layers': v_g_while_layers, 'g_map_layers': v_g_map_layers,
    'i_ffi': v_i_ffi,
    'h_list_cond_t': v_h_list_cond_t, 'h_list13_fori': v_h_list13_fori, 'h_layer_dense': v_h_layer_dense,
    'h_scan_switch': v_h_scan_switch, 'h_scan_cond_t': v_h_scan_cond_t,
}
NEEDS = {'c_mulred_t': ('w1t',), 'g_torch_layout': ('w1t',), 'g_uniq_t': ('w1t',), 'g_fused13': ('w13',),
         'h_list_switch': ('list',), 'h_list_cond': ('list',), 'h_list13_switch': ('list13',),
         'h_list_cond_t': ('listt',), 'h_list13_fori': ('list13',), 'h_layer_dense': ('layer',),
         'h_scan_switch': ('list13',), 'h_scan_cond_t': ('listt',)}
UNIQ = ('e_cond', 'e_cond_xs', 'g_uniq', 'g_uniq_t', 'h_list_cond', 'h_list_cond_t', 'h_scan_cond_t', 'i_ffi')
DENSE = ('f_dense', 'f_dense_bat', 'f_dense_bat_unrolled', 'h_layer_dense')


def make_params(extra):
    rng = np.random.default_rng(0)
    def rnd(shape, scale):
        a = rng.standard_normal(shape, dtype=np.float32); a *= scale
        return jnp.asarray(a)
    P = {'wq': rnd((L, D, D), D ** -0.5), 'wo': rnd((L, D, D), D ** -0.5),
         'w1': rnd((L, E, D, F), D ** -0.5), 'w3': rnd((L, E, D, F), D ** -0.5),
         'w2': rnd((L, E, F, D), F ** -0.5)}
    if extra & {'list', 'list13', 'listt', 'layer'}:
        # one-off split at load time (outside jit) into separate buffers
        P['wql'] = [jnp.asarray(np.asarray(P['wq'][l])) for l in range(L)]
        P['wol'] = [jnp.asarray(np.asarray(P['wo'][l])) for l in range(L)]
        P['w2l'] = [[jnp.asarray(np.asarray(P['w2'][l, e])) for e in range(E)] for l in range(L)]
    if 'layer' in extra:
        P['w1L'] = [jnp.asarray(np.asarray(P['w1'][l])) for l in range(L)]
        P['w3L'] = [jnp.asarray(np.asarray(P['w3'][l])) for l in range(L)]
        P['w2L'] = [jnp.asarray(np.asarray(P['w2'][l])) for l in range(L)]
    if 'listt' in extra:
        P['w1tl'] = [[jnp.asarray(np.ascontiguousarray(np.asarray(P['w1'][l, e]).T)) for e in range(E)] for l in range(L)]
        P['w3tl'] = [[jnp.asarray(np.ascontiguousarray(np.asarray(P['w3'][l, e]).T)) for e in range(E)] for l in range(L)]
        P['w2tl'] = [[jnp.asarray(np.ascontiguousarray(np.asarray(P['w2'][l, e]).T)) for e in range(E)] for l in range(L)]
    if 'list' in extra:
        P['w1l'] = [[jnp.asarray(np.asarray(P['w1'][l, e])) for e in range(E)] for l in range(L)]
        P['w3l'] = [[jnp.asarray(np.asarray(P['w3'][l, e])) for e in range(E)] for l in range(L)]
    if 'list13' in extra:
        P['w13l'] = [[jnp.asarray(np.concatenate([np.asarray(P['w1'][l, e]), np.asarray(P['w3'][l, e])], 1))
                      for e in range(E)] for l in range(L)]
    if 'w1t' in extra:
        P['w1t'] = jnp.swapaxes(P['w1'], 2, 3).copy(); P['w3t'] = jnp.swapaxes(P['w3'], 2, 3).copy()
        P['w2t'] = jnp.swapaxes(P['w2'], 2, 3).copy()
    if 'w13' in extra:
        P['w13'] = jnp.concatenate([P['w1'], P['w3']], axis=-1)
    return jax.block_until_ready(P)


def make_inputs(B, seed=1):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(B)]) for _ in range(L)]).astype(np.int32)
    g = rng.random((L, B, K)).astype(np.float32); g /= g.sum(-1, keepdims=True)
    h = rng.standard_normal((B, D)).astype(np.float32)
    return jnp.asarray(h), jnp.asarray(ids), jnp.asarray(g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--B', default='1,4,16')
    ap.add_argument('--variants', default=','.join(VARIANTS))
    ap.add_argument('--reps', type=int, default=7)
    ap.add_argument('--hlo', action='store_true', help='print materialised big buffers')
    ap.add_argument('--dump', default='', help='dir to write compiled HLO text')
    a = ap.parse_args()
    names = a.variants.split(',')
    extra = set(x for n in names for x in NEEDS.get(n, ()))
    P = make_params(extra)
    mat_bytes = D * F * 4
    attn_bytes = 2 * D * D * 4 * L
    ref_fn = jax.jit(v_f_dense_bat)
    rmv = RefMatvec()
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS','')}")
    print(f"{'variant':22s} {'B':>3s} {'ms/step':>9s} {'min':>8s} {'GB/s(moe)':>9s} {'GB/s(all)':>9s} {'refGB/s':>7s} {'frac':>5s} {'compile_s':>9s} {'relerr':>8s} {'busy':>4s}  materialised big buffers (per while-body/entry)")
    for B in [int(b) for b in a.B.split(',')]:
        h, ids, g = make_inputs(B)
        idn = np.asarray(ids)
        n_pairs = L * B * K
        n_uniq = sum(len(np.unique(idn[l])) for l in range(L))
        ref = np.asarray(ref_fn(h, P, ids, g))
        for n in names:
            fn = VARIANTS[n]
            t0 = time.perf_counter()
            jf = jax.jit(fn)
            comp = jf.lower(h, P, ids, g).compile()
            tc = time.perf_counter() - t0
            out = np.asarray(comp(h, P, ids, g))
            err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-30))
            t1 = time.perf_counter(); jax.block_until_ready(comp(h, P, ids, g)); t1 = time.perf_counter() - t1
            reps = max(3, min(a.reps, int(8.0 / t1)))
            med, rbw, ts = bench_interleaved(comp, (h, P, ids, g), rmv, reps=reps, warmup=1); mn = min(ts)
            # bytes "needed" = the chosen experts' weights (unique (layer,expert) blocks for B>1
            # formulations that dedupe; per-pair for pair loops; all for dense).
            useful = 3 * mat_bytes * (n_uniq if n in UNIQ else (L * E if n in DENSE else n_pairs))
            txt = comp.as_text()
            mats = hlo_materialisations(txt)
            if a.dump:
                os.makedirs(a.dump, exist_ok=True)
                open(f"{a.dump}/{n}_B{B}.hlo.txt", 'w').write(txt)
            big = sorted(set(m for m in mats if 'f32[1024,1024]' not in m))   # 4 MB attention slices listed separately
            n_attn = sum('f32[1024,1024]' in m for m in mats)
            msum = f"attn-slice copies:{n_attn} | " + ("; ".join(big)[:260] if big else "no big weight copies")
            print(f"{n:22s} {B:3d} {med*1e3:9.2f} {mn*1e3:8.2f} {useful/med/1e9:9.1f} {(useful+attn_bytes)/med/1e9:9.1f} {rbw:7.1f} {(useful+attn_bytes)/med/1e9/rbw:5.2f} {tc:9.1f} {err:8.1e} {max(QUIET_LOG[-reps:]):4.2f}  {msum}", flush=True)
        print(f"# B={B}: pairs/step={n_pairs}, unique (layer,expert)/step={n_uniq}, chosen-pair bytes={3*mat_bytes*n_pairs/1e6:.0f}MB, unique bytes={3*mat_bytes*n_uniq/1e6:.0f}MB, attn bytes={attn_bytes/1e6:.0f}MB", flush=True)


if __name__ == '__main__':
    main()
