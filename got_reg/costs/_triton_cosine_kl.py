# mypy: disable-error-code="no-untyped-def"
r"""Optional Triton kernels for the fused cost λ · cosine + KL (:mod:`got_reg.costs._cosine_kl`), CUDA float32.

Bui et al., "Improving robustness with optimal transport based adversarial generalization", eq. 5 with
d_x = cosine and d_y = KL. With ẑ_i = z_i / |z_i| (0 when |z_i| ≤ eps), ℓ_i = log_softmax(logits_i),
p_i = exp(ℓ_i), and the same on the adversarial side (ẑ', ℓ', q):

    C = clamp_min(r 1ᵀ − [ẑ, p] · [λ ẑ', ℓ']ᵀ, 0),   r_i = λ + p_i·ℓ_i.

At GOT's batch sizes the cost is launch-bound on a GPU: eager torch spends about 18 kernel launches on the
forward and 20 on the backward for little arithmetic. Here:

* forward: :func:`prep` (one launch) writes the factors left = [ẑ, p] and right = [λẑ', ℓ'], r and
  1/|z|; then ``torch.addmm`` and its clamp (:func:`forward`);
* backward: R = G·right and S = Gᵀ·left (the two matrix products, only those the requested gradients
  need), then :func:`post` (one launch) writes every requested input gradient from them, G's row sums
  g = G·1 included (:func:`backward`).

:func:`prep` runs one program per row; for the cross cost one launch covers both sides (programs
0..B−1 the clean rows, B..B+B'−1 the adversarial ones), for the self-cost the same rows give both
factors. Each program streams its row of z in chunks of BLOCK_D (two passes: the norm, then ẑ) and
its logits in chunks of BLOCK_M (an online max-subtracted log-sum-exp, then ℓ and p), so D and M may
be anything. :func:`post` is laid out the same way; its formulas are those of
:class:`~got_reg.costs._cosine_kl.CosineKL`'s backward, operation for operation:

    ∂L/∂z_i  = −(R_z,i − ẑ_i (ẑ_i·R_z,i)) / |z_i|,       ∂L/∂z'_j = −λ (S_z,j − ẑ'_j (ẑ'_j·S_z,j)) / |z'_j|,
    ∂L/∂logits_i  = p_i ⊙ (v_i − p_i·v_i),  v_i = g_i ℓ_i − R_ℓ,i,   ∂L/∂logits'_j = −(S_ℓ,j − q_j Σ_k S_ℓ,jk),

and for the self-cost ∂L/∂z from R_z + λ S_z, ∂L/∂logits = (v − p·v + Σ_k S_ℓ,k) ⊙ p − S_ℓ.
Zero rows (1/|z| = 0) get exactly zero feature gradient.

Arithmetic is float32; the square root and the reciprocal of the norm are IEEE-rounded (sqrt_rn, div_rn),
exp and log are Triton's fast ones (ex2/lg2.approx, a few ulp). tests/costs/test_triton_cosine_kl.py holds
the kernels, through Triton's interpreter, to float64 torch expressions and to the torch path of the node.

The import of ``triton`` is optional (this module imports without it; :func:`cost_supported` is then
False). Kernels run on CPU tensors only when ``TRITON_INTERPRET=1`` was set when this module and
:mod:`got_reg.solvers._triton` were imported (tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..solvers._triton import INTERPRET, _device_ok, _launching, _next_pow2, available

try:  # optional dependency
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # ImportError, or a broken install: the torch path still works
    triton = None
    tl = None
    _HAVE_TRITON = False

# The most entries of a row a program holds at once (8 per thread at 4 warps).
_CHUNK = 1024
_WARPS = 4


def cost_supported(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels take these tensors (None entries are skipped): Triton present, all float32, 2-D,
    non-empty, on a device type the node sends to the kernels (``_cosine_kl._KERNEL_DEVICES``: CUDA) and
    for which they were built (CUDA compiled; CPU only under the interpreter).

    So CPU tensors are refused even under the interpreter (tests call the kernels directly), unless a test
    or a launch count adds "cpu" to the node's device types: the cost never routes CPU work through the
    interpreter by itself.
    """
    from ._cosine_kl import _KERNEL_DEVICES

    ts = [t for t in tensors if t is not None]
    return (
        _HAVE_TRITON
        and available()
        and len(ts) > 0
        and all(
            t.device.type in _KERNEL_DEVICES
            and ((t.is_cuda and not INTERPRET) or (t.device.type == "cpu" and INTERPRET))
            and t.dtype == torch.float32
            and t.dim() == 2
            and t.numel() > 0
            for t in ts
        )
    )


