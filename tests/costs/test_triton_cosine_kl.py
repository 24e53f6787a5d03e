"""The Triton kernels of the fused cosine + KL cost (:mod:`got_reg.costs._triton_cosine_kl`) against float64
torch expressions, autograd through the separate public costs, and the node's torch path.

Without a CUDA device the kernels run on CPU tensors through Triton's interpreter (tests/interpreted.py).
The node itself never sends CPU tensors to the kernels; the end-to-end tests widen its gate to CPU tensors
(``_cosine_kl._KERNEL_DEVICES``) for the duration of a test.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from interpreted import CUDA, DEVICE, kernel_modules

from got_reg.costs import CosineCost, KLCost, _cosine_kl
from got_reg.costs._cosine_kl import CosineKL
from got_reg.solvers import lse

# K takes INTERPRET and the launch helpers from T: T first, then K.
T, K = kernel_modules("got_reg.solvers._triton", "got_reg.costs._triton_cosine_kl")
ROOT = Path(__file__).resolve().parents[2]
F64 = dict(dtype=torch.float64)


# ---------------------------------------------------------------------------------------- inputs and references


def inputs(B, Bp, D, M, eps, seed=0):
    """float32 (z, logits, z_adv, logits_adv) with the hard rows: a zero feature row (dead ReLU units), one of
    norm eps/2 (no direction either), and saturated logits (±80) on both sides."""
    g = torch.Generator().manual_seed(seed)
    z, za = torch.randn(B, D, generator=g), torch.randn(Bp, D, generator=g)
    lg, lga = 3 * torch.randn(B, M, generator=g), 3 * torch.randn(Bp, M, generator=g)
    signs = torch.tensor([(-1.0) ** k for k in range(M)])
    if B > 1:
        z[1] = 0.0
    if B > 3:
        z[3] *= 0.5 * eps / z[3].norm()
    if Bp > 1:
        za[-1] = 0.0
    lg[0] = 80.0 * signs
    lga[0] = -80.0 * signs
    return z, lg, za, lga


def dead_rows(z, eps):
    return [i for i in range(z.shape[0]) if float(z[i].double().norm()) <= eps]


def side64(z, lg, eps):
    """(ẑ, 1/|z|, ℓ, p) in float64 from the float32 inputs, the torch expressions of the node."""
    z, lg = z.double(), lg.double()
    norm = torch.linalg.vector_norm(z, dim=1)
    inv = torch.where(norm > eps, norm, torch.inf).reciprocal()
    log_p = torch.log_softmax(lg, dim=1)
    return z * inv[:, None], inv, log_p, log_p.exp()


def separate(z, za, lg, lga, lam, eps):
    """λ·cosine + KL through the public pairwise costs (plain autograd, no code shared with the node)."""
    return lam * CosineCost(eps).pairwise(z, za) + KLCost().pairwise(lg, lga)


def to_dev(*ts):
    return tuple(t.to(DEVICE) if t is not None else None for t in ts)


def close(actual, expected, rtol, atol_rel):
    """actual (any dtype, any device) against expected within rtol, and atol relative to expected's scale."""
    expected = expected.double()
    atol = atol_rel * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.detach().cpu().double(), expected.cpu(), rtol=rtol, atol=atol)


class Ctx:
    """Enough of an autograd context to run CosineKL.forward directly (what it saves is then readable)."""

    def __init__(self, needs):
        self.needs_input_grad = tuple(needs) + (False, False)

    def save_for_backward(self, *ts):
        self.saved_tensors = ts


