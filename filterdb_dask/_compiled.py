"""Compiled (numba) twins of the hot kernels in :mod:`filterdb_dask.kernels`.

The filters of a chunk are processed in blocks of ``BLOCK`` rows, transposed to
feature-major scratch arrays so that scaling, projection and bin-index guesses
vectorise across rows. Import fails cleanly when numba is absent; the caller
then uses the numpy kernels.

Exactness
---------
* The projection (``_project_block``) does, for every coefficient, the same
  multiplies and adds in the same order as :func:`kernels.project`, with no
  fast-math (no reassociation, no fused multiply-add), so coefficients are
  bitwise equal to the numpy kernel's and bin counts identical.
* Scaling: float32 filters are divided by their peak as one reciprocal per filter
  and two fused multiply-adds per value (``_over_peak``), which give the division's
  bits for 24-bit significands (proof in its docstring); float64 filters are divided.
* Bins: the guess ``g = (v - lo) * scale`` is trusted when it lies farther than
  ``_tolerance`` (>= 1e-9 bins, far above its rounding error) from an integer: then
  ``floor(g)`` is the bin the edges define. Otherwise (about one value in 10^9) the
  exact search decides: np.histogram's own guess-and-correct rule on the coarse
  edges, then the sub-bin on the fine edges (``_fine_exact``), or searchsorted
  semantics for the 2-D density. Pass 3 finds only the fine bin; its coarse bin is
  ``fine // sub`` because the fine edges contain the coarse ones bit for bit.
* Pass 1 sums in the fixed order of :func:`kernels._fixed_sums` (row r of a layer
  feeds lane r % LANES; lanes summed pairwise), without fast-math: the same bits as
  the numpy kernel, on every machine, process and chunking.

Speed (one thread, see ``python -m benchmarks.kernels``): long row loops with
indices LLVM can prove non-negative (no wrap-around, so no gathers) vectorise;
lane counts are run-time values where a constant would be unrolled into scalars.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import kernels as _np_kernels
from .kernels import (
    LANES,
    STAT_N,
    SWEEP_BLOCK,
    normalized_columns,
    ortho_finalize,
    pairs,
    stat_layout,
    sweep_from_band_sums,
    validate_fine_edges,
    variance_entropy_from_scatter,
)

BLOCK = LANES  # pass 1's sums: one lane per row of a block (fixed order); 2, 3 reuse it
LANES_MAX = 64  # lanes of the (order-free) max
# Values per filter D: taken from the arrays at run time (D = 9 for 3x3, 25 for 5x5, ...).
# The loops over D are outer loops; the row loops inside them vectorise for any D.
_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with one rounding (LLVM's fma; vectorises)."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        d = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [d], ir.FunctionType(d, [d, d, d]))
        return builder.call(fn, args)

    return sig, codegen


def _narrow(x: np.ndarray) -> bool:
    """Whether the filters' values have at most 24 significant bits (float32): then
    :func:`_over_peak` scales them with the division's bits; float64 is divided."""
    return x.dtype == np.float32


@njit(**_OPTS)
def _peaks(V, n, P, R, narrow):
    """P[:n] = max_j |V[j, :n]|, the filters' peaks. Returns whether the block may be
    scaled by :func:`_over_peak` (``narrow`` values and no infinite peak); then
    R[:n] = 1 / P (0 where P is 0). Otherwise the caller divides."""
    for r in range(n):
        P[r] = abs(V[0, r])
    for j in range(1, V.shape[0]):
        for r in range(n):
            v = abs(V[j, r])
            P[r] = v if v > P[r] else P[r]
    if not narrow:
        return False
    top = 0.0
    for r in range(n):
        p = P[r]
        top = p if p > top else top
        R[r] = 1.0 / p if p > 0 else 0.0
    return top < np.inf


@njit(**_OPTS)
def _div_peak(w, p):
    """``w / p``, ``0.0`` when the peak ``p`` is 0 (numpy's scaling, divided)."""
    q = w / p
    return q if p > 0 else 0.0


@njit(**_OPTS)
def _over_peak(w, p, y):
    """``w / p`` rounded exactly as the division rounds it (numpy's scaling), for
    ``|w| <= p``, both float32 values, and ``y = 1 / p``; ``0.0`` when ``p`` is 0.

    A divide takes ~2 cycles a value even vectorised; this takes four multiplies
    and adds. q0 = w * y is within 2 ulp of w / p, so the residual e = w - q0 * p
    is exact in one fma, and q0 + e * y (one rounding) lies within 2^-51 ulp of
    w / p. The exact quotient of two 24-bit significands is never within 2^-76 of
    a rounding midpoint (w - p * m, m a 54-bit midpoint, is a non-zero multiple of
    2^-77 w), so both round to the same double. ``w == 0`` keeps its sign, as the
    division does. An infinite peak (not from the converter, which refuses
    non-finite values) is left to the division (:func:`_peaks`).
    """
    q0 = w * y
    q = _fma(_fma(-q0, p, w), y, q0)
    q = q if w != 0.0 else w
    return q if p > 0 else 0.0