def forward_supported(
    z: torch.Tensor, logits: torch.Tensor, z_adv: torch.Tensor | None, logits_adv: torch.Tensor | None
) -> bool:
    """:func:`cost_supported` for the node's inputs, with consistent shapes and one device (anything else
    takes the torch path, whose errors then describe it)."""
    if not cost_supported(z, logits, z_adv, logits_adv) or logits.device != z.device:
        return False
    if z.shape[0] != logits.shape[0] or (z_adv is None) != (logits_adv is None):
        return False
    if z_adv is None or logits_adv is None:
        return True
    return (
        z_adv.device == logits_adv.device == z.device
        and z_adv.shape[1] == z.shape[1]
        and logits_adv.shape == (z_adv.shape[0], logits.shape[1])
    )


def enabled() -> bool:
    """Whether Triton is on for the process (:func:`got_reg.solvers.lse.triton_module`: installed, not turned
    off by ``GOT_REG_DISABLE_TRITON=1``, no kernel failed earlier)."""
    from ..solvers import lse

    return lse.triton_module() is not None


def cost_config(D: int, M: int, n_cols: int = 1) -> dict[str, int]:
    """Chunk widths (powers of two, at most _CHUNK) of a row of z (D), of logits (M), and of G's row in
    :func:`post` (``n_cols`` = B'), and num_warps."""

    def width(n: int) -> int:
        return max(16, min(_CHUNK, _next_pow2(n)))

    return dict(BLOCK_D=width(D), BLOCK_M=width(M), BLOCK_G=width(n_cols), num_warps=_WARPS)


