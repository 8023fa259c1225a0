"""Compile time vs depth: trace+compile the decode step for L=8 and L=32 (small D/F so that
only the graph size matters; E=8, top-2)."""
import sys, time
import jax
import decode_moe as dm

for L in (8, 32):
    dm.L, dm.D, dm.F = L, 128, 256
    P = dm.make_params({'list', 'list13', 'listt'})
    for B in (1, 16):
        h, ids, g = dm.make_inputs(B)
        for n in ('b_dslice', 'g_uniq', 'e_cond', 'h_list_cond_t', 'h_scan_cond_t', 'h_list13_fori', 'h_scan_switch', 'h_list_switch'):
            if n == 'h_list_switch' and B == 16:
                continue
            t0 = time.perf_counter(); jax.jit(dm.VARIANTS[n]).lower(h, P, ids, g).compile(); tc = time.perf_counter() - t0
            print(f"L={L:2d} B={B:2d} {n:16s} compile {tc:6.1f} s", flush=True)