@njit(**_OPTS)
def _columns(x, r0, n, V):
    """V[:, :n] = rows r0..r0+n of x (C-contiguous), feature-major, as float64.

    Value-major reads (each value's column in turn, rows inside): 4.9 against 8.0 ns a
    filter in the row order for 3x3 float32."""
    nf = x.shape[1]
    flat = x.reshape(-1)  # C-contiguous: a view
    for j in range(nf):
        for r in range(n):
            V[j, r] = np.float64(flat[(r0 + r) * nf + j])


@njit(**_OPTS)
def _load_shifted(x, r0, n, W, S, P, R, narrow, ks, kw):
    """Filters W[:, :n] - kw (float64, feature-major), peaks P[:n] (R[:n] = 1 / P) and
    scaled filters S[:, :n] - ks of rows r0..r0+n (W and S distinct arrays). Shifting
    in the scaling loop spares a pass over the block; zero shifts give the unshifted
    values, bit for bit."""
    nf = x.shape[1]
    _columns(x, r0, n, W)
    if not _peaks(W, n, P, R, narrow):  # float64 values or an infinite peak
        for j in range(nf):
            kj = ks[j]
            wj = kw[j]
            for r in range(n):
                w = W[j, r]
                S[j, r] = _div_peak(w, P[r]) - kj
                W[j, r] = w - wj
        return
    for j in range(nf):
        kj = ks[j]
        wj = kw[j]
        for r in range(n):
            w = W[j, r]
            S[j, r] = _over_peak(w, P[r], R[r]) - kj
            W[j, r] = w - wj


@njit(**_OPTS)
def _scale_block(x, r0, n, S, P, R, narrow):
    """Peaks P[:n] (R[:n] = 1 / P) and scaled filters S[:, :n] (feature-major) of
    rows r0..r0+n.

    Its own loops, not ``_load_shifted`` with W and S the same array: then
    LLVM's run-time alias check fails and every loop runs scalar (2x slower)."""
    nf = x.shape[1]
    _columns(x, r0, n, S)
    if not _peaks(S, n, P, R, narrow):  # float64 values or an infinite peak
        for j in range(nf):
            for r in range(n):
                S[j, r] = _div_peak(S[j, r], P[r])
        return
    for j in range(nf):
        for r in range(n):
            S[j, r] = _over_peak(S[j, r], P[r], R[r])


@njit(**_OPTS)
def _project_block(S, n, mean, comps, C):
    """C[k, :n] = sum_j (S[j] - mean[j]) * comps[k, j], left to right (no fast-math).

    S is overwritten with S - mean. For D = 9 the nine terms of each coefficient are
    written out, so that C[k] stays in a register across them and the row loop
    vectorises; any other D adds term j to C[k] for all rows before term j + 1 (the
    same additions in the same order per coefficient, so the same bits).
    """
    nf = mean.shape[0]
    for j in range(nf):
        mj = mean[j]
        for r in range(n):
            S[j, r] = S[j, r] - mj
    if nf != 9:
        for k in range(comps.shape[0]):
            v0 = comps[k, 0]
            for r in range(n):
                C[k, r] = S[0, r] * v0
            for j in range(1, nf):
                vj = comps[k, j]
                for r in range(n):
                    C[k, r] = C[k, r] + S[j, r] * vj
        return
    for k in range(comps.shape[0]):
        v0 = comps[k, 0]
        v1 = comps[k, 1]
        v2 = comps[k, 2]
        v3 = comps[k, 3]
        v4 = comps[k, 4]
        v5 = comps[k, 5]
        v6 = comps[k, 6]
        v7 = comps[k, 7]
        v8 = comps[k, 8]
        for r in range(n):
            acc = S[0, r] * v0
            acc = acc + S[1, r] * v1
            acc = acc + S[2, r] * v2
            acc = acc + S[3, r] * v3
            acc = acc + S[4, r] * v4
            acc = acc + S[5, r] * v5
            acc = acc + S[6, r] * v6
            acc = acc + S[7, r] * v7
            acc = acc + S[8, r] * v8
            C[k, r] = acc


# ---------------------------------------------------------------------- pass 1
@njit(**_OPTS)
def _abs_max(x, a, b, lw, M):
    """max |x[a:b]| over all values; lane-wise in M[:lw] (max is exact in any order)."""
    nf = x.shape[1]
    flat = x.reshape(-1)[a * nf : b * nf]
    M[:] = 0.0
    ng = flat.shape[0] // LANES_MAX
    for g in range(ng):
        i0 = g * LANES_MAX  # provably >= 0: no wrap-around, no gathers
        for ln in range(lw):
            v = abs(np.float64(flat[i0 + ln]))
            M[ln] = v if v > M[ln] else M[ln]
    for i in range(ng * LANES_MAX, flat.shape[0]):
        v = abs(np.float64(flat[i]))
        M[0] = v if v > M[0] else M[0]
    m = 0.0
    for ln in range(lw):
        if M[ln] > m:
            m = M[ln]
    return m


