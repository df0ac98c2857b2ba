"""Fused CPU kernels (numba): the top-k counting pass, the TIES merge, the linear merges.

The kernels read the checkpoints' raw rows as stored (bfloat16 bit patterns as ``uint16``,
float16 bit patterns as ``int16``, float32 as is), widen each value to float32 in a register,
and write the output in its final dtype (bfloat16 rounded to nearest even, as torch does). So a
pass over a chunk touches each input byte once and allocates nothing larger than a block of
scratch. They compute exactly what :mod:`tiesmerge.methods.ops` computes (float32, same
operation order); tests/test_kernels.py holds the two paths to each other bit for bit. Without
numba, or for a method or device they do not cover, the engine uses the torch path.

Work is split into blocks of ``_BLOCK`` entries handed to threads by ``prange``; inside a
block the loops that widen, compute and count run over contiguous scratch without branches, so
LLVM vectorises them, with 256-bit registers on AVX2 as on AVX-512 (only the counting window's
entries are binned one by one). ``benchmarks/speed/kernel_bench.py`` times them per code target
and thread count, and counts the vector registers they use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..lazy import torch
from . import numba_cache  # on import, before numba: where its compiled kernels go

try:  # optional: the engine falls back to torch without it
    numba_cache.import_numba()  # its settings from NUMBA_* variables only, never a file in the working folder
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload

    numba_cache.import_arraymath_without_scipy()
except ImportError as exc:  # pragma: no cover - exercised where numba is absent or broken
    numba = None
    if exc.name not in ("numba", "llvmlite"):  # installed, but its import failed: say why the engine is slower
        import warnings

        from ..errors import MergeWarning

        warnings.warn(f"numba is installed but failed to import ({type(exc).__name__}: {str(exc)[:200]}): the "
                      "merge runs on the torch path, some 3x slower; reinstall numba in this environment to get "
                      "the fused kernels back", MergeWarning, stacklevel=2)

from . import exactk

__all__ = [
    "available", "raw_view", "out_view",
    "count_pass", "exact_k_scratch_bytes", "exact_k_masks", "band_masks", "dare_keys", "ties_merge", "linear_merge",
    "values_mean", "values", "product", "interp", "stock", "torch_norms", "torch_sums",
    "ELECT_CODES", "ZERO_CODES", "AGGREGATE_CODES",
]

ELECT_CODES = {"mass": 0, "count": 1}
ZERO_CODES = {"zero": 0, "positive": 1, "majority": 2}
AGGREGATE_CODES = {"mean": 0, "sum": 1, "max": 2}
_BLOCK = 8192  # entries per work item: (n + 3) float32 scratch rows of it stay in L1/L2

_F16_TABLE = None  # float16 bit pattern -> float32 value, built on first use (256 KiB)


def available() -> bool:
    """True when numba is importable and TIESMERGE_KERNELS is not "0" (the switch lets a
    benchmark time the torch path on the same machine)."""
    return numba is not None and os.environ.get("TIESMERGE_KERNELS", "1") != "0"


# a CPU tensor's bytes as the kernels read them (engine.fused.RAW_VIEWS names the same views by code)
_RAW_BITS = {"bfloat16": np.uint16, "float16": np.int16}


def raw_view(t: torch.Tensor) -> np.ndarray:
    """The kernels' view of a CPU tensor stored as bfloat16, float16 or float32 (no copy)."""
    name = str(t.dtype).removeprefix("torch.")
    if name == "float32":
        return t.numpy()
    return t.view(torch.int16).numpy().view(_RAW_BITS[name])


