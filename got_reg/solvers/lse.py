r"""The row log-sum-exp, the one kernel that every solver here is made of.

    lse(A, w, s)_i = log Σ_j exp(s · A_ij + w_j)

for a fixed matrix A (entries may be +∞: a forbidden pair, which contributes exactly 0; every row needs
a finite entry) and a vector w. A Sinkhorn sweep is two of them (on C and on Cᵀ), the semi-dual one.
As in GeomLoss, the solvers share their loop and differ only in the operator they are given:

* :class:`KernelLSE` (CPU, A up to :data:`_KERNEL_MAX_ELEMENTS` entries): exp(s·A + w̄) cached and
  stabilised; a call is one matrix-vector product, and the kernel is rebuilt only when w has moved far
  from w̄ (between Sinkhorn sweeps it rarely has);
* :class:`BlockedLSE` (CPU, larger A): rows go block by block through one reused, cache-sized buffer, with
  the exponent floored (see :data:`_EXP_FLOOR`), so no B×B temporary goes through the allocator;
* :class:`PlainLSE` (GPU without Triton, or tiny problems): ``torch.logsumexp(w + s·A)``;
* :class:`TritonLSE` (CUDA, float32, Triton installed): a streaming (online) log-sum-exp that reads A
  once and never writes exp(A) to memory (:mod:`got_reg.solvers._triton`).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

# torch's vectorised CPU exp() takes a slow path, 10-40x slower per element, when the result is
# subnormal or zero (fp32 argument below about -87). After the max is subtracted, a log-sum-exp term
# that small cannot change a sum that is >= 1, and near-diagonal plans of adversarial pairs are made of
# such terms; flooring the argument first gives the same sums at full speed. GPUs have no such path.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}
# CPU row blocks of about 1 MB of fp32 (a typical L2): the log-sum-exp is five passes over its block,
# which then stay in cache.
_BLOCK_ELEMENTS = 2**18
# KernelLSE rebuilds its kernel when the potentials have moved by more than this spread since the last
# build (see its docstring for why any τ ≲ 30 keeps float32's accuracy); larger: fewer builds.
_KERNEL_SPREAD = 20.0
# KernelLSE keeps a kernel the size of A: above this many entries (64 MB in float32) BlockedLSE is used.
_KERNEL_MAX_ELEMENTS = 2**24
# Below this many entries a streaming kernel gains nothing over torch's own reduction.
_TRITON_MIN_ELEMENTS = 2**16


def exp_floor(x: torch.Tensor) -> float | None:
    """The exponent floor for ``x``'s dtype on CPU, None elsewhere (GPUs have no subnormal slow path)."""
    return _EXP_FLOOR.get(x.dtype) if x.device.type == "cpu" else None