@pytest.fixture
def kernels_spied(monkeypatch):
    """Triton on, the node's gate widened to CPU float32 tensors (for the interpreter; the node tests put their
    tensors on DEVICE, so on a CUDA machine the compiled kernels run), and spies on the launches."""
    monkeypatch.delenv("GOT_REG_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(lse, "_TRITON_FAILED", False)  # restored afterwards: other tests keep their kernels
    monkeypatch.setattr(_cosine_kl, "_KERNEL_DEVICES", ("cuda", "cpu"))
    calls = {"prep": 0, "post": 0}
    for name in calls:
        real = getattr(K, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(K, name, spy)
    return calls


# ---------------------------------------------------------------------------------------- prep


PREP_CASES = [
    # B, B', D, M, lam, eps, block (chunk widths forced small: several chunks per row)
    (1, 1, 1, 1, 1.0, 1e-12, None),
    (7, 5, 37, 10, 0.3, 1e-3, None),
    (7, 3, 1100, 37, 2.5, 1e-12, (256, 16)),
    (130, 9, 48, 10, 1.0, 1e-3, (16, 16)),
]


@pytest.mark.parametrize("B, Bp, D, M, lam, eps, block", PREP_CASES)
@pytest.mark.parametrize("same", [True, False])
def test_prep_writes_the_factors(B, Bp, D, M, lam, eps, block, same):
    z, lg, za, lga = inputs(B, Bp, D, M, eps, seed=B + D + M)
    args = (z, lg, None, None) if same else (z, lg, za, lga)
    f = K.prep(*to_dev(*args), lam, eps, block=block)
    unit, inv, log_p, p = side64(z, lg, eps)
    unit_a, inv_a, log_q, _ = (unit, inv, log_p, p) if same else side64(za, lga, eps)
    Bq = B if same else Bp
    assert f.left.shape == (B, D + M) and f.right.shape == (Bq, D + M) and f.row.shape == f.inv.shape == (B,)
    close(f.inv, inv, 1e-6, 0)
    close(f.left, torch.cat([unit, p], 1), 1e-5, 1e-7)
    close(f.right, torch.cat([lam * unit_a, log_q], 1), 1e-5, 1e-6)
    close(f.log_p, log_p, 1e-5, 1e-6)
    close(f.row, lam + (p * log_p).sum(1), 1e-5, 1e-6)
    for i in dead_rows(z, eps):
        assert float(f.inv[i]) == 0.0 and torch.all(f.left[i, :D] == 0), "no direction: ẑ = 0 and 1/|z| = 0"
    if same:
        assert f.unit_adv is None and f.inv_adv is None and f.log_q is None
        assert f.log_p.data_ptr() == f.right[:, D:].data_ptr()
    else:
        assert f.inv_adv is not None and f.unit_adv is not None and f.log_q is not None
        close(f.inv_adv, inv_a, 1e-6, 0)
        close(f.unit_adv, unit_a, 1e-5, 1e-7)
        close(f.log_q, log_q, 1e-5, 1e-6)
        for j in dead_rows(za, eps):
            assert float(f.inv_adv[j]) == 0.0 and torch.all(f.unit_adv[j] == 0) and torch.all(f.right[j, :D] == 0)


def test_prep_without_the_adversarial_units():
    z, lg, za, lga = inputs(4, 3, 20, 5, 1e-12)
    f = K.prep(*to_dev(z, lg, za, lga), 0.5, 1e-12, keep_unit_adv=False)
    assert f.unit_adv is None
    close(f.right[:, :20], 0.5 * side64(za, lga, 1e-12)[0], 1e-5, 1e-7)


@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("lam", [0.3, 2.5])
def test_cost_equals_the_node_and_float64(same, lam):
    """prep + addmm + clamp (:func:`forward`) against the node's torch path (float32) and float64."""
    B, Bp, D, M, eps = 9, 6, 300, 37, 1e-3
    z, lg, za, lga = inputs(B, Bp, D, M, eps, seed=5)
    args = (z, lg, None, None) if same else (z, lg, za, lga)
    cost, _ = K.forward(*to_dev(*args), lam, eps, block=(64, 16))
    node = CosineKL.apply(*args, lam, eps)  # CPU: the torch path
    ref = separate(z.double(), (z if same else za).double(), lg.double(), (lg if same else lga).double(), lam, eps)
    assert cost.shape == ref.shape and bool((cost >= 0).all())
    close(cost, node, 1e-5, 1e-6)
    close(cost, ref, 1e-5, 1e-6)


# ---------------------------------------------------------------------------------------- post


NEEDS_CROSS = [
    (True, True, True, True),
    (False, False, True, True),  # anchor="clean": z and logits detached
    (True, True, False, False),
    (True, False, False, True),
    (False, True, True, False),
]
NEEDS_SAME = [(True, True), (True, False), (False, True)]


def reference_grads(args, lam, eps, G, needs):
    """float64 autograd through the separate costs for the inputs that ``needs`` asks for (None elsewhere)."""
    z, lg, za, lga = (t.double() if t is not None else None for t in args)
    same = za is None
    leaves = [t.requires_grad_(bool(n)) if t is not None else None for t, n in zip((z, lg, za, lga), needs)]
    z, lg, za, lga = leaves
    C = separate(z, z, lg, lg, lam, eps) if same else separate(z, za, lg, lga, lam, eps)
    wanted = [t for t, n in zip(leaves, needs) if n and t is not None]
    grads = iter(torch.autograd.grad((G.double() * C).sum(), wanted))
    return [next(grads) if n and t is not None else None for t, n in zip(leaves, needs)]


def node_grads(args, lam, eps, G, needs):
    """The node's torch path (float32, on the inputs' device) for the inputs that ``needs`` asks for."""
    leaves = [t.clone().requires_grad_(bool(n)) if t is not None else None for t, n in zip(args, needs)]
    C = CosineKL.apply(*leaves, lam, eps)
    wanted = [t for t, n in zip(leaves, needs) if n and t is not None]
    grads = iter(torch.autograd.grad((G * C).sum(), wanted))
    return [next(grads) if n and t is not None else None for t, n in zip(leaves, needs)]


def check_grads(got, args, lam, eps, G, needs, D):
    node = node_grads(args, lam, eps, G, needs)
    ref = reference_grads(args, lam, eps, G, needs)
    for k, (a, b, c, n) in enumerate(zip(got, node, ref, needs)):
        if not n or args[k] is None:
            assert a is None, f"gradient {k} was not asked for"
            continue
        assert a is not None and a.shape == args[k].shape and a.dtype == torch.float32
        # Both float32 paths lose digits to the same cancellations (v − p·v on saturated logits): each is
        # held to float64, and the kernel's error to at most twice the torch path's.
        close(a, b, 1e-5, 5e-6)
        close(a, c, 1e-4, 1e-5)
        err, err_torch = (float((x.detach().cpu().double() - c).abs().max()) for x in (a, b))
        assert err <= 2 * err_torch + 1e-7 * max(1.0, float(c.abs().max())), (k, err, err_torch)
    eps_rows = [(0, args[0]), (2, args[2])]
    for k, t in eps_rows:
        if needs[k] and t is not None:
            for i in dead_rows(t, eps):
                assert torch.all(got[k][i] == 0), "a feature row without direction gets exactly zero gradient"


def saved_by(path, args, lam, eps, needs, block):
    """The tensors the node saves for its backward, from the Triton forward or from the torch one."""
    if path == "triton":
        f = K.prep(*to_dev(*args), lam, eps, keep_unit_adv=bool(needs[2]), block=block)
        return f.left, f.right, f.log_p, f.inv, f.unit_adv, f.inv_adv, f.log_q
    ctx = Ctx(needs)
    CosineKL.forward(ctx, *args, lam, eps)  # CPU: the torch path
    return to_dev(*ctx.saved_tensors)


@pytest.mark.parametrize("needs", NEEDS_CROSS)
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_post_cross_gradients(needs, path):
    """Every subset of gradients, from the tensors either forward saves; G transposed (strided rows)."""
    B, Bp, D, M, lam, eps = 7, 5, 40, 10, 0.3, 1e-3
    z, lg, za, lga = inputs(B, Bp, D, M, eps, seed=11)
    args = (z, lg, za, lga)
    G = torch.rand(Bp, B, generator=torch.Generator().manual_seed(2)).T  # not contiguous
    saved = saved_by(path, args, lam, eps, needs, (16, 16))
    got = K.backward(G.to(DEVICE), *saved, lam, D, False, needs, block=(16, 16))
    check_grads(got, args, lam, eps, G, needs, D)


@pytest.mark.parametrize("needs", NEEDS_SAME)
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_post_self_cost_gradients(needs, path):
    B, D, M, lam, eps = 8, 40, 37, 2.5, 1e-3
    z, lg, _, _ = inputs(B, 1, D, M, eps, seed=12)
    args = (z, lg, None, None)
    full = needs + (False, False)
    G = torch.rand(B, B, generator=torch.Generator().manual_seed(3))
    saved = saved_by(path, args, lam, eps, full, (16, 16))
    got = K.backward(G.to(DEVICE), *saved, lam, D, True, full, block=(16, 16))
    assert got[2] is None and got[3] is None
    check_grads(got, args, lam, eps, G, full, D)


def test_post_at_larger_sizes_and_a_broadcast_gradient():
    """B = 130 rows, several chunks of D, M and of G's row; G = 1 broadcast (strides 0), as from C.sum()."""
    B, Bp, D, M, lam, eps = 130, 40, 70, 37, 1.0, 1e-12
    z, lg, za, lga = inputs(B, Bp, D, M, eps, seed=13)
    args = (z, lg, za, lga)
    needs = (True, True, True, True)
    G = torch.ones(1, 1).expand(B, Bp)
    saved = saved_by("triton", args, lam, eps, needs, (32, 16))
    got = K.backward(G.to(DEVICE), *saved, lam, D, False, needs, block=(32, 16))
    check_grads(got, args, lam, eps, G, needs, D)


def test_post_with_nothing_needed_launches_nothing():
    z, lg, za, lga = to_dev(*inputs(3, 2, 5, 4, 1e-12))
    f = K.prep(z, lg, za, lga, 1.0, 1e-12)
    G = torch.ones(3, 2, device=DEVICE)
    assert K.post(G, None, None, f.left, f.log_p, f.inv, None, None, None, 1.0, 5, False, (False,) * 4) == (None,) * 4


# ---------------------------------------------------------------------------------------- through the node


@pytest.mark.parametrize("same", [True, False])
def test_node_takes_the_kernels_and_matches_its_torch_path(kernels_spied, same):
    B, Bp, D, M, lam, eps = 9, 6, 50, 10, 0.7, 1e-3
    z, lg, za, lga = to_dev(*inputs(B, Bp, D, M, eps, seed=21))
    args = (z, lg, None, None) if same else (z, lg, za, lga)
    needs = (True, True, not same, not same)
    G = torch.rand(B, B if same else Bp, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    leaves = [t.clone().requires_grad_(n) if t is not None else None for t, n in zip(args, needs)]
    C = CosineKL.apply(*leaves, lam, eps)
    got = torch.autograd.grad((G * C).sum(), [t for t in leaves if t is not None])
    assert kernels_spied == {"prep": 1, "post": 1}

    with pytest.MonkeyPatch.context() as mp:  # the torch path of the same node
        mp.setenv("GOT_REG_DISABLE_TRITON", "1")
        C_torch = CosineKL.apply(*args, lam, eps)
        ref = node_grads(args, lam, eps, G, needs)
    assert kernels_spied == {"prep": 1, "post": 1}, "GOT_REG_DISABLE_TRITON=1 turns the kernels off"
    close(C, C_torch, 1e-5, 1e-6)
    for a, b in zip(got, [r for r in ref if r is not None]):
        close(a, b, 1e-5, 1e-6)


def test_node_anchor_clean_asks_only_the_adversarial_gradients(kernels_spied):
    """z and logits detached (anchor="clean"): the kernels write only z_adv's and logits_adv's gradients."""
    B, Bp, D, M, lam, eps = 6, 6, 30, 10, 1.0, 1e-12
    z, lg, za, lga = to_dev(*inputs(B, Bp, D, M, eps, seed=22))
    za_, lga_ = za.clone().requires_grad_(True), lga.clone().requires_grad_(True)
    G = torch.rand(B, Bp, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = torch.autograd.grad((G * CosineKL.apply(z, lg, za_, lga_, lam, eps)).sum(), (za_, lga_))
    assert kernels_spied == {"prep": 1, "post": 1}
    ref = node_grads((z, lg, za, lga), lam, eps, G, (False, False, True, True))
    close(got[0], ref[2], 1e-5, 1e-6)
    close(got[1], ref[3], 1e-5, 1e-6)


@pytest.mark.parametrize("stage", ["prep", "post"])
def test_a_failing_kernel_warns_once_and_the_call_goes_on_in_torch(kernels_spied, monkeypatch, stage):
    """A kernel that raises: one RuntimeWarning (triton_failed turns Triton off), the same call finishes in torch
    (a failing post: the torch backward on what the Triton forward saved), later calls stay in torch."""

    def broken(*a, **kw):
        raise RuntimeError("no kernel")

    B, Bp, D, M, lam, eps = 5, 4, 24, 7, 0.3, 1e-3
    args = to_dev(*inputs(B, Bp, D, M, eps, seed=23))
    needs = (True, True, True, True)
    G = torch.rand(B, Bp, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GOT_REG_DISABLE_TRITON", "1")
        C_torch = CosineKL.apply(*args, lam, eps)
        ref = node_grads(args, lam, eps, G, needs)
    monkeypatch.setattr(K, stage, broken)
    leaves = [t.clone().requires_grad_(True) for t in args]
    with pytest.warns(RuntimeWarning, match="Triton kernel failed .*no kernel") as record:
        C = CosineKL.apply(*leaves, lam, eps)
        got = torch.autograd.grad((G * C).sum(), leaves)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert lse._TRITON_FAILED and not K.enabled()
    assert kernels_spied == {"prep": 0 if stage == "prep" else 1, "post": 0}
    close(C, C_torch, 1e-5, 1e-6)
    for a, b in zip(got, ref):
        close(a, b, 1e-5, 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CosineKL.apply(*leaves, lam, eps).sum().backward()  # torch from now on, no second warning


# ---------------------------------------------------------------------------------------- dispatch and input checks


def test_cost_supported_refuses_cpu_and_float64(monkeypatch):
    x = torch.rand(4, 3)
    assert not K.cost_supported(x) and not K.cost_supported(x, None)  # never CPU, even interpreted
    assert not K.forward_supported(x, x, None, None)
    monkeypatch.setenv("GOT_REG_DISABLE_TRITON", "1")
    assert not K.enabled()
    if CUDA and not K.INTERPRET:
        xc = x.cuda()
        assert K.cost_supported(xc, xc, None) and K.forward_supported(xc, xc, xc, xc)
        assert not K.cost_supported(xc.double()) and not K.cost_supported(xc[0]) and not K.cost_supported(xc[:0])
        assert not K.forward_supported(xc, xc[:3], None, None) and not K.forward_supported(xc, xc, xc[:, :2], xc)


def test_module_imports_and_the_node_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from got_reg.costs import _triton_cosine_kl as K\n"
        "from got_reg.costs._cosine_kl import CosineKL\n"
        "x = torch.rand(4, 3)\n"
        "assert not K.cost_supported(x) and not K.enabled()\n"
        "assert CosineKL.apply(x, x, None, None, 1.0, 1e-12).shape == (4, 4)\n"
        "try:\n"
        "    K.prep(x, x, None, None, 1.0, 1e-12)\n"
        "except RuntimeError:\n"
        "    print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_bad_input_raises_value_errors():
    z, lg, za, lga = to_dev(*inputs(4, 3, 6, 5, 1e-12))
    with pytest.raises(ValueError, match=r"z must be a non-empty 2-D float32 tensor, got \(4, 6\) torch.float64"):
        K.prep(z.double(), lg, None, None, 1.0, 1e-12)
    with pytest.raises(ValueError, match=r"logits must be 2-D of shape \(4, M\) with M >= 1, got \(3, 5\)"):
        K.prep(z, lg[:3], None, None, 1.0, 1e-12)
    with pytest.raises(ValueError, match=r"z_adv must be 2-D of shape \(B', 6\) with B' >= 1, got \(3, 5\)"):
        K.prep(z, lg, za[:, :5], lga, 1.0, 1e-12)
    with pytest.raises(ValueError, match=r"logits_adv must be float32 of shape \(3, 5\) .* got \(2, 5\)"):
        K.prep(z, lg, za, lga[:2], 1.0, 1e-12)
    with pytest.raises(ValueError, match="both be given or both be None"):
        K.prep(z, lg, za, None, 1.0, 1e-12)
    with pytest.raises(ValueError, match=r"block must be powers of 2, got \(24, 16\)"):
        K.prep(z, lg, None, None, 1.0, 1e-12, block=(24, 16))
    f = K.prep(z, lg, za, lga, 1.0, 1e-12)
    G = torch.ones(4, 3, device=DEVICE)
    needs = (True, True, True, True)
    R, S = G @ f.right, G.T @ f.left
    with pytest.raises(ValueError, match=r"R must be float32 of shape \(4, 11\) .* got \(4, 10\)"):
        K.post(G, R[:, :10], S, f.left, f.log_p, f.inv, f.unit_adv, f.inv_adv, f.log_q, 1.0, 6, False, needs)
    with pytest.raises(ValueError, match=r"S = grad.T @ left is needed"):
        K.post(G, R, None, f.left, f.log_p, f.inv, f.unit_adv, f.inv_adv, f.log_q, 1.0, 6, False, needs)
    with pytest.raises(ValueError, match=r"grad must be a 2-D float32 tensor, got \(4, 3\) torch.float64"):
        K.post(G.double(), R, S, f.left, f.log_p, f.inv, f.unit_adv, f.inv_adv, f.log_q, 1.0, 6, False, needs)
    with pytest.raises(ValueError, match=r"inv_adv must be contiguous float32 of shape \(3,\) .* got \(2,\)"):
        K.post(G, R, S, f.left, f.log_p, f.inv, f.unit_adv, f.inv_adv[:2], f.log_q, 1.0, 6, False, needs)
    with pytest.raises(ValueError, match=r"left must be float32 of shape \(4, 12\) .* got \(4, 11\)"):
        K.post(G, R, S, f.left, f.log_p, f.inv, f.unit_adv, f.inv_adv, f.log_q, 1.0, 7, False, needs)