@njit(**_OPTS)
def _pair_group(PJ, PM, p):
    """The products one row loop of the lane sums handles from pair ``p`` on: (j, k)
    and, when pair p + 1 shares its first value j (``two``), (j, k2) as well."""
    j = PJ[p]
    k = PM[p]
    two = p + 1 < PJ.shape[0] and PJ[p + 1] == j
    k2 = PM[p + 1] if two else k
    return j, k, k2, two


@njit(**_OPTS)
def _lane_add_sums_products(D, m, PJ, PM, LS, LP):
    """LS[j, r] += D[j, r] and LP[p, r] += D[PJ[p], r] * D[PM[p], r] for r < m: the
    D sums and the D(D+1)/2 cross products, one lane per row of the block.

    Two products with the same first value share one row loop (that value loaded
    once), and sum j is added in the loop of product (j, j) (``pairs`` lists each
    once): 1.04-1.06x pass 1 against a loop per sum and per product. Every lane
    still gets one addition per row of each sum and product, in row order: the
    same bits.
    """
    npair = PJ.shape[0]
    p = 0
    while p < npair:
        j, k, k2, two = _pair_group(PJ, PM, p)
        if two and k == j:
            for r in range(m):
                dj = D[j, r]
                LS[j, r] = LS[j, r] + dj
                LP[p, r] = LP[p, r] + dj * D[k, r]
                LP[p + 1, r] = LP[p + 1, r] + dj * D[k2, r]
        elif two:
            for r in range(m):
                dj = D[j, r]
                LP[p, r] = LP[p, r] + dj * D[k, r]
                LP[p + 1, r] = LP[p + 1, r] + dj * D[k2, r]
        elif k == j:
            for r in range(m):
                dj = D[j, r]
                LS[j, r] = LS[j, r] + dj
                LP[p, r] = LP[p, r] + dj * D[k, r]
        else:
            for r in range(m):
                LP[p, r] = LP[p, r] + D[j, r] * D[k, r]
        p += 2 if two else 1


@njit(**_OPTS)
def _add4(acc, a0, a1, a2, a3, D0, D1, D2, D3, k, r):
    """``acc`` plus ``a_b * D_b[k, r]`` for the blocks b = 0..3, in block order."""
    return (((acc + a0 * D0[k, r]) + a1 * D1[k, r]) + a2 * D2[k, r]) + a3 * D3[k, r]


@njit(**_OPTS)
def _lane_add4(D4, PJ, PM, LS, LP):
    """:func:`_lane_add_sums_products` of four full blocks ``D4[0..3]`` (each (D,
    LANES)), added to every lane in block order: the same additions, the same bits.

    Each accumulator is loaded and stored once for the four blocks instead of four
    times: the 2 x 54 accumulator rows (2 x 110 KB for 3x3) no longer stream through
    the cache for every block (1.9x the one-block loop alone, one thread).
    """
    npair = PJ.shape[0]
    m = D4.shape[2]
    D0 = D4[0]
    D1 = D4[1]
    D2 = D4[2]
    D3 = D4[3]
    p = 0
    while p < npair:
        j, k, k2, two = _pair_group(PJ, PM, p)
        # one loop per case, so that each row loop is straight-line code (vectorised)
        if two and k == j:
            for r in range(m):
                a0, a1, a2, a3 = D0[j, r], D1[j, r], D2[j, r], D3[j, r]
                LS[j, r] = (((LS[j, r] + a0) + a1) + a2) + a3
                LP[p, r] = _add4(LP[p, r], a0, a1, a2, a3, D0, D1, D2, D3, k, r)
                LP[p + 1, r] = _add4(LP[p + 1, r], a0, a1, a2, a3, D0, D1, D2, D3, k2, r)
        elif two:
            for r in range(m):
                a0, a1, a2, a3 = D0[j, r], D1[j, r], D2[j, r], D3[j, r]
                LP[p, r] = _add4(LP[p, r], a0, a1, a2, a3, D0, D1, D2, D3, k, r)
                LP[p + 1, r] = _add4(LP[p + 1, r], a0, a1, a2, a3, D0, D1, D2, D3, k2, r)
        elif k == j:
            for r in range(m):
                a0, a1, a2, a3 = D0[j, r], D1[j, r], D2[j, r], D3[j, r]
                LS[j, r] = (((LS[j, r] + a0) + a1) + a2) + a3
                LP[p, r] = _add4(LP[p, r], a0, a1, a2, a3, D0, D1, D2, D3, k, r)
        else:
            for r in range(m):
                a0, a1, a2, a3 = D0[j, r], D1[j, r], D2[j, r], D3[j, r]
                LP[p, r] = _add4(LP[p, r], a0, a1, a2, a3, D0, D1, D2, D3, k, r)
        p += 2 if two else 1


