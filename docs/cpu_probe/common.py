"""Shared timing / HLO-inspection helpers for the MoE probes."""
import re
import time
import statistics
import jax
import numpy as np


def bench(fn, *args, reps=7, warmup=2):
    """Run fn(*args) and return (median_s, min_s, all_times)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), ts


_SKIP = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
         "while", "call", "conditional", "after-all", "copy-start", "copy-done"}
_INSTR = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(f32|bf16|f16|s32|pred)\[([\d,]*)\]\{?[^ ]*\s+([\w\-]+)\((.*)$')


def hlo_materialisations(text, min_bytes=4 << 20):
    """Return top-level (i.e. not inside a fused computation) instructions whose
    *output buffer* is >= min_bytes: these are buffers XLA really writes.
    A big dynamic-slice / gather / copy / loop fusion here means the weights
    are being copied.  Output: list of 'computation: opcode[kind] dtype[shape]'."""
    fused = set(re.findall(r'calls=%?([\w.\-]+)', text))
    # dots etc. don't call; fusions, custom calls do.  Also while/cond bodies are
    # referenced via body=/condition=/branch_computations= (not fused).
    res = []
    comp = None
    for line in text.splitlines():
        s = line.rstrip()
        if s.endswith('{') and ' = ' not in s:
            m = re.match(r'^\s*(ENTRY\s+)?%?([\w.\-]+)', s)
            comp = m.group(2) if m else None
            continue
        m = _INSTR.match(s)
        if not m or comp in fused:
            continue
        dt, dims, op = m.group(3), m.group(4), m.group(5)
        if op in _SKIP:
            continue
        n = int(np.prod([int(d) for d in dims.split(',') if d])) if dims else 1
        nbytes = n * (2 if dt in ('bf16', 'f16') else 4)
        if nbytes >= min_bytes:
            kind = re.search(r'kind=(k\w+)', s)
            res.append(f"{comp}: {op}{'['+kind.group(1)+']' if kind else ''} {dt}[{dims}] ({nbytes/1e6:.0f}MB)")
    return res


def count_ops(text, opname):
    return len(re.findall(r'\s' + re.escape(opname) + r'\(', text))


class RefMatvec:
    """Reference: XLA f32 matvec x[1,1024] @ W[1024,114688] (470 MB > 260 MB L3).
    Measured interleaved with each variant so that machine-wide bandwidth noise
    (shared VM host) can be normalised away."""
    def __init__(self):
        import jax.numpy as jnp
        rng = np.random.default_rng(123)
        self.W = jnp.asarray(rng.standard_normal((1024, 114688), dtype=np.float32))
        self.x = jnp.asarray(rng.standard_normal((1, 1024), dtype=np.float32))
        self.f = jax.jit(lambda x, W: x @ W)
        self.nbytes = self.W.size * 4
        jax.block_until_ready(self.f(self.x, self.W))

    def once(self):
        t0 = time.perf_counter(); jax.block_until_ready(self.f(self.x, self.W))
        return time.perf_counter() - t0


def _cpu_busy(window=0.3):
    def snap():
        v = [int(x) for x in open('/proc/stat').readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v), idle
    t0, i0 = snap(); time.sleep(window); t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


QUIET_LOG = []


def wait_quiet(threshold=0.10, max_wait=30.0):
    """The machine is shared: before a timed rep, wait (up to max_wait s) until the
    whole-machine CPU use (we are idle at that moment) is below threshold."""
    t0 = time.time()
    while True:
        b = _cpu_busy()
        if b < threshold or time.time() - t0 > max_wait:
            QUIET_LOG.append(b)
            return b


def bench_interleaved(fn, args, ref, reps=7, warmup=1, quiet=True):
    """Alternate ref matvec and fn; return (median fn time, median ref GB/s, fn times)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts, rb = [], []
    for _ in range(reps):
        if quiet:
            wait_quiet()
        rb.append(ref.nbytes / ref.once() / 1e9)
        t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter() - t0)
    return statistics.median(ts), statistics.median(rb), ts


def compile_seconds():
    """A list that collects the seconds of every XLA compile from now on (jax's backend_compile events)."""
    seconds = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: seconds.append(secs) if "backend_compile" in event else None)
    return seconds


def moe_layers(rng, d, f, e, num_layers):
    """num_layers random MoE layers in the per_expert layout (HF [out, in] expert weights).

    Router logits of standard deviation 2: tokens spread over the experts, and no
    second gate underflows to exactly zero (the kernel skips a zero-gate expert).
    """
    import jax.numpy as jnp
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.05)
    return [{"router": normal(d, e) * 40 / np.sqrt(d),
             "experts": [{"w1": normal(f, d), "w3": normal(f, d), "w2": normal(d, f)} for _ in range(e)]}
            for _ in range(num_layers)]


def chain(block):
    """jit of x += 0.1 * block(x, p) over a list of layers p."""
    def run(x, layers):
        for p in layers:
            x = x + 0.1 * block(x, p)
        return x
    return jax.jit(run)


def xla_block(x, p):
    """moe.moe(x, p, 2) with the C++ kernel off (XLA ops), for use inside a jit."""
    from mixtral_jax import cpu_kernel, moe
    available = cpu_kernel.available
    cpu_kernel.available = lambda: False  # traced once, so the kernel stays off in this jit
    try:
        return moe.moe(x, p, 2)
    finally:
        cpu_kernel.available = available


def median_of_rounds(fns, args, calls=10, rounds=3):
    """{name: median over `rounds` of the mean time of `calls` calls of fns[name](*args)}, names alternating."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            jax.block_until_ready(fn(*args))
            t0 = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(t) for name, t in times.items()}