def out_view(t: torch.Tensor) -> np.ndarray:
    """The kernels' view of an output tensor in bfloat16 or float32 (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _f16_table() -> np.ndarray:
    global _F16_TABLE
    if _F16_TABLE is None:
        _F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    return _F16_TABLE


if numba is not None:

    @intrinsic
    def _bits_to_f32(typingctx, bits):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen

    @intrinsic
    def _f32_to_bits(typingctx, value):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.uint32(types.float32), codegen

    @intrinsic
    def _fma32(typingctx, a, b, c):  # pragma: no cover - compiled
        # a * b + c rounded once: torch's CPU addcmul_ (Vectorized fmadd on AVX2 and AVX-512 builds)
        def codegen(context, builder, signature, args):
            return builder.fma(*args)
        return types.float32(types.float32, types.float32, types.float32), codegen

    @intrinsic
    def _pointer(typingctx, address, proto):  # pragma: no cover - compiled
        # a uint64 address as a pointer to proto's element type (the rows live in separate
        # buffers or file mappings, so the kernels take their addresses, not one 2-d array)
        pointer = types.CPointer(proto.dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer))
        return pointer(types.uint64, proto), codegen

    @njit(inline="always")
    def _rows(proto, addrs, which, start, count):  # pragma: no cover - compiled
        # entries start .. start + count of input ``which`` (0: base, 1 + t: model t)
        return numba.carray(_pointer(addrs[which] + np.uint64(start * proto.itemsize), proto), count)

    def _widen(x, table):  # pragma: no cover - replaced by the overload in compiled code
        raise NotImplementedError

    @overload(_widen, inline="always")
    def _widen_impl(x, table):  # pragma: no cover - compiled
        if x == types.uint16:  # bfloat16: the high half of a float32
            return lambda x, table: _bits_to_f32(np.uint32(x) << np.uint32(16))
        if x == types.int16:  # float16: exact through the table
            return lambda x, table: table[np.uint16(x)]
        if x == types.float32:
            return lambda x, table: x
        return None

    def _store(out, i, value):  # pragma: no cover - replaced by the overload in compiled code
        raise NotImplementedError

    @overload(_store, inline="always")
    def _store_impl(out, i, value):  # pragma: no cover - compiled
        if out.dtype == types.uint16:  # bfloat16, round to nearest even (NaN never reaches here)
            def store_bf16(out, i, value):
                bits = _f32_to_bits(value)
                rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))  # to nearest even
                out[i] = np.uint16(rounded >> np.uint32(16))
            return store_bf16
        if out.dtype == types.float32:
            def store_f32(out, i, value):
                out[i] = value
            return store_f32
        return None

    @njit(inline="always")
    def _fmix32(x):  # pragma: no cover - compiled
        # MurmurHash3's finaliser on a uint64 holding a 32-bit value (methods.ops._fmix32)
        m = np.uint64(0xFFFFFFFF)
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(0x85EBCA6B)) & m
        x = x ^ (x >> np.uint64(13))
        x = (x * np.uint64(0xC2B2AE35)) & m
        return x ^ (x >> np.uint64(16))

    @njit(inline="always")
    def _hash_uniform(key, pos):  # pragma: no cover - compiled
        # methods.ops.hash_uniform at flat position pos (uint64) of the stream whose key is given
        m = np.uint64(0xFFFFFFFF)
        x = _fmix32((pos & m) ^ key)
        x = _fmix32((x + (pos >> np.uint64(32)) * np.uint64(0x27D4EB2F) + key) & m)
        return np.float32(x >> np.uint64(8)) * np.float32(2.0**-24)

    @intrinsic
    def _fmix32_i32(typingctx, x):  # pragma: no cover - compiled
        # _fmix32 of x's low 32 bits in 32-bit arithmetic (numba widens integer arithmetic to 64 bits,
        # which keeps the multiplies out of the vector units); the same value
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            v = args[0]
            v = builder.trunc(v, i32) if v.type.width > 32 else v

            def c(value):
                return ir.Constant(i32, value - (1 << 32) if value >= 1 << 31 else value)

            v = builder.xor(v, builder.lshr(v, c(16)))
            v = builder.mul(v, c(0x85EBCA6B))
            v = builder.xor(v, builder.lshr(v, c(13)))
            v = builder.mul(v, c(0xC2B2AE35))
            return builder.xor(v, builder.lshr(v, c(16)))
        return types.uint32(x), codegen

    @njit(inline="always")
    def _hash_bits(key, pos):  # pragma: no cover - compiled
        # the top 24 bits of methods.ops.hash_uniform's hash at flat position pos (uint64) of the stream
        # whose key is given (the uniform is this times 2^-24), in 32-bit arithmetic
        x = _fmix32_i32(np.uint32(pos & np.uint64(0xFFFFFFFF)) ^ np.uint32(key))
        x = _fmix32_i32(x + np.uint32(pos >> np.uint64(32)) * np.uint32(0x27D4EB2F) + np.uint32(key))
        return x >> np.uint32(8)

    @njit(inline="always")
    def _base_block(proto, addrs, start, count, table):  # pragma: no cover - compiled
        # the base's entries start .. start + count, widened to float32 (count,)
        block = _rows(proto, addrs, 0, start, count)  # 1-d rows: indexing them vectorises
        b32 = np.empty(count, np.float32)
        for j in range(count):
            b32[j] = _widen(block[j], table)
        return b32

    @njit(parallel=True, cache=True, nogil=True)
    def _count_kernel(proto, addrs, size, table, lo, hi, shift, above, window, wmin, wmax, worst):  # pragma: no cover
        # rows: addrs[0] the base's E raw values, addrs[1 + t] model t's (proto: their dtype); per model t:
        # lo[t]..hi[t] (uint32, inclusive) is a window of |tau| bit patterns (non-negative float32 order
        # like their bits);
        # above (T, n) i64 += entries with bits > hi; window (T, n, B) i64 bins (bits - lo) >> shift,
        # wmin/wmax (T, n, B) u32 the smallest/largest bits in each bin of a narrow window
        # (shift <= 8; a bin holding one value, as bf16 task vectors' bins mostly do, pins the
        # threshold without another pass);
        # worst (T,) u32 = max bits seen (>= 0x7F800000 means a non-finite task vector)
        n = len(addrs) - 1
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            tid = numba.get_thread_id()
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            m = stop - start
            b32 = _base_block(proto, addrs, start, m, table)
            bits = np.empty(m, np.uint32)
            hits = np.empty(m, np.uint32)
            top = np.uint32(0)
            for t in range(n):
                h = hi[t]
                low = lo[t]
                span = np.uint32(h - low)  # u is in the window iff u - low <= span, in wrapping uint32
                # 32-bit counts (a block holds at most _BLOCK entries): numba's int64 sums would
                # let the loop use only 4 lanes of a 256-bit register
                count = np.uint32(0)
                inside = np.uint32(0)
                row = _rows(proto, addrs, 1 + t, start, m)
                for j in range(m):  # vectorised: widen, subtract, compare, count
                    u = _f32_to_bits(abs(_widen(row[j], table) - b32[j]))
                    bits[j] = u
                    count = np.uint32(count + (u > h))
                    inside = np.uint32(inside + (np.uint32(u - low) <= span))
                    top = max(top, u)
                above[tid, t] += count
                if inside == 0 or low > h:
                    continue
                # the window's entries packed to the front of ``hits`` without a branch (the window
                # holds a few % of the entries, so a branch per entry mispredicts), then binned
                k = np.uint64(0)  # unsigned: no negative-index check on hits[k]
                for j in range(m):
                    u = bits[j]
                    hits[k] = u
                    k = np.uint64(k + (np.uint32(u - low) <= span))
                s = shift[t]
                if s > 8:  # a coarse window (select.TRACK_MAX_SHIFT; the first radix pass): counts only
                    for i in range(k):
                        window[tid, t, (hits[i] - low) >> s] += 1
                    continue
                for i in range(k):  # a narrow window: a sliver of the values, tracked exactly
                    u = hits[i]
                    b = (u - low) >> s
                    window[tid, t, b] += 1
                    wmin[tid, t, b] = min(wmin[tid, t, b], u)
                    wmax[tid, t, b] = max(wmax[tid, t, b], u)
            worst[tid] = max(worst[tid], top)

    @njit(parallel=True, cache=True, nogil=True)
    def _exact_k_kernel(proto, addrs, size, table, keep, keys, idx, left, right, masks, worst):  # pragma: no cover
        # per model t (in parallel): keys[t] := |tau_t| (E,) float32 as the torch path computes it, then
        # masks[t] (E,) u8 (zeroed) := the entries torch.argsort(|tau_t|, descending=True)[:keep[t]] keeps;
        # idx/left/right (n, E) int scratch; worst (n,) u32 = max |tau_t| bits (a non-finite model is skipped)
        n = len(addrs) - 1
        for t in prange(n):
            base = _rows(proto, addrs, 0, 0, size)
            row = _rows(proto, addrs, 1 + t, 0, size)
            kt = keys[t]
            top = np.uint32(0)
            for j in range(size):
                a = abs(_widen(row[j], table) - _widen(base[j], table))
                kt[j] = a
                top = max(top, _f32_to_bits(a))
            worst[t] = top
            if top < np.uint32(0x7F800000):
                exactk.keep_mask(kt, idx[t], keep[t], masks[t], left[t], right[t])

    @njit(parallel=True, cache=True, nogil=True)
    def _band_kernel(proto, addrs, size, table, lo, hi, keys, idx, left, right, masks, worst):  # pragma: no cover
        # per model t (in parallel): keys[t] := -|tau_t| (E,) float32, then masks[t] (E,) u8 (zeroed) := the
        # entries at positions lo[t]..hi[t] of torch.sort(|tau_t|)'s ascending order (exactk.band_mask);
        # worst (n,) u32 = max |tau_t| bits (a non-finite model is skipped)
        n = len(addrs) - 1
        for t in prange(n):
            base = _rows(proto, addrs, 0, 0, size)
            row = _rows(proto, addrs, 1 + t, 0, size)
            kt = keys[t]
            top = np.uint32(0)
            for j in range(size):
                a = abs(_widen(row[j], table) - _widen(base[j], table))
                kt[j] = -a
                top = max(top, _f32_to_bits(a))
            worst[t] = top
            if top < np.uint32(0x7F800000):
                exactk.band_mask(kt, idx[t], lo[t], hi[t], masks[t], left[t], right[t])

    @njit(parallel=True, cache=True, nogil=True)
    def _ties_kernel(proto, addrs, size, table, thresholds, masks, use_masks, dare_keys, keep_from, rescale, offset,
                     weights, lam, elect, zero, fill, aggregate, out, worst):  # pragma: no cover
        # rows at addrs (base, then models; proto: their dtype), thresholds/weights (n,) f32,
        # masks (n, E) u8 (use_masks: an exact-k selection replaces the thresholds), out (E,) bf16 bits or f32;
        # dare_keys (n,) u64 (non-empty: DARE drops entries whose hash uniform at offset + j is below drop
        # and rescales the rest by rescale, as methods.dare does)
        n = len(addrs) - 1
        lam32 = np.float32(lam)
        fill32 = np.float32(fill)
        dare = len(dare_keys) > 0
        keep_from32 = np.int32(keep_from)
        rescale32 = np.float32(rescale)
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            tid = numba.get_thread_id()
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            m = stop - start
            target = out[start:stop]
            b32 = _base_block(proto, addrs, start, m, table)
            vote = np.zeros(m, np.float32)
            gamma = np.empty(m, np.float32)
            total = np.zeros(m, np.float32)
            denom = np.zeros(m, np.float32)
            best = np.zeros(m, np.float32)
            kept = np.empty((n, m), np.float32)  # trimmed task vectors of this block
            top = np.uint32(0)
            for t in range(n):
                thr = thresholds[t]
                w = weights[t]
                row = _rows(proto, addrs, 1 + t, start, m)
                for j in range(m):
                    v = _widen(row[j], table) - b32[j]
                    top = max(top, _f32_to_bits(abs(v)))
                    if use_masks:  # loop-invariant: LLVM unswitches it
                        kv = v if masks[t, start + j] != 0 else np.float32(0.0)
                    else:
                        kv = v if abs(v) >= thr else np.float32(0.0)
                    if dare:  # loop-invariant: LLVM unswitches it
                        # the uniform u = bits * 2^-24 is kept where u >= drop, i.e. bits >= keep_from
                        bits = np.int32(_hash_bits(dare_keys[t], np.uint64(offset + start + j)))
                        kv = kv * rescale32 if bits >= keep_from32 else np.float32(0.0)
                    kept[t, j] = kv
                    if elect == 0:  # loop-invariant: LLVM unswitches it
                        vote[j] += w * kv
                    else:
                        sign = np.float32(1.0) if kv > 0 else (np.float32(-1.0) if kv < 0 else np.float32(0.0))
                        vote[j] += w * sign
            for j in range(m):
                g = np.float32(1.0) if vote[j] > 0 else (np.float32(-1.0) if vote[j] < 0 else np.float32(0.0))
                if g == 0 and zero != 0:
                    g = np.float32(1.0) if zero == 1 else fill32
                gamma[j] = g
            for t in range(n):
                w = weights[t]
                for j in range(m):
                    wv = w * kept[t, j]
                    g = gamma[j]
                    # only values of the elected sign count (a zero never does, nor a zero sign)
                    agree = (wv != 0) & ((wv > 0) == (g > 0)) & (g != 0)
                    total[j] += wv if agree else np.float32(0.0)
                    denom[j] += w if agree else np.float32(0.0)
                    best[j] = max(best[j], abs(wv) if agree else np.float32(0.0))
            for j in range(m):
                if aggregate == 0:
                    merged = total[j] / denom[j] if denom[j] != 0 else total[j]  # as ops.disjoint_aggregate
                elif aggregate == 1:
                    merged = total[j]
                else:
                    merged = best[j] * gamma[j]
                _store(target, j, b32[j] + lam32 * merged)
            worst[tid] = max(worst[tid], top)

    @njit(parallel=True, cache=True, nogil=True)
    def _linear_kernel(proto, addrs, size, table, coef, use_coef, masks, use_masks, divisor, post, post_mode, out,
                       worst):  # pragma: no cover
        # out = base + post(sum_t coef[t] * tau_t); post_mode 0: none, 1: * post, 2: / post, 3: / divisor * post;
        # masks (n, E) u8 (use_masks): tau_t is 0 where masks[t] is 0 (Breadcrumbs' band)
        n = len(addrs) - 1
        post32 = np.float32(post)
        divisor32 = np.float32(divisor)
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            tid = numba.get_thread_id()
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            m = stop - start
            target = out[start:stop]
            b32 = _base_block(proto, addrs, start, m, table)
            acc = np.zeros(m, np.float32)
            top = np.uint32(0)
            for t in range(n):
                c = coef[t]
                row = _rows(proto, addrs, 1 + t, start, m)
                for j in range(m):
                    v = _widen(row[j], table) - b32[j]
                    top = max(top, _f32_to_bits(abs(v)))
                    if use_masks:  # loop-invariant: LLVM unswitches it
                        v = v if masks[t, start + j] != 0 else np.float32(0.0)
                    acc[j] += v * c if use_coef else v
            for j in range(m):
                a = acc[j]
                if post_mode == 1:
                    s = a * post32
                elif post_mode == 2:
                    s = a / post32
                elif post_mode == 3:
                    s = (a / divisor32) * post32
                else:
                    s = a
                _store(target, j, b32[j] + s)
            worst[tid] = max(worst[tid], top)

    @njit(parallel=True, cache=True, nogil=True)
    def _values_mean_kernel(proto, addrs, size, table, coef, divisor, out, worst):  # pragma: no cover
        # out = (sum_i coef[i] * x_i) / divisor over every input's own values (the base is input 0),
        # accumulated from 0 in input order with fused multiply-adds: mergekit's linear
        # (result.addcmul_(x_i, w_i), then / sum w)
        n_in = len(addrs)
        divisor32 = np.float32(divisor)
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            tid = numba.get_thread_id()
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            m = stop - start
            target = out[start:stop]
            acc = np.zeros(m, np.float32)
            top = np.uint32(0)
            for i in range(n_in):
                c = coef[i]
                row = _rows(proto, addrs, i, start, m)
                for j in range(m):
                    x = _widen(row[j], table)
                    top = max(top, _f32_to_bits(abs(x)))
                    acc[j] = _fma32(x, c, acc[j])  # result.addcmul_(x, c): one rounding
            for j in range(m):
                _store(target, j, acc[j] / divisor32)
            worst[tid] = max(worst[tid], top)


    # ------------------------------------------------------------ whole-tensor merges (engine.whole)

    @njit(parallel=True, cache=True, nogil=True)
    def _values_kernel(proto, addrs, size, table, which, relative, out, worst):  # pragma: no cover
        # out (E,) f32 := input ``which``'s values (relative: minus the base's, its task vector), widened;
        # worst (T,) u32 = max |value| bits (>= 0x7F800000: not finite)
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            tid = numba.get_thread_id()
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            m = stop - start
            row = _rows(proto, addrs, which, start, m)
            target = out[start:stop]
            top = np.uint32(0)
            if relative:
                b32 = _base_block(proto, addrs, start, m, table)
                for j in range(m):
                    v = _widen(row[j], table) - b32[j]
                    target[j] = v
                    top = max(top, _f32_to_bits(abs(v)))
            else:
                for j in range(m):
                    v = _widen(row[j], table)
                    target[j] = v
                    top = max(top, _f32_to_bits(abs(v)))
            worst[tid] = max(worst[tid], top)

    @njit(parallel=True, cache=True, nogil=True)
    def _product_kernel(x, y, sx, sy, scaled, out):  # pragma: no cover
        # out (E,) f32 := (x / sx) * (y / sy) (scaled) or x * y, entry by entry, each operation rounded
        size = x.shape[0]
        sx32 = np.float32(sx)
        sy32 = np.float32(sy)
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            if scaled:
                for j in range(start, stop):
                    out[j] = (x[j] / sx32) * (y[j] / sy32)
            else:
                for j in range(start, stop):
                    out[j] = x[j] * y[j]

    @njit(parallel=True, cache=True, nogil=True)
    def _interp_kernel(proto, addrs, size, table, i0, i1, relative, c0, c1, divisor, divide, out):  # pragma: no cover
        # out = c0 v0 + c1 v1 (/ divisor), v the values of inputs i0 and i1; relative: v their task
        # vectors and out the base plus that (SLERP, NuSLERP; each operation rounded in float32)
        c032 = np.float32(c0)
        c132 = np.float32(c1)
        d32 = np.float32(divisor)
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            m = stop - start
            target = out[start:stop]
            b32 = _base_block(proto, addrs, start, m, table)
            r0 = _rows(proto, addrs, i0, start, m)
            r1 = _rows(proto, addrs, i1, start, m)
            for j in range(m):
                v0 = _widen(r0[j], table)
                v1 = _widen(r1[j], table)
                if relative:  # loop-invariant: LLVM unswitches it
                    v0 = v0 - b32[j]
                    v1 = v1 - b32[j]
                s = c032 * v0 + c132 * v1
                if divide:
                    s = s / d32
                _store(target, j, b32[j] + s if relative else s)

    @njit(parallel=True, cache=True, nogil=True)
    def _stock_kernel(proto, addrs, size, table, t, omt, out):  # pragma: no cover
        # out = t * ((0 + sum_t theta_t) / k) + omt * base (Model Stock: python's sum from 0, then torch's ops)
        k = len(addrs) - 1
        t32 = np.float32(t)
        omt32 = np.float32(omt)
        kf = np.float32(k)
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            m = stop - start
            target = out[start:stop]
            b32 = _base_block(proto, addrs, start, m, table)
            acc = np.zeros(m, np.float32)
            for i in range(k):
                row = _rows(proto, addrs, 1 + i, start, m)
                for j in range(m):
                    acc[j] += _widen(row[j], table)
            for j in range(m):
                _store(target, j, t32 * (acc[j] / kf) + omt32 * b32[j])

    # ------------------------------------------------------------ torch's float32 reductions, in torch's order
    # (engine.whole): torch.linalg.vector_norm and torch.sum of a contiguous float32 row, as ATen's CPU
    # kernels compute them (norm: 8 lane sums in order, then the lanes, then the tail, partly fused; sum: cascade_sum's
    # 4-level, 4-way, 8-lane accumulation), on values widened (and products formed) from the raw rows on
    # the fly. torch splits a sum across its threads; the caller hands each thread's range here as one
    # job and lets torch add the per-thread results (engine.whole.TorchOrder).

    @njit(inline="always")
    def _value(r, rb, relative, j, table):  # pragma: no cover - compiled
        v = _widen(r[j], table)
        if relative:  # loop-invariant: LLVM unswitches it
            v = v - _widen(rb[j], table)
        return v

    @njit(inline="always")
    def _ceil_log2(x):  # pragma: no cover - compiled
        # c10's CeilLog2: 1 up to 2, else the bit length of x - 1
        if x <= 2:
            return 1
        r = 0
        v = x - 1
        while v != 0:
            r += 1
            v >>= 1
        return r

    @njit(parallel=True, cache=True, nogil=True)
    def _torch_norm_kernel(proto, addrs, size, table, which, relative, starts, stops, out):  # pragma: no cover
        # job q: out[q] = torch.linalg.vector_norm of input which[q]'s values (relative: its task vector)
        # over entries starts[q]..stops[q] (a value that is not finite makes it Inf or NaN)
        for q in prange(len(which)):
            out[q] = _torch_norm(proto, addrs, which[q], starts[q], stops[q] - starts[q], relative, table)

    @njit(inline="always")
    def _torch_norm(proto, addrs, which, start, count, relative, table):  # pragma: no cover - compiled
        # one job of _torch_norm_kernel
        r = _rows(proto, addrs, which, start, count)
        rb = _rows(proto, addrs, 0, start, count)
        n = np.uint64(count)
        w8 = np.uint64(8)
        acc = np.zeros(8, np.float32)  # the 8 lanes: a lane array, so that LLVM keeps it in one vector register
        rows = n // w8
        for i in range(rows):  # Vectorized<float> acc += x * x (no fused multiply-add); unsigned indices
            d = np.uint64(i) * w8
            for m in range(w8):
                v = _value(r, rb, relative, d + m, table)
                acc[m] += v * v
        b = acc[0] + acc[1]
        for m in range(2, 8):
            b = b + acc[m]
        # the scalar tail as the compiler built it: a block of 4 squares rounded, then added in order (the
        # vectorized product), the rest contracted into fused multiply-adds. Bit-identical either way where
        # the squares are exact (bfloat16 values), not for float32 values (measured on torch 2.13, AVX-512)
        tail4 = rows * np.uint64(8) + (n - rows * np.uint64(8)) // np.uint64(4) * np.uint64(4)
        for d in range(rows * np.uint64(8), tail4):
            v = _value(r, rb, relative, np.uint64(d), table)
            b = b + v * v
        for d in range(tail4, n):
            v = _value(r, rb, relative, np.uint64(d), table)
            b = _fma32(v, v, b)
        return np.float32(np.sqrt(b))

    @njit(inline="always")
    def _term(r0, r1, rb, relative, scaled, s0, s1, j, table):  # pragma: no cover - compiled
        x = _value(r0, rb, relative, j, table)
        y = _value(r1, rb, relative, j, table)
        if scaled:  # loop-invariant: LLVM unswitches it
            return (x / s0) * (y / s1)
        return x * y

    @njit(parallel=True, cache=True, nogil=True)
    def _torch_sum_kernel(proto, addrs, size, table, ia, ib, relative, scaled, sa, sb, starts, stops,
                          out):  # pragma: no cover
        # job q: out[q] = 0 + ATen's cascade sum (vectorized_inner_sum, 8 lanes) of the products
        # (x / sa[q]) * (y / sb[q]) (scaled) or x * y, x and y the values of inputs ia[q], ib[q]
        # (relative: task vectors), over entries starts[q]..stops[q]; unsigned indices throughout
        # (no negative-index checks in the loops)
        for q in prange(len(ia)):
            out[q] = _torch_sum(proto, addrs, ia[q], ib[q], starts[q], stops[q] - starts[q], relative, scaled,
                                sa[q], sb[q], table)

    @njit(inline="always")
    def _torch_sum(proto, addrs, i0, i1, start, size0, relative, scaled, s0, s1, table):  # pragma: no cover
        # one job of _torch_sum_kernel
        r0 = _rows(proto, addrs, i0, start, size0)
        r1 = _rows(proto, addrs, i1, start, size0)
        rb = _rows(proto, addrs, 0, start, size0)
        w32 = np.uint64(32)
        n = np.uint64(size0)
        if size0 < 8:  # ATen's scalar path: row_sum with 4 partial sums
            p = np.zeros(4, np.float32)
            quads = n // np.uint64(4)
            for i in range(quads):
                for k in range(np.uint64(4)):
                    p[k] += _term(r0, r1, rb, relative, scaled, s0, s1, np.uint64(i) * np.uint64(4) + k, table)
            for i in range(quads * np.uint64(4), n):
                p[0] += _term(r0, r1, rb, relative, scaled, s0, s1, np.uint64(i), table)
            total = p[0] + p[1]
            total = total + p[2]
            total = total + p[3]
            return np.float32(0.0) + total
        vec_size = n // np.uint64(8)
        size_ilp = vec_size // np.uint64(4)
        power = max(4, _ceil_log2(np.int64(size_ilp)) // 4)
        step = np.uint64(1) << np.uint64(power)
        mask = step - np.uint64(1)
        acc = np.zeros(128, np.float32)  # level l, ilp row k, lane m at l * 32 + k * 8 + m
        i = np.uint64(0)
        while i + step <= size_ilp:
            for _ in range(step):
                b = i * w32
                for m in range(w32):
                    acc[m] += _term(r0, r1, rb, relative, scaled, s0, s1, b + m, table)
                i += np.uint64(1)
            for lev in range(np.uint64(1), np.uint64(4)):
                for m in range(w32):
                    acc[lev * w32 + m] += acc[(lev - np.uint64(1)) * w32 + m]
                    acc[(lev - np.uint64(1)) * w32 + m] = 0
                if (i & (mask << (lev * np.uint64(power)))) != 0:
                    break
        while i < size_ilp:
            b = i * w32
            for m in range(w32):
                acc[m] += _term(r0, r1, rb, relative, scaled, s0, s1, b + m, table)
            i += np.uint64(1)
        for lev in range(np.uint64(1), np.uint64(4)):
            for m in range(w32):
                acc[m] += acc[lev * w32 + m]
        for v in range(size_ilp * np.uint64(4), vec_size):  # the vectors after the last group of 4
            for m in range(np.uint64(8)):
                acc[m] += _term(r0, r1, rb, relative, scaled, s0, s1, np.uint64(v) * np.uint64(8) + m, table)
        for k in range(np.uint64(1), np.uint64(4)):
            for m in range(np.uint64(8)):
                acc[m] += acc[k * np.uint64(8) + m]
        total = np.float32(0.0)
        for k in range(vec_size * np.uint64(8), n):
            total += _term(r0, r1, rb, relative, scaled, s0, s1, np.uint64(k), table)
        for m in range(np.uint64(8)):
            total += acc[m]
        return np.float32(0.0) + total

_NONFINITE = 0x7F800000  # |tau| bit patterns at or above this are Inf or NaN


def _rows_of(inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """(proto, addresses, size) of the base's and models' rows: equal-length contiguous raw views."""
    size = inputs[0].size
    for a in inputs:
        if a.size != size or not a.flags.c_contiguous or a.dtype != inputs[0].dtype:
            raise ValueError("kernel inputs must be contiguous rows of one dtype and length")
    # a fresh, writable proto: mapped (read-only) and buffered rows share one compiled kernel
    return np.empty(0, inputs[0].dtype), np.array([a.ctypes.data for a in inputs], dtype=np.uint64), size


def _worst() -> np.ndarray:
    return np.zeros(numba.config.NUMBA_NUM_THREADS, np.uint32)


def count_pass(inputs: Sequence[np.ndarray], lo: np.ndarray, hi: np.ndarray, shift: np.ndarray,
               above: np.ndarray, window: np.ndarray, wmin: np.ndarray, wmax: np.ndarray) -> bool:
    """Add one chunk's counts (see ``_count_kernel``); False when a task vector is not finite.

    inputs: the base's rows, then each model's, as raw views (:func:`raw_view`) of E entries;
    above (T, n) int64, window (T, n, B) int64, wmin/wmax (T, n, B) uint32, with
    T = numba.config.NUMBA_NUM_THREADS.
    """
    worst = _worst()
    _count_kernel(*_rows_of(inputs), _f16_table(), lo, hi, shift, above, window, wmin, wmax, worst)
    return bool(worst.max() < _NONFINITE)


def _aligned(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64


def exact_k_scratch_bytes(n_models: int, size: int) -> int:
    """Working bytes :func:`exact_k_masks` needs for n models' whole tensors of ``size`` entries:
    three position arrays, the float32 keys and the masks (engine.executor.EXACT_K_BYTES_PER_ENTRY)."""
    isz = 4 if size < 2**31 else 8
    return 3 * _aligned(n_models * size * isz) + _aligned(n_models * size * 4) + n_models * size


def _exact_k_views(n: int, size: int, scratch: np.ndarray | None) -> list[np.ndarray]:
    """(idx, left, right, keys, masks) (n, size) views of ``scratch`` (or fresh memory), the masks zeroed."""
    need = exact_k_scratch_bytes(n, size)
    buf = scratch if scratch is not None and scratch.size >= need else np.empty(need, np.uint8)
    ind = np.dtype(np.int32 if size < 2**31 else np.int64)
    views, at = [], 0
    for dtype in (ind, ind, ind, np.dtype(np.float32), np.dtype(np.uint8)):  # widest first: each view aligned
        nbytes = n * size * dtype.itemsize
        views.append(buf[at:at + nbytes].view(dtype).reshape(n, size))
        at += _aligned(nbytes)
    views[-1].fill(0)
    return views


def exact_k_masks(inputs: Sequence[np.ndarray], keep: Sequence[int], scratch: np.ndarray | None = None
                  ) -> np.ndarray | None:
    """(n, E) uint8 masks of the entries mergekit's trim keeps: model t's first ``keep[t]`` of
    ``torch.argsort(|tau_t|, descending=True)`` (:mod:`.exactk`), without sorting; None when a
    task vector is not finite. inputs: the base's rows, then each model's, of one whole tensor;
    scratch: a reused uint8 buffer of at least :func:`exact_k_scratch_bytes` (the masks live in it
    until the next call), else fresh memory."""
    proto, addrs, size = _rows_of(inputs)
    n = len(inputs) - 1
    idx, left, right, keys, masks = _exact_k_views(n, size, scratch)
    worst = np.zeros(n, np.uint32)
    _exact_k_kernel(proto, addrs, size, _f16_table(), np.asarray(keep, np.int64), keys, idx, left, right, masks,
                    worst)
    return masks if n == 0 or worst.max() < _NONFINITE else None


def dare_keys(seed: int, stream: int, n_models: int) -> np.ndarray:
    """(n,) uint64: the key of model t's random stream in :func:`methods.ops.hash_uniform`, with
    methods.dare's per-model seed ``seed + 7919 t``."""
    def fmix32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)

    return np.array([fmix32(((seed + 7919 * t) * 0x9E3779B1 + stream) & 0xFFFFFFFF) for t in range(n_models)],
                    np.uint64)