@njit(**_OPTS)
def _count_clean(P, m, t):
    """How many of the m peaks P[:m] are at least t (clean filters)."""
    cnt = 0
    for r in range(m):
        cnt += 1 if P[r] >= t else 0
    return cnt


@njit(**_OPTS)
def _clean_rows(W, P, m, t, DC):
    """DC[:, :m] = W[:, :m] where the filter's peak is at least t, else 0 (times 0.0)."""
    for j in range(W.shape[0]):
        for r in range(m):
            c = 1.0 if P[r] >= t else 0.0
            DC[j, r] = W[j, r] * c


@njit(**_OPTS)
def _block_sums(S, W, DC, P, m, t, same, used, PJ, PM, LS, LP):
    """Add one block of m rows (scaled S, unscaled W, peaks P) to the three sets of
    lane sums (scaled; unscaled; unscaled clean filters, those with a peak >= t).
    While every filter so far is clean (``same``) the clean set is not kept: it is
    copied from the unscaled one (same bits) before the first block with a sparse
    filter adds to it. Returns the block's clean filters and the new ``same``."""
    cnt = _count_clean(P, m, t)
    _lane_add_sums_products(S, m, PJ, PM, LS[0], LP[0])
    if same and cnt < m:
        LS[2, :, :used] = LS[1, :, :used]
        LP[2, :, :used] = LP[1, :, :used]
        same = False
    _lane_add_sums_products(W, m, PJ, PM, LS[1], LP[1])
    if not same:
        _clean_rows(W, P, m, t, DC)
        _lane_add_sums_products(DC, m, PJ, PM, LS[2], LP[2])
    return cnt, same


@njit(**_OPTS)
def _lane_tree(v, used, t):
    """Sum of the lanes v[:LANES] in a fixed pairwise order: lane i + lane i + half,
    halving until one is left. Lanes from ``used`` on are taken as +0.0 and never
    read: adding +0.0 changes no lane (a lane is never -0.0), so skipping those
    additions gives the same bits as doing them. ``t`` is scratch."""
    for ln in range(used):
        t[ln] = v[ln]
    h = v.shape[0] // 2
    while h >= 1:
        for ln in range(max(0, used - h)):
            t[ln] = t[ln] + t[ln + h]
        used = min(used, h)
        h //= 2
    return t[0] if used > 0 else 0.0


@njit(**_OPTS)
def _stats_core(x, narrow, bounds, PJ, PM, out, sc_all, sc_clean):
    NF = x.shape[1]
    NPAIR = PJ.shape[0]
    # four blocks of scratch: full runs of four blocks add to the lane sums at once
    W = np.empty((4, NF, BLOCK))
    S = np.empty((4, NF, BLOCK))
    DC = np.empty((4, NF, BLOCK))
    P = np.empty((4, BLOCK))
    R = np.empty((4, BLOCK))
    ks = np.empty(NF)
    zero = np.zeros(NF)
    kw = np.empty(NF)
    LS = np.empty((3, NF, BLOCK))
    LP = np.empty((3, NPAIR, BLOCK))
    tot_s = np.empty((3, NF))
    tot_p = np.empty((3, NPAIR))
    tmp = np.empty(BLOCK)
    mx = np.empty(LANES_MAX)
    for li in range(bounds.shape[0]):
        a = bounds[li, 0]
        b = bounds[li, 1]
        n = b - a
        out[li, STAT_N] = n
        if n == 0:
            continue
        t = 0.01 * _abs_max(x, a, b, LANES_MAX, mx)
        if t == 0:
            t = 1.0
        # shift by the layer's first filter: sums of (x - k) stay small
        _load_shifted(x, a, 1, W[0], S[0], P[0], R[0], narrow, zero, zero)
        for j in range(NF):
            ks[j] = S[0, j, 0]
            kw[j] = W[0, j, 0]
        used = min(n, BLOCK)  # lanes this layer touches; the others are never read
        LS[:2, :, :used] = 0.0
        LP[:2, :, :used] = 0.0
        # while every filter so far is clean, the clean sums equal the plain ones:
        # they are copied (same bits) at the first block with a sparse filter
        same = True
        nclean = 0
        r0 = a
        while r0 < b:
            if b - r0 < 4 * BLOCK:  # the layer's last blocks, one at a time
                m = min(BLOCK, b - r0)
                _load_shifted(x, r0, m, W[0], S[0], P[0], R[0], narrow, ks, kw)
                cnt, same = _block_sums(S[0], W[0], DC[0], P[0], m, t, same, used, PJ, PM,
                                        LS, LP)
                nclean += cnt
                r0 += m
                continue
            cnt4 = 0
            for q in range(4):
                _load_shifted(x, r0 + q * BLOCK, BLOCK, W[q], S[q], P[q], R[q], narrow,
                              ks, kw)
                cnt4 += _count_clean(P[q], BLOCK, t)
            if same and cnt4 < 4 * BLOCK:  # the first sparse filter: block by block
                for q in range(4):
                    cnt, same = _block_sums(S[q], W[q], DC[q], P[q], BLOCK, t, same, used,
                                            PJ, PM, LS, LP)
            else:
                _lane_add4(S, PJ, PM, LS[0], LP[0])
                _lane_add4(W, PJ, PM, LS[1], LP[1])
                if not same:
                    for q in range(4):
                        _clean_rows(W[q], P[q], BLOCK, t, DC[q])
                    _lane_add4(DC, PJ, PM, LS[2], LP[2])
            nclean += cnt4
            r0 += 4 * BLOCK
        for q in range(3 if not same else 2):
            for j in range(NF):
                tot_s[q, j] = _lane_tree(LS[q, j], used, tmp)
            for p in range(NPAIR):
                tot_p[q, p] = _lane_tree(LP[q, p], used, tmp)
        if same:
            tot_s[2] = tot_s[1]
            tot_p[2] = tot_p[1]
        sp_col = 1 + NF + NF * NF  # the stat layout's sparsity; n_clean 3 after it
        out[li, sp_col + 3] = nclean
        out[li, sp_col] = (n - nclean) / n
        for j in range(NF):
            out[li, 1 + j] = ks[j] + tot_s[0, j] / n
        for p in range(NPAIR):
            j = PJ[p]
            m = PM[p]
            v = tot_p[0, p] - tot_s[0, j] * tot_s[0, m] / n
            out[li, 1 + NF + j * NF + m] = v
            out[li, 1 + NF + m * NF + j] = v
            w = tot_p[1, p] - tot_s[1, j] * tot_s[1, m] / n
            sc_all[li, j, m] = w
            sc_all[li, m, j] = w
            if nclean > 0:
                c = tot_p[2, p] - tot_s[2, j] * tot_s[2, m] / nclean
                sc_clean[li, j, m] = c
                sc_clean[li, m, j] = c


