"""JAX wrapper for the ffi/moe_mv.cc custom call (build with ffi/build.sh)."""
import ctypes, os
import jax, jax.numpy as jnp

_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ffi', 'libmoe_mv.so')
_registered = False


def available():
    return os.path.exists(_LIB)


def _register():
    global _registered
    if not _registered:
        lib = ctypes.cdll.LoadLibrary(_LIB)
        jax.ffi.register_ffi_target('moe_mv', jax.ffi.pycapsule(lib.MoeMv), platform='cpu')
        _registered = True


def moe_mv(x, W, idx):
    """y[p] = x[p] @ W[idx[p]];  x [P,K] f32, W [G,K,N] f32 (read in place), idx [P] int32."""
    _register()
    P, N = x.shape[0], W.shape[-1]
    return jax.ffi.ffi_call('moe_mv', jax.ShapeDtypeStruct((P, N), jnp.float32))(x, W, idx.astype(jnp.int32))