def ties_merge(inputs: Sequence[np.ndarray], thresholds: np.ndarray | None, weights: np.ndarray, lam: float,
               elect: str, zero_sign: str, majority: float | None, aggregate: str, out: np.ndarray,
               masks: np.ndarray | None = None, dare: tuple[np.ndarray, float, int] | None = None) -> bool:
    """out = base + lam * TIES(models - base) for one chunk; False when a task vector is not finite.
    ``masks`` (n, E) uint8 (from :func:`exact_k_masks`) replace the thresholds' trim; ``dare``
    (keys from :func:`dare_keys`, drop rate, flat offset of the chunk) drops and rescales first."""
    worst = _worst()
    n = len(inputs) - 1
    use_masks = masks is not None
    thr = np.zeros(n, np.float32) if thresholds is None else thresholds.astype(np.float32)
    keys, drop, offset = dare if dare is not None else (np.zeros(0, np.uint64), 0.0, 0)
    # torch keeps u >= drop with u = k 2^-24 (k < 2^24, exact in float32) and drop rounded to float32:
    # k >= ceil(float32(drop) 2^24), an integer comparison; the kept are rescaled by 1 / P(keep), as the torch path
    from ..methods.ops import dare_keep_from, dare_keep_probability

    kept = dare_keep_probability(drop) if dare is not None else 1.0
    rescale = 1.0 / kept if kept > 0 else 0.0
    keep_from = dare_keep_from(drop) if dare is not None else 0
    _ties_kernel(*_rows_of(inputs), _f16_table(), thr, masks if use_masks else np.zeros((n, 0), np.uint8),
                 use_masks, keys, keep_from, float(rescale), int(offset), weights.astype(np.float32), float(lam),
                 ELECT_CODES[elect], ZERO_CODES[zero_sign], float(majority or 0.0), AGGREGATE_CODES[aggregate], out,
                 worst)
    return bool(worst.max() < _NONFINITE)


