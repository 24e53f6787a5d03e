"""Print got-reg's agreement with POT's ot.solve and the learned dual's gap on a fixed batch.

    .venv/bin/python scripts/check_agreement.py

POT runs float64 `sinkhorn_log` at tol 1e-13 with grad="envelope"; got-reg's torch solver runs at
tol 1e-11. Random (non-adversarial) clouds are used because Sinkhorn converges there to machine
precision; near-diagonal adversarial plans converge only like 1/k (see benchmarks/).
"""

import warnings

import ot
import torch

from got_reg import GOTConvergenceWarning
from got_reg.functional import joint_cost, label_mask, ot_loss
from got_reg.solvers import KantorovichPotential, semidual, solve_sinkhorn

warnings.simplefilter("ignore", GOTConvergenceWarning)


def cloud(B, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z, za = torch.randn(B, D, generator=g, dtype=dtype), torch.randn(B, D, generator=g, dtype=dtype)
    lg, lga = 2 * torch.randn(B, 10, generator=g, dtype=dtype), 2 * torch.randn(B, 10, generator=g, dtype=dtype)
    return z, joint_cost(z, za, lg, lga)


print("| B | dtype | mask | |value − POT| | max |grad − POT plan| |")
print("|---|---|---|---|---|")
for B in (32, 128):
    for dtype in (torch.float64, torch.float32):
        for masked in (False, True):
            _, C = cloud(B, 64, seed=B, dtype=dtype)
            mask = label_mask(torch.arange(B) % 10) if masked else None
            Cref = C.double().clone()
            if mask is not None:
                Cref = Cref.masked_fill(~mask, float(Cref[mask].max()) + 100.0)
            Cref.requires_grad_(True)
            ref = ot.solve(Cref, reg=0.1, method="sinkhorn_log", max_iter=100000, tol=1e-13, grad="envelope")
            (gref,) = torch.autograd.grad(ref.value, Cref)
            C = C.clone().requires_grad_(True)
            v = ot_loss(C, theta=0.1, mask=mask, tol=1e-11 if dtype == torch.float64 else 1e-6, max_iter=100000)
            (g,) = torch.autograd.grad(v, C)
            print(
                f"| {B} | {str(dtype)[6:]} | {masked} | {abs(float(v.detach()) - float(ref.value.detach())):.1e} "
                f"| {float((g.double() - gref).abs().max()):.1e} |"
            )

print("\nLearned dual on a fixed batch (float64, θ = 0.1, Adam lr 0.05, one step per call, φ linear on raw z):")
print("| B | D | calls | Sinkhorn W | dual S(φ) | gap W − S |")
print("|---|---|---|---|---|---|")
for B, D in ((64, 128), (64, 16)):
    z, C = cloud(B, D, seed=7)
    W = float(solve_sinkhorn(C, 0.1, tol=1e-10, max_iter=100000).value)
    pot = KantorovichPotential(lr=0.05)
    pot.build(D, z.device, z.dtype)
    for calls in range(1, 3001):
        pot.ascend(z, C, 0.1, None, 1)
        if calls in (1, 100, 1000, 3000):
            S = float(semidual(C, pot(z), 0.1)[0])
            print(f"| {B} | {D} | {calls} | {W:.6f} | {S:.6f} | {W - S:.2e} |")