if _HAVE_TRITON:

    @triton.jit
    def _unit_pass(
        Z, D, eps, lam, UNIT, LAM_UNIT, BLOCK_D: tl.constexpr, STORE_UNIT: tl.constexpr, STORE_LAM_UNIT: tl.constexpr
    ):
        """1/|z| (0 when |z| ≤ eps) of the row at Z; ẑ = z/|z| into UNIT (if STORE_UNIT), λẑ into LAM_UNIT (if
        STORE_LAM_UNIT)."""
        offs = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        # While loops, not range() with a runtime bound: Triton 3.6's interpreter cannot take one under
        # numpy >= 2.4 (see got_reg.solvers._triton).
        c0 = tl.full([], 0, tl.int32)
        while c0 < D:
            x = tl.load(Z + c0 + offs, mask=c0 + offs < D, other=0.0)
            acc += x * x
            c0 += BLOCK_D
        norm = tl.sqrt_rn(tl.sum(acc, 0))
        # unit_rows: the norm of a zero row is replaced by +∞ before the reciprocal, never 1/0.
        inv = tl.div_rn(1.0, tl.where(norm > eps, norm, float("inf")))
        c0 = tl.full([], 0, tl.int32)
        while c0 < D:
            mask = c0 + offs < D
            u = tl.load(Z + c0 + offs, mask=mask, other=0.0) * inv
            if STORE_UNIT:
                tl.store(UNIT + c0 + offs, u, mask=mask)
            if STORE_LAM_UNIT:
                tl.store(LAM_UNIT + c0 + offs, u * lam, mask=mask)
            c0 += BLOCK_D
        return inv

    @triton.jit
    def _log_softmax_pass(LG, M, P, LOGP, BLOCK_M: tl.constexpr, STORE_P: tl.constexpr):
        """ℓ = log_softmax of the row at LG into LOGP, p = exp(ℓ) into P (if STORE_P); returns Σ p ℓ.

        The log-sum-exp is online over chunks (running max mx and Σ exp(x − mx)), then ℓ = (x − mx) − log Σ,
        torch's order of operations."""
        offs = tl.arange(0, BLOCK_M)
        run_max = tl.full([], float("-inf"), tl.float32)
        run_sum = tl.full([], 0.0, tl.float32)
        c0 = tl.full([], 0, tl.int32)
        while c0 < M:
            x = tl.load(LG + c0 + offs, mask=c0 + offs < M, other=float("-inf"))
            new_max = tl.maximum(run_max, tl.max(x, 0))
            # A chunk of −∞ logits only would give −∞ − (−∞) = NaN: shift it by 0 instead.
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(x - ref), 0)
            run_max = new_max
            c0 += BLOCK_M
        log_sum = tl.log(run_sum)
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        c0 = tl.full([], 0, tl.int32)
        while c0 < M:
            mask = c0 + offs < M
            x = tl.load(LG + c0 + offs, mask=mask, other=0.0)
            lp = (x - run_max) - log_sum
            p = tl.exp(lp)
            tl.store(LOGP + c0 + offs, lp, mask=mask)
            if STORE_P:
                tl.store(P + c0 + offs, p, mask=mask)
            acc += tl.where(mask, p * lp, 0.0)
            c0 += BLOCK_M
        return tl.sum(acc, 0)

    @triton.jit(do_not_specialize=["B"])
    def _prep_kernel(
        Z,
        LG,
        ZA,
        LGA,
        LEFT,
        RIGHT,
        LOGP,
        UNIT_ADV,
        ROW,
        INV,
        INV_ADV,
        B,
        D,
        M,
        s_z,
        s_lg,
        s_za,
        s_lga,
        s_left,
        s_right,
        s_logp,
        s_ua,
        lam,
        eps,
        SAME: tl.constexpr,
        STORE_UNIT_ADV: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """Program i < B: clean row i → LEFT_i = [ẑ_i, p_i], ROW_i = λ + p_i·ℓ_i, INV_i, and ℓ_i into
        LOGP (SAME: RIGHT_i = [λẑ_i, ℓ_i], LOGP unused). Program B + j (not SAME): adversarial row j →
        RIGHT_j = [λẑ'_j, ℓ'_j], INV_ADV_j, and ẑ'_j into UNIT_ADV if STORE_UNIT_ADV."""
        pid = tl.program_id(0)
        if pid < B:
            i = pid.to(tl.int64)
            left = LEFT + i * s_left
            right = RIGHT + i * s_right
            if SAME:
                inv = _unit_pass(Z + i * s_z, D, eps, lam, left, right, BLOCK_D, True, True)
                plp = _log_softmax_pass(LG + i * s_lg, M, left + D, right + D, BLOCK_M, True)
            else:
                inv = _unit_pass(Z + i * s_z, D, eps, lam, left, left, BLOCK_D, True, False)
                plp = _log_softmax_pass(LG + i * s_lg, M, left + D, LOGP + i * s_logp, BLOCK_M, True)
            tl.store(INV + i, inv)
            tl.store(ROW + i, plp + lam)
        else:
            if not SAME:
                j = (pid - B).to(tl.int64)
                right = RIGHT + j * s_right
                inv_a = _unit_pass(
                    ZA + j * s_za, D, eps, lam, UNIT_ADV + j * s_ua, right, BLOCK_D, STORE_UNIT_ADV, True
                )
                _log_softmax_pass(LGA + j * s_lga, M, right, right + D, BLOCK_M, False)
                tl.store(INV_ADV + j, inv_a)

    @triton.jit
    def _unit_grad(GU, GU2, lam2, UNIT, inv, scale, OUT, D, BLOCK_D: tl.constexpr, TWO: tl.constexpr):
        """OUT = (u − ẑ (ẑ·u)) · (−scale · inv) with u = GU (+ lam2 · GU2 if TWO): ∂L/∂z from ∂L/∂ẑ = −scale · u."""
        offs = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        c0 = tl.full([], 0, tl.int32)
        while c0 < D:
            mask = c0 + offs < D
            u = tl.load(GU + c0 + offs, mask=mask, other=0.0)
            if TWO:
                u += lam2 * tl.load(GU2 + c0 + offs, mask=mask, other=0.0)
            acc += tl.load(UNIT + c0 + offs, mask=mask, other=0.0) * u
            c0 += BLOCK_D
        along = tl.sum(acc, 0)
        factor = inv * -scale
        c0 = tl.full([], 0, tl.int32)
        while c0 < D:
            mask = c0 + offs < D
            u = tl.load(GU + c0 + offs, mask=mask, other=0.0)
            if TWO:
                u += lam2 * tl.load(GU2 + c0 + offs, mask=mask, other=0.0)
            e = tl.load(UNIT + c0 + offs, mask=mask, other=0.0)
            tl.store(OUT + c0 + offs, (u - e * along) * factor, mask=mask)
            c0 += BLOCK_D

    @triton.jit
    def _row_sum(X, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        c0 = tl.full([], 0, tl.int32)
        while c0 < n:
            acc += tl.load(X + c0 + offs, mask=c0 + offs < n, other=0.0)
            c0 += BLOCK
        return tl.sum(acc, 0)

    @triton.jit(do_not_specialize=["n_clean", "Bp"])
    def _post_kernel(
        G,
        R,
        S,
        LEFT,
        LOGP,
        INV,
        UNIT_ADV,
        INV_ADV,
        LOGQ,
        GZ,
        GL,
        GZA,
        GLA,
        n_clean,
        Bp,
        D,
        M,
        s_g0,
        s_g1,
        s_r,
        s_s,
        s_left,
        s_logp,
        s_ua,
        s_logq,
        s_gz,
        s_gl,
        s_gza,
        s_gla,
        lam,
        SAME: tl.constexpr,
        NEED_Z: tl.constexpr,
        NEED_L: tl.constexpr,
        NEED_ZA: tl.constexpr,
        NEED_LA: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """Program i < n_clean: the clean row i's gradients (GZ_i, GL_i; SAME: both sides' summed); program
        n_clean + j: the adversarial row j's (GZA_j, GLA_j). R = G·right, S = Gᵀ·left (rows of D + M)."""
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK_M)
        if pid < n_clean:
            i = pid.to(tl.int64)
            left = LEFT + i * s_left
            r_row = R + i * s_r
            s_row = S + i * s_s
            if NEED_Z:
                _unit_grad(r_row, s_row, lam, left, tl.load(INV + i), 1.0, GZ + i * s_gz, D, BLOCK_D, SAME)
            if NEED_L:
                # g_i = Σ_j G_ij, read along G's row with its strides (G may be a broadcast or a transpose).
                g_offs = tl.arange(0, BLOCK_G)
                g_acc = tl.zeros([BLOCK_G], dtype=tl.float32)
                c0 = tl.full([], 0, tl.int32)
                while c0 < Bp:
                    cols = c0 + g_offs
                    g_acc += tl.load(G + i * s_g0 + cols.to(tl.int64) * s_g1, mask=cols < Bp, other=0.0)
                    c0 += BLOCK_G
                g = tl.sum(g_acc, 0)
                p_row = left + D
                lp_row = LOGP + i * s_logp
                rl_row = r_row + D
                sl_row = s_row + D
                pv_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
                c0 = tl.full([], 0, tl.int32)
                while c0 < M:
                    mask = c0 + offs < M
                    v = tl.load(lp_row + c0 + offs, mask=mask, other=0.0) * g - tl.load(
                        rl_row + c0 + offs, mask=mask, other=0.0
                    )
                    pv_acc += tl.load(p_row + c0 + offs, mask=mask, other=0.0) * v
                    c0 += BLOCK_M
                pv = tl.sum(pv_acc, 0)
                if SAME:
                    shift = _row_sum(sl_row, M, BLOCK_M)
                c0 = tl.full([], 0, tl.int32)
                while c0 < M:
                    mask = c0 + offs < M
                    v = tl.load(lp_row + c0 + offs, mask=mask, other=0.0) * g - tl.load(
                        rl_row + c0 + offs, mask=mask, other=0.0
                    )
                    p = tl.load(p_row + c0 + offs, mask=mask, other=0.0)
                    if SAME:
                        out = (v - pv + shift) * p - tl.load(sl_row + c0 + offs, mask=mask, other=0.0)
                    else:
                        out = (v - pv) * p
                    tl.store(GL + i * s_gl + c0 + offs, out, mask=mask)
                    c0 += BLOCK_M
        else:
            if not SAME:
                j = (pid - n_clean).to(tl.int64)
                s_row = S + j * s_s
                if NEED_ZA:
                    inv_a = tl.load(INV_ADV + j)
                    _unit_grad(s_row, s_row, 0.0, UNIT_ADV + j * s_ua, inv_a, lam, GZA + j * s_gza, D, BLOCK_D, False)
                if NEED_LA:
                    sl_row = s_row + D
                    total = _row_sum(sl_row, M, BLOCK_M)
                    lq_row = LOGQ + j * s_logq
                    c0 = tl.full([], 0, tl.int32)
                    while c0 < M:
                        mask = c0 + offs < M
                        sl = tl.load(sl_row + c0 + offs, mask=mask, other=0.0)
                        q = tl.exp(tl.load(lq_row + c0 + offs, mask=mask, other=0.0))
                        tl.store(GLA + j * s_gla + c0 + offs, -(sl - q * total), mask=mask)
                        c0 += BLOCK_M


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_matrix(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    _require(
        t.dim() == 2 and tuple(t.shape) == shape and t.dtype == torch.float32 and t.device == device,
        f"{name} must be float32 of shape {shape} on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}",
    )


def _check_vector(name: str, t: torch.Tensor, n: int, device: torch.device) -> None:
    _require(
        t.dim() == 1 and t.shape[0] == n and t.dtype == torch.float32 and t.device == device and t.stride(0) == 1,
        f"{name} must be contiguous float32 of shape ({n},) on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}",
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (the kernels take any row stride)."""
    return t if t.stride(1) == 1 else t.contiguous()


def _blocks(D: int, M: int, n_cols: int, block: tuple[int, int] | None) -> dict[str, int]:
    cfg = cost_config(D, M, n_cols)
    if block is not None:
        bd, bm = block
        _require(bd == _next_pow2(bd) and bm == _next_pow2(bm), f"block must be powers of 2, got {block}")
        cfg.update(BLOCK_D=bd, BLOCK_M=bm, BLOCK_G=bm)
    return cfg


class Prepared(NamedTuple):
    """What :func:`prep` writes. left = [ẑ, p] (B, D + M); right = [λẑ', ℓ'] (B', D + M; the self-cost:
    [λẑ, ℓ] of the same rows); row = λ + p·ℓ (B,); log_p = ℓ (B, M; the self-cost: a view of right);
    inv = 1/|z| (B,). Cross cost only (else None): unit_adv = ẑ' (B', D; None unless asked for),
    inv_adv (B',), log_q = ℓ' (a view of right)."""

    left: torch.Tensor
    right: torch.Tensor
    row: torch.Tensor
    log_p: torch.Tensor
    inv: torch.Tensor
    unit_adv: torch.Tensor | None
    inv_adv: torch.Tensor | None
    log_q: torch.Tensor | None


def prep(
    z: torch.Tensor,
    logits: torch.Tensor,
    z_adv: torch.Tensor | None,
    logits_adv: torch.Tensor | None,
    lam: float,
    eps: float,
    *,
    keep_unit_adv: bool = True,
    block: tuple[int, int] | None = None,
) -> Prepared:
    r"""The factors of the cost in one launch (see :class:`Prepared`); ``z_adv = logits_adv = None`` for the
    self-cost. ``keep_unit_adv``: also write ẑ' (the gradient for z_adv needs it). ``block``: chunk widths
    (BLOCK_D, BLOCK_M), powers of two, instead of the default (tests)."""
    if not _HAVE_TRITON:
        raise RuntimeError("prep needs triton (pip install triton)")
    same = z_adv is None
    _require((z_adv is None) == (logits_adv is None), "z_adv and logits_adv must both be given or both be None")
    _require(
        z.dim() == 2 and z.dtype == torch.float32 and z.numel() > 0,
        f"z must be a non-empty 2-D float32 tensor, got {tuple(z.shape)} {z.dtype}",
    )
    _require(_device_ok(z), f"prep runs on CUDA tensors (CPU only with TRITON_INTERPRET=1), got {z.device}")
    B, D = z.shape
    _require(
        logits.dim() == 2 and logits.shape[0] == B and logits.shape[1] > 0,
        f"logits must be 2-D of shape ({B}, M) with M >= 1, got {tuple(logits.shape)}",
    )
    M = logits.shape[1]
    _check_matrix("logits", logits, (B, M), z.device)
    Bp = B
    if not same:
        assert z_adv is not None and logits_adv is not None
        _require(
            z_adv.dim() == 2 and z_adv.shape[1] == D and z_adv.shape[0] > 0,
            f"z_adv must be 2-D of shape (B', {D}) with B' >= 1, got {tuple(z_adv.shape)}",
        )
        Bp = z_adv.shape[0]
        _check_matrix("z_adv", z_adv, (Bp, D), z.device)
        _check_matrix("logits_adv", logits_adv, (Bp, M), z.device)
    cfg = _blocks(D, M, Bp, block)
    z, logits = _rows(z), _rows(logits)
    dev, f32 = z.device, torch.float32
    left = torch.empty(B, D + M, dtype=f32, device=dev)
    right = torch.empty(Bp, D + M, dtype=f32, device=dev)
    # One allocation for the (B,) and (B',) vectors.
    vecs = torch.empty(2 * B + (0 if same else Bp), dtype=f32, device=dev)
    row, inv = vecs[:B], vecs[B : 2 * B]
    if same:
        log_p, unit_adv, inv_adv, log_q = right[:, D:], None, None, None
        za, lga, keep = z, logits, False
    else:
        assert z_adv is not None and logits_adv is not None
        za, lga = _rows(z_adv), _rows(logits_adv)
        log_p = torch.empty(B, M, dtype=f32, device=dev)
        keep = bool(keep_unit_adv)
        unit_adv = torch.empty(Bp, D, dtype=f32, device=dev) if keep else None
        inv_adv, log_q = vecs[2 * B :], right[:, D:]
    ua = unit_adv if unit_adv is not None else left  # never written when not kept
    with _launching(z):
        _prep_kernel[(B if same else B + Bp,)](
            z,
            logits,
            za,
            lga,
            left,
            right,
            log_p,
            ua,
            row,
            inv,
            inv_adv if inv_adv is not None else inv,
            B,
            D,
            M,
            z.stride(0),
            logits.stride(0),
            za.stride(0),
            lga.stride(0),
            left.stride(0),
            right.stride(0),
            log_p.stride(0),
            ua.stride(0),
            float(lam),
            float(eps),
            SAME=same,
            STORE_UNIT_ADV=keep,
            BLOCK_D=cfg["BLOCK_D"],
            BLOCK_M=cfg["BLOCK_M"],
            num_warps=cfg["num_warps"],
        )
    return Prepared(left, right, row, log_p, inv, unit_adv, inv_adv, log_q)


def forward(
    z: torch.Tensor,
    logits: torch.Tensor,
    z_adv: torch.Tensor | None,
    logits_adv: torch.Tensor | None,
    lam: float,
    eps: float,
    *,
    keep_unit_adv: bool = True,
    block: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, Prepared]:
    """(C, the :func:`prep` factors): one Triton launch, then C = clamp_min(row − left · rightᵀ, 0) (addmm, clamp)."""
    f = prep(z, logits, z_adv, logits_adv, lam, eps, keep_unit_adv=keep_unit_adv, block=block)
    cost = torch.addmm(f.row[:, None], f.left, f.right.T, alpha=-1.0).clamp_min_(0.0)
    return cost, f


def post(
    grad: torch.Tensor,
    R: torch.Tensor | None,
    S: torch.Tensor | None,
    left: torch.Tensor,
    log_p: torch.Tensor,
    inv: torch.Tensor,
    unit_adv: torch.Tensor | None,
    inv_adv: torch.Tensor | None,
    log_q: torch.Tensor | None,
    lam: float,
    D: int,
    same: bool,
    needs: tuple[bool, bool, bool, bool],
    *,
    block: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    r"""(∂L/∂z, ∂L/∂logits, ∂L/∂z_adv, ∂L/∂logits_adv) for the upstream ``grad`` = G (B, B') in one launch,
    each None unless ``needs`` (the node's needs_input_grad) asks for it; the self-cost (``same``) has
    only the first two, both sides' gradients summed.

    R = G · right (B, D + M) is needed for the clean side's gradients and in the self-cost, S = Gᵀ · left
    (B', D + M) for the adversarial side's and in the self-cost (None where not needed). The saved
    tensors are those of either forward path: left = [ẑ, p], log_p, inv, and on the cross cost unit_adv,
    inv_adv, log_q (views with any row stride). G's row sums are taken in the kernel, along G's strides.
    """
    if not _HAVE_TRITON:
        raise RuntimeError("post needs triton (pip install triton)")
    need_z, need_l, need_za, need_la = (bool(x) for x in needs)
    if same:
        need_za = need_la = False
    _require(
        grad.dim() == 2 and grad.dtype == torch.float32,
        f"grad must be a 2-D float32 tensor, got {tuple(grad.shape)} {grad.dtype}",
    )
    _require(_device_ok(grad), f"post runs on CUDA tensors (CPU only with TRITON_INTERPRET=1), got {grad.device}")
    B, Bp = grad.shape
    dev = grad.device
    _require(log_p.dim() == 2, f"log_p must be 2-D (B, M), got {tuple(log_p.shape)}")
    M = log_p.shape[1]
    _require(same is False or Bp == B, f"the self-cost's grad must be square, got {tuple(grad.shape)}")
    _check_matrix("left", left, (B, D + M), dev)
    _check_matrix("log_p", log_p, (B, M), dev)
    _check_vector("inv", inv, B, dev)
    need_clean = need_z or need_l
    need_adv = need_za or need_la
    if need_clean:
        _require(R is not None, "R = grad @ right is needed for these gradients")
    if need_adv or (same and need_clean):
        _require(S is not None, "S = grad.T @ left is needed for these gradients")
    if R is not None:
        _check_matrix("R", R, (B, D + M), dev)
    if S is not None:
        _check_matrix("S", S, (Bp, D + M), dev)
    if need_za:
        _require(unit_adv is not None and inv_adv is not None, "unit_adv and inv_adv are needed for z_adv's gradient")
        assert unit_adv is not None and inv_adv is not None
        _check_matrix("unit_adv", unit_adv, (Bp, D), dev)
        _check_vector("inv_adv", inv_adv, Bp, dev)
    if need_la:
        _require(log_q is not None, "log_q is needed for logits_adv's gradient")
        assert log_q is not None
        _check_matrix("log_q", log_q, (Bp, M), dev)
    for name, t in (("left", left), ("log_p", log_p), ("R", R), ("S", S), ("unit_adv", unit_adv), ("log_q", log_q)):
        _require(t is None or t.stride(1) == 1, f"{name} must have contiguous rows ({name}.stride(1) == 1)")
    n_clean = B if need_clean else 0
    n_adv = Bp if need_adv else 0
    g_z = torch.empty(B, D, dtype=torch.float32, device=dev) if need_z else None
    g_l = torch.empty(B, M, dtype=torch.float32, device=dev) if need_l else None
    g_za = torch.empty(Bp, D, dtype=torch.float32, device=dev) if need_za else None
    g_la = torch.empty(Bp, M, dtype=torch.float32, device=dev) if need_la else None
    if n_clean + n_adv == 0:
        return g_z, g_l, g_za, g_la
    cfg = _blocks(D, M, Bp, block)

    def ptr(t: torch.Tensor | None) -> torch.Tensor:  # any float32 tensor stands for one a flag turns off
        return t if t is not None else left

    def stride(t: torch.Tensor | None) -> int:
        return t.stride(0) if t is not None else 0

    with _launching(grad):
        _post_kernel[(n_clean + n_adv,)](
            grad,
            ptr(R),
            ptr(S),
            left,
            log_p,
            inv,
            ptr(unit_adv),
            ptr(inv_adv),
            ptr(log_q),
            ptr(g_z),
            ptr(g_l),
            ptr(g_za),
            ptr(g_la),
            n_clean,
            Bp,
            D,
            M,
            grad.stride(0),
            grad.stride(1),
            stride(R),
            stride(S),
            left.stride(0),
            log_p.stride(0),
            stride(unit_adv),
            stride(log_q),
            stride(g_z),
            stride(g_l),
            stride(g_za),
            stride(g_la),
            float(lam),
            SAME=bool(same),
            NEED_Z=need_z,
            NEED_L=need_l,
            NEED_ZA=need_za,
            NEED_LA=need_la,
            BLOCK_D=cfg["BLOCK_D"],
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_G=cfg["BLOCK_G"],
            num_warps=cfg["num_warps"],
        )
    return g_z, g_l, g_za, g_la


def backward(
    grad: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    log_p: torch.Tensor,
    inv: torch.Tensor,
    unit_adv: torch.Tensor | None,
    inv_adv: torch.Tensor | None,
    log_q: torch.Tensor | None,
    lam: float,
    D: int,
    same: bool,
    needs: tuple[bool, bool, bool, bool],
    *,
    block: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The node's input gradients: R = G · right and S = Gᵀ · left (each only if a requested gradient needs
    it), then :func:`post` (one launch)."""
    need_z, need_l, need_za, need_la = (bool(x) for x in needs)
    need_clean = need_z or need_l
    need_adv = not same and (need_za or need_la)
    R = grad @ right if need_clean else None
    S = grad.T @ left if need_adv or (same and need_clean) else None
    needed = (need_z, need_l, need_za, need_la)
    return post(grad, R, S, left, log_p, inv, unit_adv, inv_adv, log_q, lam, D, same, needed, block=block)