def linear_merge(inputs: Sequence[np.ndarray], coef: np.ndarray | None, post: float, post_mode: int,
                 out: np.ndarray, masks: np.ndarray | None = None, divisor: float = 1.0) -> bool:
    """out = base + post(sum_t coef_t * tau_t) (task arithmetic, averaging; post_mode 3: / divisor,
    then * post); ``masks`` (n, E) uint8 (from :func:`band_masks`) zero tau first. False when not finite."""
    worst = _worst()
    n = len(inputs) - 1
    use = coef is not None
    c = coef.astype(np.float32) if use else np.ones(n, np.float32)
    use_masks = masks is not None
    _linear_kernel(*_rows_of(inputs), _f16_table(), c, use, masks if use_masks else np.zeros((n, 0), np.uint8),
                   use_masks, float(divisor), float(post), post_mode, out, worst)
    return bool(worst.max() < _NONFINITE)


def values_mean(inputs: Sequence[np.ndarray], coef: np.ndarray, divisor: float, out: np.ndarray) -> bool:
    """out = (sum_i coef_i * x_i) / divisor over the inputs' own values, the base (input 0) first, in
    float32 from 0 in input order (mergekit's linear); False when a value is not finite."""
    worst = _worst()
    _values_mean_kernel(*_rows_of(inputs), _f16_table(), np.asarray(coef, np.float32), float(divisor), out, worst)
    return bool(worst.max() < _NONFINITE)