def layer_stats_chunk(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Compiled :func:`filterdb_dask.kernels.layer_stats_chunk`."""
    bounds = np.ascontiguousarray(bounds, dtype=np.int64).reshape(-1, 2)
    x = np.ascontiguousarray(x)
    nl = len(bounds)
    d = x.shape[1]
    lay = stat_layout(d)
    pj, pm = pairs(d)
    out = np.zeros((nl, lay.size))
    sc_all = np.zeros((nl, d, d))
    sc_clean = np.zeros((nl, d, d))
    _stats_core(x, _narrow(x), bounds, pj, pm, out, sc_all, sc_clean)
    n = out[:, STAT_N]
    out[:, lay.ve] = variance_entropy_from_scatter(sc_all, n)
    out[:, lay.ve_clean] = variance_entropy_from_scatter(sc_clean, out[:, lay.n_clean])
    empty = n == 0
    out[empty, lay.sparsity] = np.nan
    out[empty, lay.ve] = np.nan
    out[empty, lay.ve_clean] = np.nan
    return out


# ------------------------------------------------------------------ binning
def _tolerance(lo: float, hi: float, scale: float, nbins: int) -> float:
    """Half-width (in bin units) of the band around each edge inside which a bin
    guess ``(v - lo) * scale`` is not trusted.

    The guess and the edges each carry a few roundings of at most half an ulp of
    ``max(|lo|, |hi|)`` (scaled to bin units) or of ``nbins``; 64 such ulps bound
    them with a wide margin. Outside the band the truncated guess is the bin the
    edges define; inside it (about one value in 10^9) the exact search decides. A
    range so narrow that the band is wide sends every value to the exact search.
    """
    m = max(abs(lo), abs(hi))
    tol = max(1e-9, 64 * 2.0**-53 * (m * scale + nbins))
    return tol if tol < 0.01 else 1.0


@njit(**_OPTS)
def _bin_fast(C, kk, n, lo, scale, nbins, tol, idx):
    """idx[k, :n] = bin of C[k, :n] (k < kk) on uniform bins where the guess is
    certain, else -1. Branch-free, so that it vectorises across rows."""
    top = np.float64(nbins)
    for k in range(kk):
        for r in range(n):
            g = (C[k, r] - lo) * scale
            inside = (g >= 0.0) & (g < top)
            gc = g if inside else 0.0
            gi = np.int32(gc)
            fr = gc - np.float64(gi)
            good = inside & (fr > tol) & (fr < 1.0 - tol)
            idx[k, r] = gi if good else np.int32(-1)


@njit(**_OPTS)
def _coarse_numpy(v, edges):
    """np.histogram's bin of v on uniform ``edges`` (its guess and one-step
    correction, the last bin closed); -1 outside."""
    nb = edges.shape[0] - 1
    lo = edges[0]
    hi = edges[nb]
    if not (v >= lo and v <= hi):
        return -1
    i = np.intp(((v - lo) / (hi - lo)) * nb)
    if i == nb:
        i -= 1
    if v < edges[i]:
        i -= 1
    elif i != nb - 1 and v >= edges[i + 1]:
        i += 1
    return i


@njit(**_OPTS)
def _fine_exact(v, edges, fedges, fscale, sub):
    """Fine bin of v: numpy's coarse bin c, then the sub-bin s of c with
    ``fedges[c*sub + s] <= v < fedges[c*sub + s + 1]`` (last closed); -1 outside."""
    c = _coarse_numpy(v, edges)
    if c < 0:
        return -1
    base = c * sub
    s = np.intp((v - edges[0]) * fscale) - base
    if s < 0:
        s = 0
    if s > sub - 1:
        s = sub - 1
    while s > 0 and v < fedges[base + s]:
        s -= 1
    while s < sub - 1 and v >= fedges[base + s + 1]:
        s += 1
    return base + s


@njit(**_OPTS)
def _bin_searchsorted(v, edges, scale):
    """Bin of v as searchsorted on ``edges`` finds it (last bin closed), -1 outside."""
    nb = edges.shape[0] - 1
    lo = edges[0]
    hi = edges[nb]
    if not (v >= lo and v <= hi):
        return -1
    if v == hi:
        return nb - 1
    g = (v - lo) * scale
    i = np.intp(g) if g > 0 else 0
    if i > nb - 1:
        i = nb - 1
    while i > 0 and v < edges[i]:
        i -= 1
    while i < nb - 1 and v >= edges[i + 1]:
        i += 1
    return i


# ---------------------------------------------------------------------- pass 2
@njit(**_OPTS)
def _range_density_core(x, narrow, bounds, mean, comps, dedges, dtol, rng, dens):
    NF = x.shape[1]
    S = np.empty((NF, BLOCK))
    C = np.empty((NF, BLOCK))
    P = np.empty(BLOCK)
    R = np.empty(BLOCK)
    idx = np.empty((NF, BLOCK), dtype=np.int32)
    LO = np.full(BLOCK, np.inf)
    HI = np.full(BLOCK, -np.inf)
    nb = dedges.shape[0] - 1
    dlo = dedges[0]
    dscale = nb / (dedges[nb] - dedges[0])
    for li in range(bounds.shape[0]):
        for r0 in range(bounds[li, 0], bounds[li, 1], BLOCK):
            m = min(BLOCK, bounds[li, 1] - r0)
            _scale_block(x, r0, m, S, P, R, narrow)
            _project_block(S, m, mean, comps, C)
            # min/max are exact in any order: lane-wise, so that it vectorises
            for k in range(NF):
                for r in range(m):
                    v = C[k, r]
                    LO[r] = v if v < LO[r] else LO[r]
                    HI[r] = v if v > HI[r] else HI[r]
            _bin_fast(C, 2, m, dlo, dscale, nb, dtol, idx)
            for r in range(m):
                i0 = idx[0, r]
                if i0 < 0:
                    i0 = _bin_searchsorted(C[0, r], dedges, dscale)
                i1 = idx[1, r]
                if i1 < 0:
                    i1 = _bin_searchsorted(C[1, r], dedges, dscale)
                if i0 >= 0 and i1 >= 0:
                    dens[i0 * nb + i1] += 1
    lo = np.inf
    hi = -np.inf
    for r in range(BLOCK):
        if LO[r] < lo:
            lo = LO[r]
        if HI[r] > hi:
            hi = HI[r]
    rng[0] = lo
    rng[1] = hi


def range_density_chunk(x, bounds, mean, components, density_edges):
    """Compiled :func:`filterdb_dask.kernels.range_density_chunk`."""
    dedges = np.ascontiguousarray(density_edges, dtype=np.float64)
    nb = len(dedges) - 1
    rng = np.array([np.inf, -np.inf])
    dens = np.zeros(nb * nb, dtype=np.int32)  # a chunk holds < 2**31 filters
    x = np.ascontiguousarray(x)
    _range_density_core(
        x,
        _narrow(x),
        np.ascontiguousarray(bounds, dtype=np.int64).reshape(-1, 2),
        np.ascontiguousarray(mean, dtype=np.float64),
        np.ascontiguousarray(components, dtype=np.float64),
        dedges,
        _tolerance(dedges[0], dedges[-1], nb / (dedges[-1] - dedges[0]), nb),
        rng,
        dens,
    )
    return rng, dens.reshape(nb, nb).astype(np.int64)


# ---------------------------------------------------------------------- pass 3
@njit(**_OPTS)
def _histogram_core(x, narrow, bounds, mean, comps, edges, groups, fedges, tol, hist, fine):
    NF = x.shape[1]
    S = np.empty((NF, BLOCK))
    C = np.empty((NF, BLOCK))
    P = np.empty(BLOCK)
    R = np.empty(BLOCK)
    idx = np.empty((NF, BLOCK), dtype=np.int32)
    nb = edges.shape[0] - 1
    nf = fedges.shape[0] - 1
    sub = nf // nb
    lo = edges[0]
    fscale = nf / (edges[nb] - edges[0])
    coarse_of = np.empty(nf, dtype=np.intp)
    for i in range(nf):
        coarse_of[i] = i // sub
    ng = groups.shape[1]
    scratch = np.zeros((NF, nf), dtype=np.int32)
    codes = np.empty(ng, dtype=np.intp)
    for li in range(bounds.shape[0]):
        a = bounds[li, 0]
        b = bounds[li, 1]
        nc = 0
        for g in range(ng):
            if groups[li, g] >= 0:
                codes[nc] = groups[li, g]
                nc += 1
        # one increment per value into a per-layer fine histogram, then the
        # coarse bins and the groups from it; tiny layers increment directly
        direct = (b - a) * (1 + nc) <= nf * (2 + nc)
        for r0 in range(a, b, BLOCK):
            m = min(BLOCK, b - r0)
            _scale_block(x, r0, m, S, P, R, narrow)
            _project_block(S, m, mean, comps, C)
            _bin_fast(C, NF, m, lo, fscale, nf, tol, idx)
            for r in range(m):
                for k in range(NF):
                    i = idx[k, r]
                    if i < 0:
                        i = _fine_exact(C[k, r], edges, fedges, fscale, sub)
                        if i < 0:
                            continue
                    if direct:
                        hist[li, k, coarse_of[i]] += 1
                        for q in range(nc):
                            fine[codes[q], k, i] += 1
                    else:
                        scratch[k, i] += 1
        if not direct:
            for k in range(NF):
                for c in range(nb):
                    t = 0
                    for s in range(sub):
                        t += scratch[k, c * sub + s]
                    hist[li, k, c] = t
                for q in range(nc):
                    for i in range(nf):
                        fine[codes[q], k, i] += scratch[k, i]
                for i in range(nf):
                    scratch[k, i] = 0


def histogram_chunk(x, bounds, mean, components, edges, layer_groups, n_groups, fine_edges):
    """Compiled :func:`filterdb_dask.kernels.histogram_chunk`."""
    edges = np.ascontiguousarray(edges, dtype=np.float64)
    fedges = np.ascontiguousarray(fine_edges, dtype=np.float64)
    sub = validate_fine_edges(edges, fedges)
    bounds = np.ascontiguousarray(bounds, dtype=np.int64).reshape(-1, 2)
    groups = np.ascontiguousarray(layer_groups, dtype=np.int64).reshape(len(bounds), -1)
    nb = len(edges) - 1
    nf = nb * sub
    d = np.shape(x)[1]
    hist = np.zeros((len(bounds), d, nb), dtype=np.uint32)
    fine = np.zeros((n_groups, d, nf), dtype=np.int64)
    fscale = nf / (edges[-1] - edges[0])
    x = np.ascontiguousarray(x)
    _histogram_core(
        x,
        _narrow(x),
        bounds,
        np.ascontiguousarray(mean, dtype=np.float64),
        np.ascontiguousarray(components, dtype=np.float64),
        edges,
        groups,
        fedges,
        _tolerance(edges[0], edges[-1], fscale, nf),
        hist,
        fine,
    )
    return hist, fine


# ------------------------------------------------------------- pass 1: ε sweep
@njit(**_OPTS)
def _sweep_dot4(a, b, n):
    """sum(a[:n] * b[:n]) in four interleaved lanes, the tail in lane 0, then
    ``(l0 + l1) + (l2 + l3)``: the order of :func:`kernels._lanes4`."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    n4 = n - n % 4
    for r in range(0, n4, 4):
        s0 += a[r] * b[r]
        s1 += a[r + 1] * b[r + 1]
        s2 += a[r + 2] * b[r + 2]
        s3 += a[r + 3] * b[r + 3]
    for r in range(n4, n):
        s0 += a[r] * b[r]
    return (s0 + s1) + (s2 + s3)


