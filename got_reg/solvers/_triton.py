r"""Optional Triton kernels for the log-domain Sinkhorn solver (CUDA; CPU only through Triton's interpreter).

Three kernels, all in float32 with the convention of :mod:`got_reg.solvers.sinkhorn`: a cost matrix C may
hold +∞ on forbidden (masked) pairs, which contribute exactly 0 to every sum; every row and column must
keep a finite entry (the caller checks that, this module never synchronises with the host).

:func:`row_lse` — one half of a Sinkhorn sweep for large matrices,

    out_i = log Σ_j exp(scale · A_ij + w_j),

streamed over column tiles with the *online* log-sum-exp: each program keeps, per row, a running maximum
M and a running sum S = Σ_seen exp(x_j − M); a new tile with maximum M' ≥ M updates

    S ← S · exp(M − M') + Σ_tile exp(x_j − M'),   M ← M',

and the result is M + log S. A is read once, nothing of size n × m is written, and the exponent is
never positive, so the sums cannot overflow. The torch expression materialises w + scale·A and its
exponential for every half-sweep, which is what made a B = 8192 solve memory-bound.

:func:`sinkhorn_fused` — a whole solve (ε-scaling, then Anderson-accelerated Sinkhorn with its stopping test)
for n, m ≤ 1024 (:data:`FUSED_LIMIT`) in one launch of one program per problem. At B = 128 a solve is a few
microseconds of arithmetic but hundreds of kernel launches and a host synchronisation per stopping test in
eager torch; here the loop, its control flow and the stopping test run on the device, and the results
(potentials, iteration count, marginal error) stay there until the caller reads them. The solvers send it
problems up to :data:`FUSED_MAX` = 256 (:func:`fused_takes`; ``GOT_REG_FUSED_MAX`` in the environment moves
it): one program streams C from L2 on every pass, so its time grows with n·m while the torch loop's stays
launch-bound, and where the two cross above 256 is for ``benchmarks/bench_acceleration.py`` to measure on a
GPU (it times both up to the limit).

:class:`Anderson` — the Anderson step of the torch loop (B > 256, where the sweeps are two :func:`row_lse`
launches) in one launch instead of about 20 eager operators, for iterates of any length.

Arithmetic is float32 throughout (Triton's exp is ex2.approx, 2 ulp). tests/solvers/test_triton.py holds it
to an eager torch loop of the same algorithm (tests/fused_reference.py): sweep for sweep (value 1e-5
relative, plan 1e-5 in L1 against float64) for plain Sinkhorn and the first accelerated sweeps; over whole
accelerated solves, where rounding differences grow through the least squares, by its answer: the error it
reports, exact columns, and a value within the gap that error allows of the exact one.

The import of ``triton`` is optional: without it this module still imports and :func:`available` is
False. Kernels are compiled for the GPU unless ``TRITON_INTERPRET=1`` was set when this module was
imported, in which case they run on CPU tensors through Triton's interpreter (tests, no GPU needed).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

try:  # optional dependency
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # ImportError, or a broken install (missing libraries): the torch paths still work
    triton = None
    tl = None
    _HAVE_TRITON = False

# Triton decides at decoration time whether @triton.jit builds GPU kernels or interpreter functions.
INTERPRET = False
if _HAVE_TRITON:
    try:
        INTERPRET = bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older releases without knobs
        INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The largest problem the solvers send to :func:`sinkhorn_fused` by default (:func:`fused_max`), and the
# largest it takes at all: its vectors (u, v, Anderson's 8 × n history) live in registers, and at 1024 the
# sm_90 build uses 179 of them at 8 warps without spills (``triton_selfcheck.py --aot``). Above FUSED_MAX the
# torch loop runs until a GPU measurement says the fused launch is faster there.
FUSED_MAX = 256
FUSED_LIMIT = 1024
FUSED_MAX_ENV = "GOT_REG_FUSED_MAX"
# Tiles of at most this many entries stay in registers for the whole solve; larger ones are re-read
# from global memory (L1/L2) each pass: 256 × 256 fp32 is 256 KB, the size of an SM's register file.
_RESIDENT_MAX = 128 * 128
# Entries per chunk of a streamed pass, and per tile of row_lse (about 32 per thread at 4 warps).
_CHUNK = 4096
# Sweeps without a new best error before the acceleration is off for good (got_reg.solvers.sinkhorn.PATIENCE).
PATIENCE = 50


def available() -> bool:
    """True if Triton imported (the kernels can then run on CUDA tensors, or on CPU ones when interpreted)."""
    return _HAVE_TRITON


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _launching(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device; DDP ranks usually set it, but a tensor
    on another GPU would be read out of bounds). Under the interpreter: numpy warnings off, since
    padding slices take log(0) = −∞ on purpose."""
    if INTERPRET:
        import numpy

        return numpy.errstate(divide="ignore")
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _device_ok(t: torch.Tensor) -> bool:
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def row_lse_supported(A: torch.Tensor) -> bool:
    """Whether :func:`row_lse` takes A: Triton present, CUDA, float32, 2-D (any size)."""
    return _HAVE_TRITON and not INTERPRET and A.is_cuda and A.dtype == torch.float32 and A.dim() == 2