def band_masks(inputs: Sequence[np.ndarray], bounds: Sequence[tuple[int, int]], scratch: np.ndarray | None = None
               ) -> np.ndarray | None:
    """(n, E) uint8 masks of Breadcrumbs' band: model t's entries at positions bounds[t] = (lo, hi) of
    ``torch.sort(|tau_t|)``'s ascending order (:func:`exactk.band_mask`), without sorting; None when a
    task vector is not finite. inputs and scratch as :func:`exact_k_masks`."""
    proto, addrs, size = _rows_of(inputs)
    n = len(inputs) - 1
    idx, left, right, keys, masks = _exact_k_views(n, size, scratch)
    worst = np.zeros(n, np.uint32)
    lo = np.array([b[0] for b in bounds], np.int64)
    hi = np.array([b[1] for b in bounds], np.int64)
    _band_kernel(proto, addrs, size, _f16_table(), lo, hi, keys, idx, left, right, masks, worst)
    return masks if n == 0 or worst.max() < _NONFINITE else None


def values(inputs: Sequence[np.ndarray], which: int, relative: bool, out: np.ndarray) -> bool:
    """out (E,) float32 := input ``which``'s values, or with ``relative`` its task vector (minus the
    base, input 0), as the torch path widens and subtracts them; False when one is not finite."""
    worst = _worst()
    _values_kernel(*_rows_of(inputs), _f16_table(), int(which), bool(relative), out, worst)
    return bool(worst.max() < _NONFINITE)


