r"""Latent-space picture in the spirit of the GOT paper's Fig. 6.

For each run, the penultimate features z = g(x) (the layer GOT regularises, ``got_layer`` in the
run's config) of clean test points and of their PGD adversarial examples are embedded jointly
with t-SNE (scikit-learn) and drawn side by side, coloured by true class: dots = clean,
crosses = adversarial.  GOT-LM should pull each adversarial cross into the cluster of clean
dots of its own class; the panel titles give the fraction of adversarial points whose nearest
*other* clean point (in feature space) has their label, also written to ``<out>.json``.

    python examples/plot_latent.py runs/digits-trades-got_none runs/digits-trades-got_lm --out latent.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from attacks import eval_mode, pgd_linf  # type: ignore  # noqa: E402
    from common import num_threads, write_json  # type: ignore  # noqa: E402
    from evaluate import load_run, load_test_set, method_name  # type: ignore  # noqa: E402
else:
    from .attacks import eval_mode, pgd_linf
    from .common import num_threads, write_json
    from .evaluate import load_run, load_test_set, method_name


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Output of ``layer`` for ``x`` (eval mode), flattened to (N, D); the hook is removed after."""
    captured: List[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with eval_mode(model):
            model(x)
    finally:
        handle.remove()
    return captured[-1].flatten(1)


def latent_embedding(run_dir: Path, n: int, steps: int, seed: int, device: torch.device):
    """``(emb_clean, emb_adv, y, method, agreement)``: 2-d t-SNE of clean and PGD features of one run."""
    from sklearn.manifold import TSNE

    model, cfg = load_run(run_dir, device)
    x, y = load_test_set(cfg, n)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x_adv = pgd_linf(model, x, y, cfg["epsilon"], cfg["step_size"], steps, generator=gen)
    z_clean = penultimate_features(model, cfg["got_layer"], x)
    z_adv = penultimate_features(model, cfg["got_layer"], x_adv)
    score = adversarial_neighbour_agreement(z_clean, z_adv, y)
    z = torch.cat([z_clean, z_adv]).cpu().numpy()
    emb = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(z) - 1) / 3), random_state=seed).fit_transform(z)
    return emb[:len(x)], emb[len(x):], y.cpu().numpy(), method_name(cfg), score


def adversarial_neighbour_agreement(z_clean: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of adversarial features whose nearest clean feature (Euclidean, in the hooked
    layer, not in t-SNE space) has the adversarial example's true label.

    ``z_adv[i]`` is the attack on ``z_clean[i]``; that pair is excluded (the own clean point is
    usually the nearest and would make the score trivially high).  A number for what the paper's
    Fig. 6 shows: GOT-LM should push adversarial representations into the clean cluster of their
    own class.
    """
    dist = torch.cdist(z_adv.double(), z_clean.double())
    dist.fill_diagonal_(float("inf"))
    nearest = dist.argmin(1)
    return (y[nearest] == y).double().mean().item()


def plot_latent(run_dirs: Sequence[Path], out: Path, n: int = 300, steps: int = 20, seed: int = 0,
                labels: Optional[Sequence[str]] = None, device: Optional[torch.device] = None,
                threads: Optional[int] = 1) -> Path:
    """Side-by-side t-SNE panels, one per run.

    ``threads`` caps torch and the OpenMP/BLAS pools (threadpoolctl) for the duration: t-SNE on a
    few hundred points is fastest single-threaded and slows down 5-10x when its OpenMP threads
    compete with another process for the cores.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads), num_threads(threads):
        return _plot_latent(run_dirs, out, n, steps, seed, labels, device)


def _plot_latent(run_dirs, out, n, steps, seed, labels, device) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    device = device or torch.device("cpu")
    fig, axes = plt.subplots(1, len(run_dirs), figsize=(4.2 * len(run_dirs), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    scores = {}
    for i, run in enumerate(run_dirs):
        clean, adv, y, name, score = latent_embedding(Path(run), n, steps, seed, device)
        scores[str(run)] = {"method": name, "adv_nn_agreement": score, "n": len(y), "pgd_steps": steps}
        title = f"{labels[i] if labels else name} (adv-NN agreement {100 * score:.0f}%)"
        ax = axes[0, i]
        colours = cmap(y % 10)
        ax.scatter(clean[:, 0], clean[:, 1], c=colours, s=8, marker="o", alpha=0.7, linewidths=0)
        ax.scatter(adv[:, 0], adv[:, 1], c=colours, s=14, marker="x", alpha=0.8, linewidths=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], ls="", marker="o", color="k", label="clean"),
               plt.Line2D([], [], ls="", marker="x", color="k", label=f"PGD-{steps}")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("t-SNE of penultimate features (colour = true class)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    # The numbers behind the titles, for tables.
    write_json(Path(out).with_suffix(".json"), scores)
    return Path(out)


def main(argv: Optional[List[str]] = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, e.g. a baseline and a GOT run")
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--out", type=str, default="latent_tsne.png")
    p.add_argument("--n", type=int, default=300, help="test points per run")
    p.add_argument("--steps", type=int, default=20, help="PGD steps for the adversarial points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error("--labels needs one label per run")
    path = plot_latent([Path(r) for r in args.runs], Path(args.out), args.n, args.steps, args.seed,
                       args.labels, torch.device(args.device), args.threads or None)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
