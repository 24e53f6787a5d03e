"""OTResult, marginal_error and with_grad: the envelope gradient is the plan, for any upstream gradient."""

import dataclasses

import pytest
import torch

from got_reg.solvers import OTResult, marginal_error, solve_sinkhorn, with_grad


def test_marginal_error_is_the_larger_l1_marginal_gap():
    P = torch.tensor([[0.5, 0.1, 0.0], [0.0, 0.2, 0.2]], dtype=torch.float64)  # rows 0.6/0.4, cols 0.5/0.3/0.2
    rows = abs(0.6 - 0.5) + abs(0.4 - 0.5)
    cols = abs(0.5 - 1 / 3) + abs(0.3 - 1 / 3) + abs(0.2 - 1 / 3)
    assert float(marginal_error(P)) == pytest.approx(max(rows, cols), abs=1e-15)
    assert float(marginal_error(torch.full((4, 5), 1 / 20, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-15)


def test_result_fields_are_detached_tensors_on_the_cost_device():
    g = torch.Generator().manual_seed(0)
    C = torch.rand(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    res = solve_sinkhorn(C, 0.2, tol=1e-9)
    assert isinstance(res, OTResult)
    for t in (res.value, res.plan, res.iterations, res.marginal_error, res.converged, *res.potentials):
        assert isinstance(t, torch.Tensor) and not t.requires_grad and t.device == C.device
    assert res.value.ndim == res.iterations.ndim == res.marginal_error.ndim == res.converged.ndim == 0
    assert res.iterations.dtype == torch.int64 and res.converged.dtype == torch.bool
    assert bool(res.converged) == bool(res.marginal_error <= 1e-9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.value = torch.zeros(())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_with_grad_envelope_and_detach(dtype):
    g = torch.Generator().manual_seed(1)
    C = torch.rand(5, 5, generator=g, dtype=dtype, requires_grad=True)
    res = solve_sinkhorn(C, 0.1, tol=1e-6)
    v = with_grad(C, res)
    assert v.dtype == dtype and float(v.detach()) == float(res.value)
    (grad,) = torch.autograd.grad(3.5 * v, C)  # dW/dC = P, times the upstream gradient
    torch.testing.assert_close(grad, 3.5 * res.plan.to(dtype))
    d = with_grad(C, res, "detach")
    assert not d.requires_grad and float(d) == float(res.value)


def test_a_stack_of_plans_gets_one_marginal_error_each():
    g = torch.Generator().manual_seed(2)
    plans = torch.rand(3, 4, 6, generator=g, dtype=torch.float64) / 24
    errs = marginal_error(plans)
    assert errs.shape == (3,)
    for P, e in zip(plans, errs):  # each plan's own gap, computed here by loops over rows and columns
        rows = sum(abs(float(P[i].sum()) - 1 / 4) for i in range(4))
        cols = sum(abs(float(P[:, j].sum()) - 1 / 6) for j in range(6))
        assert float(e) == pytest.approx(max(rows, cols), abs=1e-15)


def test_unbind_splits_a_stacked_result_into_views():
    k, B = 3, 4
    stacked = OTResult(
        torch.arange(k, dtype=torch.float64),
        torch.rand(k, B, B, dtype=torch.float64),
        torch.arange(k),
        torch.rand(k, dtype=torch.float64),
        torch.tensor([True, False, True]),
        (torch.rand(k, B, dtype=torch.float64), torch.rand(k, B, dtype=torch.float64)),
    )
    parts = stacked.unbind()
    assert len(parts) == k
    for i, r in enumerate(parts):
        assert r.plan.data_ptr() == stacked.plan[i].data_ptr()  # a view, not a copy
        assert float(r.value) == i and int(r.iterations) == i and bool(r.converged) == bool(stacked.converged[i])
        torch.testing.assert_close(r.potentials[1], stacked.potentials[1][i])
    no_pots = dataclasses.replace(stacked, potentials=None).unbind()
    assert all(r.potentials is None for r in no_pots)
