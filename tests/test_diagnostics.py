"""GOTDiagnostics: the numbers it reports equal the tensors and the solver's result, and a call of the
module reads the device exactly once (outside the solver's own convergence checks)."""

import pytest
import torch
from nets import batch, mlp

from got_reg import GOTDiagnostics, GOTRegularizer
from got_reg.functional import GOTConfig, got_forward, label_mask
from got_reg.solvers import KantorovichPotential, SinkhornBackend, get_backend


def features(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z, lg = torch.randn(B, 6, generator=g), torch.randn(B, 4, generator=g)
    za, lga = z + 0.5 * torch.randn(B, 6, generator=g), lg + 0.5 * torch.randn(B, 4, generator=g)
    return z, za, lg, lga, torch.arange(B) % 4


@pytest.mark.parametrize(
    "solver, debias, labels", [("sinkhorn", True, True), ("sinkhorn", False, False), ("dual", False, True)]
)
def test_as_dict_reports_the_tensors(solver, debias, labels):
    z, za, lg, lga, y = features()
    cfg = GOTConfig(beta=2.5, solver=solver, debias=debias)
    loss, d = got_forward(cfg, z, za, lg, lga, y if labels else None, potential=KantorovichPotential())
    assert isinstance(d, GOTDiagnostics) and d.solver == solver and d.batch == 8
    out = d.as_dict()
    for name in ("value", "loss", "w_xy", "iterations", "marginal_error", "converged", "finite"):
        t = getattr(d, name)
        assert isinstance(t, torch.Tensor) and not t.requires_grad
        assert out[name] == float(t), name
    assert out["loss"] == pytest.approx(2.5 * out["value"], rel=1e-6) and out["loss"] == float(loss.detach())
    assert d.iterations is d.result.iterations and d.marginal_error is d.result.marginal_error
    assert out["batch"] == 8.0 and out["finite"] == 1.0
    names, vector = d.numbers()  # what as_dict reads, as one device vector
    assert names[-1] == "finite" and vector.dtype == torch.float64 and vector.shape == (len(names),)
    assert dict(zip(names, vector.tolist())) == {k: v for k, v in out.items() if k != "batch"}
    if debias:
        assert len(d.self_terms) == 2 and out["value"] != out["w_xy"]
    else:
        assert d.self_terms == () and out["value"] == out["w_xy"]
    if labels:
        plan, same = d.result.plan, label_mask(y)
        assert out["same_label_mass"] == pytest.approx(float((plan * same).sum() / plan.sum()), rel=1e-6)
    else:
        assert "same_label_mass" not in out and d.same_label_mass is None


def test_read_flags_and_the_unconverged_solve():
    z, za, lg, lga, y = features()
    _, d = got_forward(GOTConfig(debias=True, tol=1e-3), z, za, lg, lga)
    assert d.read_flags() == (True, True) and d.unconverged_result() is None
    _, d = got_forward(GOTConfig(debias=False, tol=1e-12, max_iter=3), z, za, lg, lga)
    assert d.read_flags() == (True, False) and d.unconverged_result() is d.result
    # The dual has no tolerance of its own; with debias its Sinkhorn self-terms do.
    _, d = got_forward(GOTConfig(solver="dual", debias=False), z, za, lg, lga, potential=KantorovichPotential())
    assert d.read_flags() == (True, None)
    _, d = got_forward(
        GOTConfig(solver="dual", debias=True, tol=1e-12, max_iter=3), z, za, lg, lga, potential=KantorovichPotential()
    )
    assert d.read_flags() == (True, False) and d.unconverged_result() is d.self_terms[0]
    # got_forward itself never raises on NaN: it reports it, and the caller decides.
    bad = za.clone()
    bad[0, 0] = float("nan")
    _, d = got_forward(GOTConfig(debias=False), z, bad, lg, lga)
    assert d.read_flags()[0] is False and d.as_dict()["finite"] == 0.0


class HostReads:
    """Counts every host synchronisation a tensor offers (item, tolist, bool, float, int, index, numpy, cpu)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")

    def __init__(self, monkeypatch):
        self.count, self.on = 0, False
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))

    def _wrap(self, original):
        def counted(t, *args, **kwargs):
            if self.on:
                self.count += 1
            return original(t, *args, **kwargs)

        return counted

    def paused(self, fn):
        """``fn`` with counting off: the solver's own convergence checks are its documented syncs."""

        def run(*args, **kwargs):
            on, self.on = self.on, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.on = on

        return run


@pytest.mark.parametrize(
    "solver, debias, lm",
    [("sinkhorn", True, True), ("sinkhorn", False, False), ("dual", True, True), ("dual", False, False)],
)
def test_a_call_of_the_module_reads_the_device_exactly_once(monkeypatch, solver, debias, lm):
    reads = HostReads(monkeypatch)

    class Uncounted(SinkhornBackend):
        name = "torch"

        def __init__(self):
            self.inner = get_backend("torch")

        def solve(self, *args, **kwargs):
            return reads.paused(self.inner.solve)(*args, **kwargs)

    # φ's Adam step is fused on CPU as on CUDA, so it reads nothing back: it is counted like everything else.
    flag_reads = []
    monkeypatch.setattr(
        GOTDiagnostics, "read_flags", lambda d, _orig=GOTDiagnostics.read_flags: flag_reads.append(1) or _orig(d)
    )
    model = mlp()
    x, xa, y = batch()
    got = GOTRegularizer(model, "2", solver=solver, debias=debias, label_matching=lm, backend=Uncounted())
    for call in range(3):
        lc, la = model(x), model(xa)
        reads.count, reads.on = 0, True
        loss = got(lc, la, y)
        reads.on = False
        assert reads.count == 1, (call, reads.count)
        assert len(flag_reads) == call + 1
        loss.backward()
    assert solver == "sinkhorn" or got.potential.num_updates == 3
    # The counter sees reads: reading the diagnostics is one more.
    reads.count, reads.on = 0, True
    got.diagnostics.as_dict()
    reads.on = False
    assert reads.count == 1
