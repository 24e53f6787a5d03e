"""Mixed precision, float64, and torch.compile."""

import shutil
import warnings

import pytest
import torch
from torch import nn

from got_reg import GOTRegularizer
from got_reg.functional import got_loss
from got_reg.solvers import KantorovichPotential

needs_compiler = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="torch.compile (inductor) needs a C compiler"
)


def setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 10, generator=g, dtype=dtype)
    return model, x, x + 0.05 * torch.randn(16, 10, generator=g, dtype=dtype), torch.arange(16) % 5


def value_and_grads(model, got, x, xa, y, call=None):
    call = call or model
    lc, la = call(x), call(xa)
    loss = got(lc, la, y)
    model.zero_grad()
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("solver", ["sinkhorn", "dual"])
def test_bf16_autocast_runs_the_ot_in_fp32(solver, monkeypatch):
    """Called inside the user's autocast region, the regulariser builds the cost and solves in float32, and
    leaves the region as it found it (enabled): the cost it solves is the functional's on the float32
    upcasts of the same bf16 features and logits, computed outside autocast, and so is its value (the
    dual's exactly; Sinkhorn's to what its tolerance allows, since the two costs agree only to rounding)."""
    import got_reg.functional as functional
    from got_reg.functional import joint_cost

    model, x, xa, y = setup()
    got = GOTRegularizer(model, "3", solver=solver, label_matching=True, beta=1.0, debias=False)
    seen = []
    if solver == "sinkhorn":
        solve = got.config.sinkhorn.solve
        spy = lambda cost, *a, **k: seen.append(cost) or solve(cost, *a, **k)  # noqa: E731
        monkeypatch.setattr(got.config.sinkhorn, "solve", spy)
    else:
        semidual = functional.semidual
        spy = lambda cost, *a, **k: seen.append(cost) or semidual(cost, *a, **k)  # noqa: E731
        monkeypatch.setattr(functional, "semidual", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lc, la = model(x), model(xa)
        loss = got(lc, la, y)
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.matmul(x, x.T).dtype == torch.bfloat16  # and still in effect for the user's next op
    assert [c.dtype for c in seen] == [torch.float32]
    z, za = got._capture.lookup(lc), got._capture.lookup(la)
    assert lc.dtype == z.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    with torch.no_grad():
        cost = joint_cost(z.float(), za.float(), lc.float(), la.float())
        torch.testing.assert_close(seen[0].detach(), cost, rtol=1e-6, atol=1e-6)
        ref = got_loss(
            z.float(),
            za.float(),
            lc.float(),
            la.float(),
            y,
            label_matching=True,
            beta=1.0,
            debias=False,
            solver=solver,
            potential=KantorovichPotential() if solver == "dual" else None,
        )
    rel = 1e-6 if solver == "dual" else 1e-3
    assert float(loss.detach()) == pytest.approx(float(ref), rel=rel, abs=1e-7)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)
    if solver == "sinkhorn":
        # Close to the fp32 value: only the bf16 forward differs.
        ref32 = GOTRegularizer(model, "3", label_matching=True, beta=1.0, debias=False)
        v32 = float(ref32(model(x), model(xa), y).detach())
        assert float(loss.detach()) == pytest.approx(v32, rel=0.1, abs=1e-2)


def test_float64_model_runs_the_ot_in_float64():
    model, x, xa, y = setup(torch.float64)
    got = GOTRegularizer(model, "3", label_matching=True, tol=1e-9, max_iter=5000)
    lc, la = model(x), model(xa)
    loss = got(lc, la, y)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.float64 and torch.isfinite(p.grad).all() for p in model.parameters())
    # The same network in float32 gives the same value to fp32 accuracy. The divergence W_xy − ½W_xx − ½W_yy
    # is ~100 times smaller than its terms here (clean and adversarial inputs are close), so the fp32 error
    # is measured against the terms: 1e-5 of their size is a few hundred fp32 ulps (and tol = 1e-5).
    m32 = setup()[0]
    got32 = GOTRegularizer(m32, "3", label_matching=True, tol=1e-5)
    v32 = float(got32(m32(x.float()), m32(xa.float()), y).detach())
    d = got32.diagnostics
    terms = abs(float(d.w_xy)) + 0.5 * sum(abs(float(r.value)) for r in d.self_terms)
    assert terms > 10 * abs(v32)  # the cancellation that the tolerance accounts for
    assert float(loss.detach()) == pytest.approx(v32, abs=1e-5 * terms)


@pytest.mark.slow  # inductor compiles C++ with gcc: the slowest unit test after the 10k-calls one
@needs_compiler
def test_compiled_model_gives_the_eager_value_and_gradients_in_one_graph():
    from torch._dynamo.utils import counters

    model, x, xa, y = setup()
    eager = GOTRegularizer(model, "3", lam=5.0)  # a large feature weight: the feature path must carry grad
    v_eager, g_eager = value_and_grads(model, eager, x, xa, y)
    eager.remove()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    got = GOTRegularizer(compiled, "_orig_mod.3", lam=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(2):  # the second call must reuse the graph (no recompilation)
            v, g = value_and_grads(model, got, x, xa, y, call=compiled)
    assert v == pytest.approx(v_eager, rel=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The layer hook is traced into the graph, the model-level hooks run on the wrapper outside it:
    # one graph, no graph break, and nothing fell back to eager.
    assert sum(counters["graph_break"].values()) == 0
    assert sum(counters["unimplemented"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
    assert got.num_captured == 0


def test_in_place_compile_and_a_compiled_outer_module_give_the_eager_value():
    """``model.compile()`` and compiling a module that contains the hooked model: correct values.

    In the first case dynamo traces the model-level hook (id()/weakref book-keeping), cannot handle it
    and runs that frame eagerly (inner frames are still compiled); the value is still the eager one.
    """
    model, x, xa, y = setup()
    eager = GOTRegularizer(model, "3")
    v_eager = float(eager(model(x), model(xa), y).detach())
    eager.remove()
    torch._dynamo.reset()
    outer = torch.compile(nn.Sequential(nn.Identity(), model), backend="eager")
    got = GOTRegularizer(model, "3")
    assert float(got(outer(x), outer(xa), y).detach()) == pytest.approx(v_eager, rel=1e-6)
    got.remove()
    torch._dynamo.reset()
    model.compile(backend="eager")
    try:
        got = GOTRegularizer(model, "3")
        assert float(got(model(x), model(xa), y).detach()) == pytest.approx(v_eager, rel=1e-6)
        got.remove()
    finally:
        torch._dynamo.reset()


def test_hooks_added_after_the_first_compiled_call_are_reported():
    """Dynamo does not guard on hooks: a graph compiled before the regulariser existed runs no new hook."""
    model, x, xa, y = setup()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    got = GOTRegularizer(compiled, "3")
    with pytest.raises(LookupError, match=r"layer '3' did not run .*torch._dynamo.reset\(\)"):
        got(compiled(x), compiled(xa), y)
    torch._dynamo.reset()  # the documented way out
    assert float(got(compiled(x), compiled(xa), y).detach()) == pytest.approx(
        float(GOTRegularizer(model, "3")(model(x), model(xa), y).detach()), rel=1e-6
    )
    got.remove()
    torch._dynamo.reset()
