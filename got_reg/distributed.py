"""Gathering the global batch under ``torch.distributed`` while keeping the local gradient.

``all_gather`` returns tensors with no autograd history. The standard remedy (SimCLR, torchmetrics)
is to gather under ``no_grad`` and put the local tensor itself back in its slot: every rank then sees
the whole batch, and the gradient flows into the rank's own samples. Each rank computes the same
global W, but its backward reaches only its local part; DDP then *averages* gradients over R ranks.
Scaling the loss by R (done by :class:`got_reg.GOTRegularizer` when gathering) makes the averaged
gradient equal to that of the single-process global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """R if a process group is up, else 1 (so code without one runs locally with no error)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from all ranks along dim 0 (shards may differ in size); the local rows keep their grad."""
    if world_size() == 1:
        return t
    R, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(R)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    with torch.no_grad():
        padded = t.new_zeros((longest,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
        parts: list[torch.Tensor] = [torch.empty_like(padded) for _ in range(R)]
        dist.all_gather(parts, padded.contiguous())
    parts = [p[:c] for p, c in zip(parts, counts)]
    parts[rank] = t
    return torch.cat(parts, dim=0)


def rank_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over the ranks (``value`` itself without a process group): a decision to skip a
    collective must be collective, and a code (0 all well, 1 skip, 2 non-finite) says which one every rank takes."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