def block_rows(n_rows: int, n_cols: int) -> int:
    """Rows per CPU block of an (n_rows, n_cols) matrix: about _BLOCK_ELEMENTS entries, at least one row."""
    return min(n_rows, max(1, _BLOCK_ELEMENTS // max(1, n_cols)))


class RowLSE:
    """Base class: ``op(w, scale)[i] = log Σ_j exp(scale · A_ij + w_j)`` for the matrix A given at construction."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A = A

    def __call__(self, w: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError


class PlainLSE(RowLSE):
    def __call__(self, w: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.logsumexp(torch.add(w, self.A, alpha=scale), dim=1)


class BlockedLSE(RowLSE):
    """CPU: blocks of rows through one reused buffer, exponent floored at :func:`exp_floor`.

    Same sums as :class:`PlainLSE`, 2-3x faster Sinkhorn solves at B = 256-1024 on CPU
    (``benchmarks/bench_solvers.py``).
    """

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A)
        floor = exp_floor(A)
        assert floor is not None, "BlockedLSE is the CPU operator"
        self.floor = floor
        self.buf = torch.empty(block_rows(*A.shape), A.shape[1], dtype=A.dtype, device=A.device)

    def __call__(self, w: torch.Tensor, scale: float) -> torch.Tensor:
        R = self.buf.shape[0]
        if R == self.A.shape[0]:
            return self._block(self.A, w, scale)
        return torch.cat([self._block(self.A[r0 : r0 + R], w, scale) for r0 in range(0, self.A.shape[0], R)])

    def _block(self, block: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
        X = torch.add(w, block, alpha=scale, out=self.buf[: block.shape[0]])
        m = X.amax(dim=1, keepdim=True)  # finite: each row has a finite entry
        return X.sub_(m).clamp_min_(self.floor).exp_().sum(dim=1).log_().add_(m.squeeze(1))


class KernelLSE(RowLSE):
    r"""CPU: the log-sum-exp as one matrix-vector product with a cached, stabilised kernel.

        lse(w)_i = m_i + δ* + log Σ_j K_ij exp(δ_j − δ*),   K_ij = exp(s·A_ij + w̄_j − m_i),   δ = w − w̄,  δ* = max δ,

    where w̄ and m (the row maxima of s·A + w̄, so that each row of K holds a 1) are those of K's last build.
    Sinkhorn's potentials move little from one sweep to the next, so K is rebuilt (one pass with an exp, as
    one :class:`BlockedLSE` call) only when the scale changes or the spread max δ − min δ exceeds τ =
    :data:`_KERNEL_SPREAD`; every other call is one product with K and O(B) work, where a log-sum-exp
    makes five passes over A with an exp. This is the absorption of the stabilised Sinkhorn (Schmitzer,
    "Stabilized sparse scaling algorithms for entropy regularized transport problems", SIAM J. Sci.
    Comput. 2019, §3), applied to each log-sum-exp on its own, so that the loop is unchanged.

    Accuracy: the factors exp(δ_j − δ*) lie in [e^{-τ}, 1], so no sum overflows or vanishes. K's exponents
    are floored at floor + τ (:func:`exp_floor`), so that no product in the sum is subnormal (5-10x slower
    on x86), as :class:`BlockedLSE` floors at floor: relative to the row's largest term, ≥ e^{-τ}, what the
    floored entries add is below B·e^{floor + 2τ} (e^{-47}·B in float32), far under the rounding of the sum.
    """

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A)
        floor = exp_floor(A)
        assert floor is not None, "KernelLSE is a CPU operator"
        self.floor = floor
        self.K = torch.empty_like(A)
        self.m = A.new_empty(A.shape[0])
        self.w_bar = A.new_empty(A.shape[1])
        self.scale: float | None = None
        self.builds = 0

    def __call__(self, w: torch.Tensor, scale: float) -> torch.Tensor:
        if scale != self.scale:
            return self._build(w, scale)
        delta = w - self.w_bar
        lo, hi = torch.aminmax(delta)
        lo_, hi_ = float(lo), float(hi)  # host reads: free on CPU
        if not hi_ - lo_ <= _KERNEL_SPREAD:  # (also when w is not finite: the build then says so)
            return self._build(w, scale)
        sums = torch.mv(self.K, delta.sub_(hi_).exp_())
        return sums.log_().add_(self.m).add_(hi_)

    def _build(self, w: torch.Tensor, scale: float) -> torch.Tensor:
        K = torch.add(w, self.A, alpha=scale, out=self.K)
        torch.amax(K, dim=1, out=self.m)  # finite: each row has a finite entry
        K.sub_(self.m[:, None]).clamp_min_(self.floor + _KERNEL_SPREAD).exp_()
        self.w_bar.copy_(w)
        self.scale = scale
        self.builds += 1
        return K.sum(dim=1).log_().add_(self.m)


_TRITON_FAILED = False


def triton_failed(exc: BaseException) -> None:
    """A Triton kernel raised: warn once and use the torch path for the rest of the process."""
    global _TRITON_FAILED
    if not _TRITON_FAILED:
        warnings.warn(
            f"got-reg's Triton kernel failed ({type(exc).__name__}: {exc}); using the torch path "
            "from now on. Set GOT_REG_DISABLE_TRITON=1 to skip the kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
    _TRITON_FAILED = True


def triton_module():
    """:mod:`got_reg.solvers._triton` if Triton is installed and usable here, else None.

    ``GOT_REG_DISABLE_TRITON=1`` in the environment turns the kernels off (the torch path is then used).
    """
    if _TRITON_FAILED or os.environ.get("GOT_REG_DISABLE_TRITON", "") not in ("", "0"):
        return None
    try:
        from . import _triton
    except ImportError:  # Triton is optional
        return None
    return _triton if _triton.available() else None


class TritonLSE(RowLSE):
    """CUDA float32: one streaming kernel per call (:func:`got_reg.solvers._triton.row_lse`)."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A)
        self.fallback: PlainLSE | None = None

    def __call__(self, w: torch.Tensor, scale: float) -> torch.Tensor:
        tri = None if self.fallback is not None else triton_module()
        if tri is not None:
            try:
                return tri.row_lse(self.A, w, scale)
            except Exception as exc:  # noqa: BLE001 - any kernel failure falls back to torch
                triton_failed(exc)
        self.fallback = self.fallback or PlainLSE(self.A)
        return self.fallback(w, scale)


def row_lse(A: torch.Tensor) -> RowLSE:
    """The operator for A on its device: the cached kernel on CPU (blocked above :data:`_KERNEL_MAX_ELEMENTS`),
    streaming Triton on CUDA float32, else plain."""
    if exp_floor(A) is not None:
        return KernelLSE(A) if A.numel() <= _KERNEL_MAX_ELEMENTS else BlockedLSE(A)
    tri = triton_module() if A.numel() >= _TRITON_MIN_ELEMENTS else None
    if tri is not None and tri.row_lse_supported(A):
        return TritonLSE(A)
    return PlainLSE(A)


def softmax_rows_(A: torch.Tensor, w: torch.Tensor, scale: float, divide: float) -> torch.Tensor:
    r"""In place, A ← exp(s·A + w − lse)/``divide`` row by row (a row softmax); returns lse (the row log-sum-exps).

    Terms below the exponent floor (forbidden pairs included) and terms whose result would be
    subnormal are set to exactly 0 on CPU: subnormals in a plan make the matrix products of the cost's
    backward 5-10x slower on x86.
    """
    floor = exp_floor(A)
    if floor is None:
        A.mul_(scale).add_(w)
        lse = torch.logsumexp(A, dim=1)
        A.sub_(lse[:, None]).exp_().div_(divide)
        return lse
    lse = A.new_empty(A.shape[0])
    rows = block_rows(*A.shape)
    tiny = max(2.0 * math.exp(floor), torch.finfo(A.dtype).tiny * A.shape[1] * divide)
    for r0 in range(0, A.shape[0], rows):
        block = A[r0 : r0 + rows]
        block.mul_(scale).add_(w)
        m = block.amax(dim=1, keepdim=True)
        block.sub_(m).clamp_min_(floor).exp_()
        torch.threshold_(block, tiny, 0.0)
        s = block.sum(dim=1, keepdim=True)
        lse[r0 : r0 + rows] = (s.log() + m).squeeze(1)
        block.div_(s.mul_(divide))
    return lse


def exp_plan(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` in place with subnormal results flushed to 0 on CPU (masked −∞ entries give exactly 0)."""
    floor = exp_floor(x)
    if floor is None:
        return x.exp_()
    small = x < floor
    return x.clamp_min_(floor).exp_().masked_fill_(small, 0.0)