def product(x: np.ndarray, y: np.ndarray, out: np.ndarray, sx: float | None = None, sy: float | None = None) -> None:
    """out := x * y, or (x / sx) * (y / sy) with the float32 scales: (E,) float32 each."""
    scaled = sx is not None
    _product_kernel(x, y, float(sx if scaled else 1.0), float(sy if scaled else 1.0), scaled, out)


def interp(inputs: Sequence[np.ndarray], pair: tuple[int, int], relative: bool, c0: float, c1: float,
           divisor: float | None, out: np.ndarray) -> None:
    """out = c0 v0 + c1 v1 (/ divisor) (+ the base with ``relative``, v then the task vectors) over the
    inputs ``pair``; bfloat16 bits or float32 (the reduction pass checked the values finite)."""
    _interp_kernel(*_rows_of(inputs), _f16_table(), int(pair[0]), int(pair[1]), bool(relative), float(c0), float(c1),
                   float(divisor or 1.0), divisor is not None, out)


def stock(inputs: Sequence[np.ndarray], t: float, one_minus_t: float, out: np.ndarray) -> None:
    """out = t * mean of the models' values + (1 - t) * base (Model Stock's last step, torch's order)."""
    _stock_kernel(*_rows_of(inputs), _f16_table(), float(t), float(one_minus_t), out)