def fused_max() -> int:
    """The largest n, m that the solvers send to :func:`sinkhorn_fused`: :data:`FUSED_MAX` (256), or the
    environment's ``GOT_REG_FUSED_MAX`` (an integer in [1, :data:`FUSED_LIMIT`]), read at every call. Raising
    it sends larger batches to the one-launch solve, with no host synchronisation and CUDA graphs possible,
    at a time per sweep that grows with B² (``benchmarks/bench_acceleration.py`` times both ways)."""
    raw = os.environ.get(FUSED_MAX_ENV, "").strip()
    if not raw:
        return FUSED_MAX
    value = int(raw) if raw.isdigit() else 0
    if not 1 <= value <= FUSED_LIMIT:
        raise ValueError(
            f"{FUSED_MAX_ENV} must be an integer in [1, {FUSED_LIMIT}] (the largest batch size that the solvers "
            f"send to the fused Sinkhorn kernel; unset: {FUSED_MAX}), got {raw!r}"
        )
    return value


def fused_takes(n: int, m: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the solvers send (n, m) problems of ``dtype`` on ``device`` to :func:`sinkhorn_fused`: Triton
    present and not interpreted, CUDA, float32, 0 < n, m ≤ :func:`fused_max` (256 unless the environment
    says otherwise). What a caller needs to know before the cost exists (the CUDA graphs of
    :mod:`got_reg.graphs` can capture only a solve that runs in the kernel)."""
    if not (_HAVE_TRITON and not INTERPRET and device.type == "cuda" and dtype == torch.float32):
        return False
    limit = fused_max()
    return 0 < n <= limit and 0 < m <= limit


def fused_supported(C: torch.Tensor) -> bool:
    """Whether the solvers send C to :func:`sinkhorn_fused`: :func:`fused_takes` its (n, m), as one problem or a
    (k, n, m) stack.

    False on CPU even under the interpreter (tests call the kernels directly), so that a solver that
    dispatches on this never routes CPU work through the interpreter.
    """
    return C.dim() in (2, 3) and C.numel() > 0 and fused_takes(C.shape[-2], C.shape[-1], C.dtype, C.device)


if _HAVE_TRITON:

    @triton.jit
    def _lse(x, AXIS: tl.constexpr):
        """log Σ exp(x) along AXIS; −∞ entries add 0, an all −∞ slice gives −∞ (padding)."""
        mx = tl.max(x, AXIS)
        # An all −∞ slice would give −∞ − (−∞) = NaN: shift it by 0 instead.
        ref = tl.where(mx == float("-inf"), 0.0, mx)
        s = tl.sum(tl.exp(x - tl.expand_dims(ref, AXIS)), AXIS)
        return ref + tl.log(s)

    @triton.jit
    def _exponent(c, w, scale):
        """w + scale · c, with −∞ where c = +∞ (masked or padding): exact zeros in any sign of scale."""
        return tl.where(c == float("inf"), float("-inf"), w + scale * c)

    @triton.jit
    def _expm1(x):
        """exp(x) − 1 without the cancellation near 0 (Taylor to x⁵ below |x| = 0.03: error < 4e-11)."""
        p = x * (1.0 + x * (0.5 + x * (0.16666666666666666 + x * (0.041666666666666664 + x * 0.008333333333333333))))
        return tl.where(tl.abs(x) < 0.03, p, tl.exp(x) - 1.0)

    @triton.jit(do_not_specialize=["n"])
    def _row_lse_kernel(A, W, OUT, n, m, stride, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n
        # int64 row offsets: n · m may pass 2³¹ on large batches.
        row_ptr = A + rows.to(tl.int64)[:, None] * stride
        run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        # A while loop, not `for c0 in range(0, m, BLOCK_N)`: the same code (Triton does not software-
        # pipeline these loads either way), and Triton 3.6's interpreter cannot take a runtime bound in
        # range() under numpy >= 2.4 (int() of a 1-element array; triton-lang/triton#9171).
        c0 = tl.full([], 0, tl.int32)
        while c0 < m:
            cols = c0 + tl.arange(0, BLOCK_N)
            cmask = cols < m
            a = tl.load(row_ptr + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=float("inf"))
            w = tl.load(W + cols, mask=cmask, other=0.0)
            x = _exponent(a, w[None, :], scale)
            new_max = tl.maximum(run_max, tl.max(x, 1))
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(x - ref[:, None]), 1)
            run_max = new_max
            c0 += BLOCK_N
        ref = tl.where(run_max == float("-inf"), 0.0, run_max)
        tl.store(OUT + rows, ref + tl.log(run_sum), mask=rmask)

    # ---------------------------------------------------------------- fused solve: one pass of each side

    @triton.jit
    def _row_pass(K, r, C, w, scale, SCR, BN: tl.constexpr, BM: tl.constexpr, H: tl.constexpr, RESIDENT: tl.constexpr):
        """(BN,) log Σ_j exp(scale · C_ij + w_j) of the padded (BN, BM) cost; padding rows give −∞.

        RESIDENT: from the tile K = s · C held in registers (−∞ where masked), as w + r · K with
        r = scale / s. Otherwise C is streamed from global memory (L1/L2) in chunks of H full rows, so
        that w stays in registers; the chunks' results go through the scratch vector, since a register
        tensor cannot be assembled piecewise. The barriers order those global writes and reads between
        the threads of the program, and against the column pass, which uses the same scratch.
        """
        if RESIDENT:
            out = _lse(w[None, :] + r * K, 1)
        else:
            cols = tl.arange(0, BM)
            tl.debug_barrier()
            for r0 in range(0, BN, H):
                rr = r0 + tl.arange(0, H)
                c = tl.load(C + rr[:, None] * BM + cols[None, :])
                tl.store(SCR + rr, _lse(_exponent(c, w[None, :], scale), 1))
            tl.debug_barrier()
            out = tl.load(SCR + tl.arange(0, BN))
        return out

    @triton.jit
    def _col_pass(K, r, C, w, scale, SCR, BN: tl.constexpr, BM: tl.constexpr, H: tl.constexpr, RESIDENT: tl.constexpr):
        """(BM,) log Σ_i exp(scale · C_ij + w_i); padding columns give −∞ (arguments as in _row_pass).

        Streamed: the same row chunks (coalesced reads, no transposed copy of C) with an online
        log-sum-exp per column across chunks; each chunk of w comes back from the scratch vector.
        """
        if RESIDENT:
            out = _lse(w[:, None] + r * K, 0)
        else:
            cols = tl.arange(0, BM)
            tl.debug_barrier()
            tl.store(SCR + tl.arange(0, BN), w)
            tl.debug_barrier()
            run_max = tl.full([BM], float("-inf"), tl.float32)
            run_sum = tl.zeros([BM], dtype=tl.float32)
            for r0 in range(0, BN, H):
                rr = r0 + tl.arange(0, H)
                c = tl.load(C + rr[:, None] * BM + cols[None, :])
                wc = tl.load(SCR + rr)
                x = _exponent(c, wc[:, None], scale)
                new_max = tl.maximum(run_max, tl.max(x, 0))
                ref = tl.where(new_max == float("-inf"), 0.0, new_max)
                run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(x - ref[None, :]), 0)
                run_max = new_max
            ref = tl.where(run_max == float("-inf"), 0.0, run_max)
            out = ref + tl.log(run_sum)
        return out

    @triton.jit
    def _cost_range(Ct, C, BN: tl.constexpr, BM: tl.constexpr, H: tl.constexpr, RESIDENT: tl.constexpr):
        """max − min of the finite entries of C."""
        if RESIDENT:
            hi = tl.max(tl.max(tl.where(Ct == float("inf"), float("-inf"), Ct), 1), 0)
            lo = tl.min(tl.min(Ct, 1), 0)
        else:
            cols = tl.arange(0, BM)
            hi_v = tl.full([BM], float("-inf"), tl.float32)
            lo_v = tl.full([BM], float("inf"), tl.float32)
            for r0 in range(0, BN, H):
                rr = r0 + tl.arange(0, H)
                c = tl.load(C + rr[:, None] * BM + cols[None, :])
                hi_v = tl.maximum(hi_v, tl.max(tl.where(c == float("inf"), float("-inf"), c), 0))
                lo_v = tl.minimum(lo_v, tl.min(c, 0))
            hi = tl.max(hi_v, 0)
            lo = tl.min(lo_v, 0)
        return hi - lo

    @triton.jit
    def _row_error(u, lse_row, log_b, rmask, n):
        """mean_i |a_i⁻¹ · row_i(P) − 1| = mean_i |expm1(u_i + lse_row_i + log b)| over the real rows."""
        return tl.sum(tl.where(rmask, tl.abs(_expm1(u + lse_row + log_b)), 0.0), 0) / n

    @triton.jit
    def _write_plan(
        K,
        C,
        U,
        u,
        v,
        lab,
        s,
        theta,
        n,
        m,
        P_OUT,
        STATS,
        BN: tl.constexpr,
        BM: tl.constexpr,
        H: tl.constexpr,
        RESIDENT: tl.constexpr,
    ):
        """The plan P_ij = exp(u_i + s·C_ij + v_j + log a + log b) into P_OUT (BN, BM; 0 on masked and padding
        entries), and STATS = (θ(mean u + mean v), max(‖P·1 − a‖₁, ‖Pᵀ·1 − b‖₁)): the value and the marginal
        error measured on the plan as written. ``lab`` = log a + log b. Streamed, u comes back from U."""
        rows = tl.arange(0, BN)
        cols = tl.arange(0, BM)
        if RESIDENT:
            P = tl.exp(K + (u + lab)[:, None] + v[None, :])
            tl.store(P_OUT + rows[:, None] * BM + cols[None, :], P)
            row_err = tl.sum(tl.where(rows < n, tl.abs(tl.sum(P, 1) - 1.0 / n), 0.0), 0)
            col_sum = tl.sum(P, 0)
        else:
            tl.debug_barrier()  # U was written by all threads of the program
            row_err = tl.full([], 0.0, tl.float32)
            col_sum = tl.zeros([BM], dtype=tl.float32)
            for r0 in range(0, BN, H):
                rr = r0 + tl.arange(0, H)
                c = tl.load(C + rr[:, None] * BM + cols[None, :])
                uu = tl.load(U + rr, mask=rr < n, other=0.0)
                P = tl.exp(_exponent(c, (uu + lab)[:, None] + v[None, :], s))
                tl.store(P_OUT + rr[:, None] * BM + cols[None, :], P)
                row_err += tl.sum(tl.where(rr < n, tl.abs(tl.sum(P, 1) - 1.0 / n), 0.0), 0)
                col_sum += tl.sum(P, 0)
        col_err = tl.sum(tl.where(cols < m, tl.abs(col_sum - 1.0 / m), 0.0), 0)
        value = theta * (tl.sum(tl.where(rows < n, u, 0.0), 0) / n + tl.sum(tl.where(cols < m, v, 0.0), 0) / m)
        tl.store(STATS, value)
        tl.store(STATS + 1, tl.maximum(row_err, col_err))

    @triton.jit
    def _spd_solve(G, b, M: tl.constexpr):
        """x with G x = b for a symmetric positive definite (M, M) G: Gaussian elimination without pivoting
        (the trailing block stays symmetric, so row p is also column p), then back substitution."""
        idx = tl.arange(0, M)
        ii = idx[:, None]
        for p in tl.static_range(M):
            row = tl.sum(tl.where(ii == p, G, 0.0), 0)
            piv = tl.sum(tl.where(idx == p, row, 0.0), 0)
            bp = tl.sum(tl.where(idx == p, b, 0.0), 0)
            f = tl.where(idx > p, row / piv, 0.0)
            G = G - f[:, None] * row[None, :]
            b = b - f * bp
        x = tl.zeros([M], dtype=tl.float32)
        for q in tl.static_range(M):
            p = M - 1 - q
            row = tl.sum(tl.where(ii == p, G, 0.0), 0)
            piv = tl.sum(tl.where(idx == p, row, 0.0), 0)
            bp = tl.sum(tl.where(idx == p, b, 0.0), 0)
            x = tl.where(idx == p, (bp - tl.sum(row * x, 0)) / piv, x)
        return x

    @triton.jit
    def _anderson_solve(GF, g, w, new, rn, rn_prev, fr, reg, MP: tl.constexpr):
        """The small system of an Anderson step (got_reg.solvers.sinkhorn._Anderson), shared by the fused solve
        and the torch loop's kernel: the Gram matrix GF of the (MP, ·) residual differences with the new slot's
        row and column g, the 0/1 slot weights w (the new slot on; all off when the residual norm rn grew past
        rn_prev), and γ solving (GF_w + diag(1 − w) + λ) γ = w ⊙ fr, fr = ΔF·r, λ = reg·tr(GF_w) + tiny,
        where GF_w = GF ⊙ wwᵀ; a non-finite γ counts as 0. Returns (GF, w, γ)."""
        slots = tl.arange(0, MP)
        GF = tl.where(new[:, None], g[None, :], tl.where(new[None, :], g[:, None], GF))
        w = tl.where(new, 1.0, w)
        w = tl.where(rn <= rn_prev, w, 0.0)  # restart when the residual grew
        G = GF * w[:, None] * w[None, :]
        eye = slots[:, None] == slots[None, :]
        tr = tl.sum(tl.sum(tl.where(eye, G, 0.0), 1), 0)
        # Unit diagonal on empty slots, the Tikhonov weight on valid ones: added apart, since 1 + λ rounds to 1.
        G = tl.where(eye, G + (1.0 - w)[:, None] + (tr * reg + 1.1754943508222875e-38), G)
        gamma = _spd_solve(G, fr * w, MP)
        gamma = tl.where(tl.abs(gamma) < float("inf"), gamma, 0.0)  # NaN fails the test too
        return GF, w, gamma

    @triton.jit
    def _anderson_step(u, r, k, DX, DF, GF, w, u_prev, r_prev, rn_prev, reg, MEMORY, MP: tl.constexpr):
        """got_reg.solvers.sinkhorn._Anderson.step on registers: the ring of MEMORY ≤ MP differences DX, DF
        (MP, BN), their Gram matrix GF (kept up to date one row and column at a time), the 0/1 slot
        weights w. Returns the next u and the updated state."""
        slots = tl.arange(0, MP)
        rn = tl.sum(r * r, 0)
        slot = (k - 1) % MEMORY
        new = (slots == slot) & (k > 0)
        DX = tl.where(new[:, None], (u - u_prev)[None, :], DX)
        DF = tl.where(new[:, None], (r - r_prev)[None, :], DF)
        g = tl.sum(DF * (r - r_prev)[None, :], 1)
        GF, w, gamma = _anderson_solve(GF, g, w, new, rn, rn_prev, tl.sum(DF * r[None, :], 1), reg, MP)
        u_next = u + r - tl.sum((DX + DF) * gamma[:, None], 0)
        return u_next, DX, DF, GF, w, u, r, rn

    @triton.jit(do_not_specialize=["n", "k"])
    def _anderson_kernel(X, R, OUT, DXF, DF, PREV, GF, W, RN, n, k, memory, reg, MP: tl.constexpr, BLOCK: tl.constexpr):
        # One program, two passes over vectors of any length n, chunks of BLOCK. State (see Anderson):
        # DXF, DF (memory, n) the ring of differences of x + r and of r; in two halves, read from half
        # (k + 1) % 2 and written to half k % 2: PREV (2, 2, n) the last (x + r, r), GF (2, MP, MP) the
        # Gram matrix of DF (one row and column replaced per step), W (2, MP) the slot weights, RN (2,)
        # the last ‖r‖². Pass 1 writes the new differences and accumulates what the small system needs;
        # pass 2 writes OUT = x + r − (ΔX + ΔF)ᵀγ − mean. Nothing a thread reads was written by this
        # launch (the new slot's row is rebuilt in registers, not read back), so no barrier is needed.
        slots = tl.arange(0, MP)
        live = slots < memory
        lane = tl.arange(0, BLOCK)
        has = k > 0
        # The previous iterate's entries, as an index bound (n after the first step, else 0): a vector
        # compare rather than `inside & has`, which Triton 3.9's interpreter refuses as a load/store mask.
        seen = tl.minimum(k, 1) * n
        slot = (k + memory - 1) % memory
        new = (slots == slot) & has
        half, last = k % 2, (k + 1) % 2
        cur = PREV + half * (2 * n)
        old = PREV + last * (2 * n)
        rn = tl.zeros([], dtype=tl.float32)
        total = tl.zeros([], dtype=tl.float32)
        g = tl.zeros([MP], dtype=tl.float32)  # the new Gram row, ΔF·Δf
        fr = tl.zeros([MP], dtype=tl.float32)  # ΔF·r
        sums = tl.zeros([MP], dtype=tl.float32)  # Σ_i (ΔX + ΔF)_mi, for the mean of the result
        # While loops over the chunks, as in _row_lse_kernel (the interpreter and runtime range() bounds).
        c = tl.full([], 0, tl.int32)
        while c < n:
            offs = c + lane
            inside = offs < n
            x = tl.load(X + offs, mask=inside, other=0.0)
            r = tl.load(R + offs, mask=inside, other=0.0)
            xr = x + r
            dxf = xr - tl.load(old + offs, mask=offs < seen, other=0.0)
            df = r - tl.load(old + n + offs, mask=offs < seen, other=0.0)
            tl.store(cur + offs, xr, mask=inside)
            tl.store(cur + n + offs, r, mask=inside)
            tl.store(DXF + slot * n + offs, dxf, mask=offs < seen)
            tl.store(DF + slot * n + offs, df, mask=offs < seen)
            tile = live[:, None] & inside[None, :]
            F = tl.load(DF + slots[:, None] * n + offs[None, :], mask=tile, other=0.0)
            F = tl.where(new[:, None], df[None, :], F)
            D = tl.load(DXF + slots[:, None] * n + offs[None, :], mask=tile, other=0.0)
            D = tl.where(new[:, None], dxf[None, :], D)
            rn += tl.sum(r * r, 0)
            total += tl.sum(xr, 0)
            g += tl.sum(F * df[None, :], 1)
            fr += tl.sum(F * r[None, :], 1)
            sums += tl.sum(D, 1)
            c += BLOCK
        sq = slots[:, None] * MP + slots[None, :]
        GFm, w, gamma = _anderson_solve(
            tl.load(GF + last * MP * MP + sq),
            g,
            tl.load(W + last * MP + slots),
            new,
            rn,
            tl.load(RN + last),
            fr,
            reg,
            MP,
        )
        tl.store(GF + half * MP * MP + sq, GFm)
        tl.store(W + half * MP + slots, w)
        tl.store(RN + half, rn)
        mean = (total - tl.sum(gamma * sums, 0)) / n
        c = tl.full([], 0, tl.int32)
        while c < n:
            offs = c + lane
            inside = offs < n
            xr = tl.load(X + offs, mask=inside, other=0.0) + tl.load(R + offs, mask=inside, other=0.0)
            dxf = xr - tl.load(old + offs, mask=offs < seen, other=0.0)
            D = tl.load(DXF + slots[:, None] * n + offs[None, :], mask=live[:, None] & inside[None, :], other=0.0)
            D = tl.where(new[:, None], dxf[None, :], D)
            tl.store(OUT + offs, xr - tl.sum(D * gamma[:, None], 0) - mean, mask=inside)
            c += BLOCK

    @triton.jit(do_not_specialize=["n", "m", "max_iter"])
    def _sinkhorn_kernel(
        C,
        n,
        m,
        WORK,
        IT,
        ERR,
        PLAN,
        STATS,
        theta,
        s,
        max_iter,
        tol,
        scaling,
        reg,
        memory,
        log_a,
        log_b,
        BN: tl.constexpr,
        BM: tl.constexpr,
        H: tl.constexpr,
        RESIDENT: tl.constexpr,
        MP: tl.constexpr,
        PATIENCE: tl.constexpr,
        WRITE_PLAN: tl.constexpr,
    ):
        # C is (batch, BN, BM), contiguous and +∞-padded by the caller: unmasked, vectorised loads, and one
        # compiled variant per padded shape whatever the real (n, m) and strides. One program per problem.
        # WORK holds, per program, u (BN), v (BM) and the scratch vector (BN), 16-byte aligned. With
        # WRITE_PLAN, PLAN (batch, BN, BM) receives the plans and STATS (batch, 2) their values and errors.
        p = tl.program_id(0)
        C += p * (BN * BM)
        U = WORK + p * (2 * BN + BM)
        V = U + BN
        SCR = V + BM
        IT += p
        ERR += p
        rows = tl.arange(0, BN)
        cols = tl.arange(0, BM)
        rmask = rows < n
        cmask = cols < m
        if RESIDENT:
            Ct = tl.load(C + rows[:, None] * BM + cols[None, :])
        else:
            Ct = 0.0  # unused: the passes stream C from global memory

        eps = _cost_range(Ct, C, BN, BM, H, RESIDENT)
        if RESIDENT:
            # The only tile kept live. Written with C itself, the compiler hoists C, its mask and s · C
            # out of the loops and holds all three (register spills at 128 × 128).
            K = tl.where(Ct == float("inf"), float("-inf"), s * Ct)
        else:
            K = 0.0

        # ε-scaling: one sweep per ε = D, D·scaling, … while ε > θ, on the potentials in cost units.
        g = tl.zeros([BM], dtype=tl.float32)
        it = tl.full([], 0, tl.int32)
        while (eps > theta) & (it < max_iter):
            sc = -1.0 / eps
            f = -eps * (_row_pass(K, theta / eps, C, g / eps, sc, SCR, BN, BM, H, RESIDENT) + log_b)
            f = tl.where(rmask, f, 0.0)
            g = -eps * (_col_pass(K, theta / eps, C, f / eps, sc, SCR, BN, BM, H, RESIDENT) + log_a)
            g = tl.where(cmask, g, 0.0)
            eps = eps * scaling
            it += 1

        # Scaled potentials u = f/θ, v = g/θ; padding entries are held at 0 so that they stay finite.
        v = g / theta
        u = tl.where(rmask, -_row_pass(K, 1.0, C, v, s, SCR, BN, BM, H, RESIDENT) - log_b, 0.0)
        u = tl.where(rmask, u - tl.sum(u, 0) / n, 0.0)
        if MP > 0:  # Anderson state: the difference ring, its Gram matrix, slot weights, the last iterate
            DX = tl.zeros([MP, BN], dtype=tl.float32)
            DF = tl.zeros([MP, BN], dtype=tl.float32)
            GF = tl.zeros([MP, MP], dtype=tl.float32)
            w = tl.zeros([MP], dtype=tl.float32)
            u_prev = tl.zeros([BN], dtype=tl.float32)
            r_prev = tl.zeros([BN], dtype=tl.float32)
            rn_prev = tl.full([], float("inf"), tl.float32)
        err = tl.full([], float("inf"), tl.float32)
        best = tl.full([], float("inf"), tl.float32)
        it_best = it
        accel = tl.full([], 1, tl.int32)
        done = tl.full([], 0, tl.int32)
        k = tl.full([], 0, tl.int32)
        n_sweeps = max_iter - it
        # A while loop with a flag rather than `break`: the scalars are reductions that all threads hold,
        # so all take the same path. The stopping test is made every sweep (it costs no host read here).
        while (k < n_sweeps) & (done == 0):
            v = tl.where(cmask, -_col_pass(K, 1.0, C, u, s, SCR, BN, BM, H, RESIDENT) - log_a, 0.0)
            it += 1
            lse_row = _row_pass(K, 1.0, C, v, s, SCR, BN, BM, H, RESIDENT)
            err = _row_error(u, lse_row, log_b, rmask, n)
            done = (err <= tol).to(tl.int32)
            improved = err < best
            best = tl.where(improved, err, best)
            it_best = tl.where(improved, it, it_best)
            accel = tl.where(it - it_best >= PATIENCE, 0, accel)  # stalled: plain Sinkhorn for good
            r = tl.where(rmask, -lse_row - log_b - u, 0.0)  # T(u) − u
            if MP > 0:
                u_next, DX, DF, GF, w, u_prev, r_prev, rn_prev = _anderson_step(
                    u, r, k, DX, DF, GF, w, u_prev, r_prev, rn_prev, reg, memory, MP
                )
                u_next = tl.where(accel == 1, u_next, u + r)
            else:
                u_next = u + r
            u_next = tl.where(rmask, u_next - tl.sum(u_next, 0) / n, 0.0)  # mean 0: the torch loop's gauge
            u = tl.where(done == 0, u_next, u)
            k += 1

        # Out of sweeps after a row update: make the columns exact and measure err for the returned (u, v).
        # One extra sweep's work, done unconditionally (selects).
        v_fix = tl.where(cmask, -_col_pass(K, 1.0, C, u, s, SCR, BN, BM, H, RESIDENT) - log_a, 0.0)
        v = tl.where(done == 0, v_fix, v)
        e = _row_error(u, _row_pass(K, 1.0, C, v, s, SCR, BN, BM, H, RESIDENT), log_b, rmask, n)
        err = tl.where(done == 0, e, err)

        tl.store(U + rows, u, mask=rmask)
        tl.store(V + cols, v, mask=cmask)
        tl.store(IT, it)
        tl.store(ERR, err)
        if WRITE_PLAN:
            _write_plan(
                K, C, U, u, v, log_a + log_b, s, theta, n, m, PLAN + p * (BN * BM), STATS + 2 * p, BN, BM, H, RESIDENT
            )


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _row_lse_config(n: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): tiles of about _CHUNK entries, at most 512 columns wide, and rows
    per program cut down until there are a few programs per SM (132 on an H100)."""
    block_n = min(512, max(16, _next_pow2(m)))
    block_m = max(1, min(_next_pow2(n), _CHUNK // block_n))
    while block_m > 1 and -(-n // block_m) < 264:
        block_m //= 2
    return block_m, block_n, 4


def row_lse(
    A: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    r"""out_i = log Σ_j exp(scale · A_ij + w_j) for float32 A (n, m), finite w (m,), in one streaming read of A.

    Entries A_ij = +∞ contribute exactly 0 whatever the sign of ``scale`` (masked pairs); every row needs
    a finite one (a row without gives −∞, unchecked: checking would synchronise). No n × m temporary is
    made. One half of a Sinkhorn sweep is ``row_lse(C, v, -1/θ)``; the other is ``row_lse(Cᵀ, u, -1/θ)``
    on a contiguous copy of Cᵀ made once per solve. ``block``: (rows, columns) of a tile, powers of two,
    instead of the default (tuning, tests).
    """
    if not _HAVE_TRITON:
        raise RuntimeError("row_lse needs triton (pip install triton)")
    _require(
        A.dim() == 2 and A.dtype == torch.float32, f"A must be a 2-D float32 tensor, got {tuple(A.shape)} {A.dtype}"
    )
    _require(A.stride(1) == 1, "A must have contiguous rows (A.stride(1) == 1)")
    n, m = A.shape
    _require(
        w.shape == (m,) and w.dtype == torch.float32 and w.device == A.device,
        f"w must be float32 of shape ({m},) on {A.device}",
    )
    _require(_device_ok(A), f"row_lse runs on CUDA tensors (CPU only with TRITON_INTERPRET=1), got {A.device}")
    w = w.contiguous()
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=A.device)
    else:
        _require(
            out.shape == (n,) and out.dtype == torch.float32 and out.is_contiguous() and out.device == A.device,
            f"out must be a contiguous float32 ({n},) tensor on {A.device}",
        )
    if n == 0:
        return out
    _require(m > 0, "A needs at least one column")
    block_m, block_n, warps = _row_lse_config(n, m)
    if block is not None:
        block_m, block_n = block
        _require(
            block_m == _next_pow2(block_m) and block_n == _next_pow2(block_n), f"block must be powers of 2, got {block}"
        )
    with _launching(A):
        _row_lse_kernel[(triton.cdiv(n, block_m),)](
            A, w, out, n, m, A.stride(0), float(scale), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps
        )
    return out


def anderson_supported(x: torch.Tensor) -> bool:
    """Whether :class:`Anderson` takes the iterate x: Triton present and not interpreted, CUDA, float32, 1-D."""
    return _HAVE_TRITON and not INTERPRET and x.is_cuda and x.dtype == torch.float32 and x.dim() == 1


def anderson_config(n: int, memory: int) -> tuple[int, int]:
    """(MP, BLOCK) of :class:`Anderson`'s kernel: slots padded to a power of two, and chunks such that a
    (MP, BLOCK) tile of each ring is about 32 entries per thread at 4 warps."""
    mp = _next_pow2(memory)
    return mp, max(16, min(_next_pow2(n), 4096 // mp))


class Anderson:
    r"""got_reg.solvers.sinkhorn._Anderson with each step one launch of one program, for the torch loop's
    iterates of any length (B > 256, beyond :func:`sinkhorn_fused`); the same state and arithmetic:

        x_{k+1} = x_k + r_k − (ΔX + ΔF)ᵀγ − mean,   γ = argmin ‖r_k − ΔFᵀγ‖² + λ‖γ‖²,  λ = ``reg``·tr(ΔF ΔFᵀ),

    the history dropped when ‖r‖ grows, empty slots held at γ = 0, the result shifted to mean 0. In eager
    torch that step is about 20 operators, each a kernel launch that costs more than its arithmetic at
    these sizes; here it is one (the Gram matrix is also kept up to date one row at a time). Nothing is
    read back to the host.
    """

    def __init__(self, x: torch.Tensor, memory: int, reg: float) -> None:
        if not _HAVE_TRITON:
            raise RuntimeError("Anderson needs triton (pip install triton)")
        _require(
            x.dim() == 1 and x.dtype == torch.float32 and x.numel() > 0,
            f"x must be a non-empty 1-D float32 tensor, got {tuple(x.shape)} {x.dtype}",
        )
        _require(_device_ok(x), f"Anderson runs on CUDA tensors (CPU only with TRITON_INTERPRET=1), got {x.device}")
        _require(isinstance(memory, int) and 1 <= memory <= 16, f"memory must be an int in [1, 16], got {memory!r}")
        n = x.numel()
        self.mp, self.block = anderson_config(n, memory)
        self.memory, self.reg, self.k = memory, float(reg), 0
        self.dxf = x.new_zeros(memory, n)
        self.df = x.new_zeros(memory, n)
        self.prev = x.new_zeros(2, 2, n)
        # Two halves of each small state too: a launch reads one and writes the other (see the kernel).
        self.gram = x.new_zeros(2, self.mp, self.mp)
        self.w = x.new_zeros(2, self.mp)
        self.rn = x.new_full((2,), math.inf)

    @property
    def weights(self) -> torch.Tensor:
        """The 0/1 weights of the slots after the last step (1: a difference the next step uses)."""
        return self.w[(self.k + 1) % 2]

    def step(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The next iterate from x and its residual r = T(x) − x (both (n,), contiguous), shifted to mean 0."""
        n = self.dxf.shape[1]
        _require(
            x.shape == r.shape == (n,)
            and x.dtype == r.dtype == torch.float32
            and x.is_contiguous()
            and r.is_contiguous(),
            f"x and r must be contiguous float32 ({n},) tensors, got {tuple(x.shape)} and {tuple(r.shape)}",
        )
        out = torch.empty_like(x)
        with _launching(x):
            _anderson_kernel[(1,)](
                x,
                r,
                out,
                self.dxf,
                self.df,
                self.prev,
                self.gram,
                self.w,
                self.rn,
                n,
                self.k,
                self.memory,
                self.reg,
                MP=self.mp,
                BLOCK=self.block,
                num_warps=4,
            )
        self.k += 1
        return out


def fused_config(n: int, m: int) -> dict:
    """Tile sizes and warps of :func:`sinkhorn_fused` for an (n, m) cost (also used by the AOT tests)."""
    bn, bm = max(16, _next_pow2(n)), max(16, _next_pow2(m))
    resident = bn * bm <= _RESIDENT_MAX
    h = max(1, min(bn, _CHUNK // bm))
    # Resident: 32 tile entries per thread (128 × 128 at 16 warps compiles to 128 registers, no spills;
    # at 8 warps to 233). Streamed: 16 entries of a 4096-entry chunk per thread.
    warps = min(16, max(4, bn * bm // 1024)) if resident else 8
    return dict(BN=bn, BM=bm, H=h, RESIDENT=resident, num_warps=warps)


def sinkhorn_fused(
    C: torch.Tensor,
    theta: float,
    *,
    max_iter: int,
    tol: float,
    scaling: float = 0.7,
    anderson: int = 8,
    reg: float = 1e-4,
    num_warps: int | None = None,
    with_plan: bool = False,
) -> tuple[torch.Tensor, ...]:
    r"""The whole entropic Sinkhorn solve between uniform weights, in one kernel launch, for n, m ≤ 1024.

    C is (n, m), or (k, n, m) for k independent problems solved by k programs of the same launch (the three
    problems of the Sinkhorn divergence); the outputs then carry the leading k.

    With a = 1/n, b = 1/m, s = −1/θ and C_ij = +∞ on masked pairs:

    1. ε-scaling from ε = D (the spread of the finite costs) while ε > θ, ε ← ε·``scaling``, one sweep per ε
       on the potentials in cost units: f_i = −ε(LSE_j((g_j − C_ij)/ε) + log b), then
       g_j = −ε(LSE_i((f_i − C_ij)/ε) + log a).
    2. v = g/θ, u = −LSE_j(v_j + s C_ij) − log b, then sweeps: v_j ← −LSE_i(u_i + s C_ij) − log a (the
       plan's columns then sum to b), its row error err = mean_i |exp(u_i + LSE_j(v_j + s C_ij) + log b) − 1|
       (relative to a_i) as the stopping test, err ≤ ``tol``, every sweep; then u moves by the row map
       T(u)_i = −LSE_j(v_j + s C_ij) − log b, Anderson-accelerated with ``anderson`` past differences and
       Tikhonov weight ``reg`` (got_reg.solvers.sinkhorn._Anderson and its float32 weight; 0: plain u ← T(u)),
       and shifted to mean(u) = 0 (the same plans; it keeps |u| where float32 resolves the error); after
       PATIENCE sweeps without a new best error the acceleration is off for good. If ``max_iter``
       ends first, the columns are made exact for the last u and err re-measured; err always describes
       the returned (u, v).

    Returns (u, v, iterations, err): the scaled potentials f/θ (n,) and g/θ (m,), the sweep count
    (int32, 0-d) and err (float32, 0-d), each with the leading k if C has it, all on C's device and none
    read back here (no host synchronisation). The plan is P_ij = exp(u_i + s C_ij + v_j + log a + log b)
    and the dual value θ(mean u + mean v). Every row and column of C needs a finite entry (not checked
    here).

    ``with_plan=True`` also returns (plan, value, marginal_error), computed by the same launch after the
    solve: the plan (n, m), the dual value and max(‖P·1 − a‖₁, ‖Pᵀ·1 − b‖₁) measured on the plan as
    written (each with the leading k if C has it), instead of a dozen small kernels afterwards.

    Why one launch: at B = 128 a solve is a few microseconds of arithmetic, and eager torch spends its time
    on the launches and host synchronisations of its sweeps (issue 12; the timings are in
    ``benchmarks/results/``). The kernel holds tiles up to 128 × 128 in registers for the
    whole solve, and streams larger ones from L1/L2 (256 × 256 fp32 does not fit an SM's registers or
    shared memory). The solvers use it up to :func:`fused_max` (:func:`fused_takes`); it takes up to
    :data:`FUSED_LIMIT`, so that benchmarks can time it against the torch loop there.
    """
    if not _HAVE_TRITON:
        raise RuntimeError("sinkhorn_fused needs triton (pip install triton)")
    _require(
        C.dim() in (2, 3) and C.dtype == torch.float32,
        f"C must be a float32 tensor (n, m) or (k, n, m), got {tuple(C.shape)} {C.dtype}",
    )
    batched = C.dim() == 3
    C3 = C if batched else C[None]
    k, n, m = C3.shape
    _require(k >= 1, "C must hold at least one problem (k >= 1)")
    _require(
        1 <= n <= FUSED_LIMIT and 1 <= m <= FUSED_LIMIT,
        f"sinkhorn_fused takes n, m in [1, {FUSED_LIMIT}], got {n}, {m}",
    )
    _require(_device_ok(C), f"sinkhorn_fused runs on CUDA tensors (CPU only with TRITON_INTERPRET=1), got {C.device}")
    _require(theta > 0 and math.isfinite(theta), f"theta must be positive and finite, got {theta}")
    _require(isinstance(anderson, int) and 0 <= anderson <= 16, f"anderson must be an int in [0, 16], got {anderson!r}")
    _require(0.0 < scaling < 1.0, f"scaling must be in (0, 1), got {scaling}")
    cfg = fused_config(n, m)
    bn, bm = cfg["BN"], cfg["BM"]
    if (n, m) != (bn, bm) or not C3.is_contiguous() or C3.data_ptr() % 16:
        C3 = torch.nn.functional.pad(C3, (0, bm - m, 0, bn - n), value=math.inf).contiguous()
    # One allocation: u, v (outputs, 16-byte aligned views) and the scratch vectors of streamed passes.
    work = torch.empty(k, 2 * bn + bm, dtype=torch.float32, device=C.device)
    iters = torch.empty(k, dtype=torch.int32, device=C.device)
    err = torch.empty(k, dtype=torch.float32, device=C.device)
    # Without with_plan the two pointers are never touched: any float32 buffer will do.
    plan = torch.empty(k, bn, bm, dtype=torch.float32, device=C.device) if with_plan else work
    stats = torch.empty(k, 2, dtype=torch.float32, device=C.device) if with_plan else work
    with _launching(C3):
        _sinkhorn_kernel[(k,)](
            C3,
            n,
            m,
            work,
            iters,
            err,
            plan,
            stats,
            float(theta),
            -1.0 / float(theta),
            int(max_iter),
            float(tol),
            float(scaling),
            float(reg),
            int(anderson),
            -math.log(n),
            -math.log(m),
            BN=bn,
            BM=bm,
            H=cfg["H"],
            RESIDENT=cfg["RESIDENT"],
            MP=_next_pow2(anderson) if anderson else 0,
            PATIENCE=PATIENCE,
            WRITE_PLAN=with_plan,
            num_warps=num_warps or cfg["num_warps"],
        )
    out: tuple[torch.Tensor, ...] = (work[:, :n], work[:, bn : bn + m], iters, err)
    if with_plan:
        out += (plan[:, :n, :m], stats[:, 0], stats[:, 1])
    return out if batched else tuple(t[0] for t in out)