@njit(**_OPTS)
def _sweep_core(x, bounds, eps_sorted, cnt, s1, s2):
    """Per layer and band of peaks between consecutive thresholds: count, sums and
    upper-triangle cross products of ``w - w[first]``; band E (peak at or above
    every threshold, the usual filter) in blocks with vectorisable dot products,
    the few others row by row. Deterministic: fixed summation order, no fast-math.
    On return band k holds the sums of bands k..E (the filters with peak >= t[k-1])."""
    d = x.shape[1]
    e = eps_sorted.shape[0]
    t = np.empty(e)
    kw = np.empty(d)
    DW = np.empty((d, SWEEP_BLOCK))
    DC = np.empty((d, SWEEP_BLOCK))
    c = np.empty(SWEEP_BLOCK)
    band = np.empty(SWEEP_BLOCK, dtype=np.int64)
    ones = np.ones(SWEEP_BLOCK)
    for li in range(bounds.shape[0]):
        a = bounds[li, 0]
        b = bounds[li, 1]
        if b <= a:
            continue
        lmax = 0.0
        for r in range(a, b):
            for j in range(d):
                v = abs(np.float64(x[r, j]))
                if v > lmax:
                    lmax = v
        for k in range(e):
            t[k] = eps_sorted[k] * lmax
            if t[k] == 0:
                t[k] = 1.0
        for j in range(d):
            kw[j] = np.float64(x[a, j])
        for r0 in range(a, b, SWEEP_BLOCK):
            n = min(SWEEP_BLOCK, b - r0)
            for r in range(n):
                p = 0.0
                for j in range(d):
                    v = np.float64(x[r0 + r, j])
                    DW[j, r] = v - kw[j]
                    if abs(v) > p:
                        p = abs(v)
                bd = e
                for k in range(e):
                    if p < t[k]:
                        bd = k
                        break
                band[r] = bd
                c[r] = 1.0 if bd == e else 0.0
            nc = _sweep_dot4(c, ones, n)
            cnt[li, e] += nc
            if nc == n:
                src = DW
            else:
                for j in range(d):
                    for r in range(n):
                        DC[j, r] = DW[j, r] * c[r]
                src = DC
                for r in range(n):
                    bd = band[r]
                    if bd < e:
                        cnt[li, bd] += 1.0
                        for j in range(d):
                            s1[li, bd, j] += DW[j, r]
                            for m in range(j, d):
                                s2[li, bd, j * d + m] += DW[j, r] * DW[m, r]
            for j in range(d):
                s1[li, e, j] += _sweep_dot4(src[j], ones, n)
                for m in range(j, d):
                    s2[li, e, j * d + m] += _sweep_dot4(src[j], src[m], n)
        # suffix sums: band k now holds every filter clean at the k-th threshold
        for k in range(e - 1, -1, -1):
            cnt[li, k] += cnt[li, k + 1]
            for j in range(d):
                s1[li, k, j] += s1[li, k + 1, j]
            for q in range(d * d):
                s2[li, k, q] += s2[li, k + 1, q]