def torch_norms(inputs: Sequence[np.ndarray], which: np.ndarray, relative: bool, starts: np.ndarray,
                stops: np.ndarray) -> np.ndarray:
    """(J,) float32: job q's torch.linalg.vector_norm (2-norm, ATen's CPU order) of input which[q]'s values
    (``relative``: minus the base's) over entries starts[q]..stops[q], the values widened from the raw
    rows (Inf or NaN where a value is not finite, or where the squares overflow)."""
    out = np.empty(len(which), np.float32)
    _torch_norm_kernel(*_rows_of(inputs), _f16_table(), np.asarray(which, np.int64), bool(relative),
                       np.asarray(starts, np.int64), np.asarray(stops, np.int64), out)
    return out


def torch_sums(inputs: Sequence[np.ndarray], ia: np.ndarray, ib: np.ndarray, relative: bool,
               scales: tuple[np.ndarray, np.ndarray] | None, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """(J,) float32: job q's 0 + ATen's cascade sum of (x / sa) * (y / sb) (``scales`` (sa, sb)) or x * y
    over entries starts[q]..stops[q], x and y the values of inputs ia[q] and ib[q] (``relative``: task
    vectors): what torch.sum computes on one thread's range of those products."""
    out = np.empty(len(ia), np.float32)
    sa, sb = scales if scales is not None else (np.ones(len(ia), np.float32),) * 2
    _torch_sum_kernel(*_rows_of(inputs), _f16_table(), np.asarray(ia, np.int64), np.asarray(ib, np.int64),
                      bool(relative), scales is not None, np.asarray(sa, np.float32), np.asarray(sb, np.float32),
                      np.asarray(starts, np.int64), np.asarray(stops, np.int64), out)
    return out