def sparsity_sweep_chunk(x: np.ndarray, bounds: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Compiled :func:`filterdb_dask.kernels.sparsity_sweep_chunk`: one sweep sorts
    every filter into the band of thresholds its peak falls in; the filters clean at
    ε are the bands above it, merged from their shifted sums. Counts are exact."""
    bounds = np.ascontiguousarray(bounds, dtype=np.int64).reshape(-1, 2)
    x = np.ascontiguousarray(x)
    eps = np.asarray(eps, dtype=np.float64).reshape(-1)
    order = np.argsort(eps, kind="stable")
    e, nl, d = len(eps), len(bounds), x.shape[1]
    cnt = np.zeros((nl, e + 1))
    s1 = np.zeros((nl, e + 1, d))
    s2 = np.zeros((nl, e + 1, d * d))
    _sweep_core(x, bounds, np.ascontiguousarray(eps[order]), cnt, s1, s2)
    return sweep_from_band_sums(bounds, order, cnt, s1, s2)


ORTHO_ROWS = 8  # Gram rows built together: one pass over Ŵ serves 8 rows


@njit(**_OPTS)
def _ortho_upper_abs_sum(wt, c, m):
    """Σ_{i<j} |Ĝ_ij| in the order of :func:`kernels.orthogonality_rows`: each Gram
    entry over k from 0.0, each row's |entries| left to right, rows in order."""
    total = 0.0
    rows = np.empty((ORTHO_ROWS, c))
    for r0 in range(0, c - 1, ORTHO_ROWS):
        nr = min(ORTHO_ROWS, c - 1 - r0)
        for rr in range(nr):
            for s in range(c):
                rows[rr, s] = 0.0
        for k in range(m):
            for rr in range(nr):
                r = r0 + rr
                a = wt[k, r]
                for s in range(r + 1, c):
                    rows[rr, s] += a * wt[k, s]
        for rr in range(nr):
            acc = 0.0
            for s in range(r0 + rr + 1, c):
                acc += abs(rows[rr, s])
            total += acc
    return total


def orthogonality_rows(w: np.ndarray) -> float:
    """Compiled twin of :func:`kernels.orthogonality_rows` (same bits)."""
    w = np.asarray(w, dtype=np.float64)
    c = w.shape[0]
    if c < 2:
        return float("nan")
    wt = normalized_columns(w)
    return ortho_finalize(_ortho_upper_abs_sum(wt, c, wt.shape[0]), c)


def orthogonality_chunk(x: np.ndarray, bounds: np.ndarray, out_channels: np.ndarray) -> np.ndarray:
    """Compiled twin of :func:`kernels.orthogonality_chunk` (same bits)."""
    return _np_kernels.orthogonality_chunk(x, bounds, out_channels, _rows=orthogonality_rows)
