r"""Latent-space picture in the spirit of the GOT paper's Fig. 6.

For each run, the penultimate features z = g(x) (the layer GOT regularises, ``got_layer`` in the
run's config) of clean test points and of their PGD adversarial examples are embedded jointly
with t-SNE (scikit-learn) and drawn side by side, coloured by true class: dots = clean,
crosses = adversarial.  GOT-LM should pull each adversarial cross into the cluster of clean
dots of its own class; the panel titles give the fraction of adversarial points whose nearest
*other* clean point (in feature space) has their label, also written to ``<out>.json``.

    python -m examples.plot_latent runs/digits-trades-got_none runs/digits-trades-got_lm --out latent.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from got_reg import FeatureCapture

from ._io import write_json
from ._runner import num_threads, pick_device
from .attacks import eval_mode, pgd_linf
from .evaluate import load_run, load_test_set
from .report import method_name


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Output of ``layer`` for ``x`` (eval mode), flattened to (N, D)."""
    with FeatureCapture(model, layer) as capture, eval_mode(model):
        return capture.lookup(model(x))


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
    return emb[: len(x)], emb[len(x) :], y.cpu().numpy(), method_name(cfg), score


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


def plot_latent(
    run_dirs: Sequence[Path],
    out: Path,
    n: int = 300,
    steps: int = 20,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    device: torch.device | None = None,
    threads: int | None = 1,
) -> Path:
    """Side-by-side t-SNE panels, one per run.

    ``threads`` caps torch and the OpenMP/BLAS pools (threadpoolctl) for the duration: t-SNE on a
    few hundred points is fastest single-threaded and slows down 5-10x when its OpenMP threads
    compete with another process for the cores.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads), num_threads(threads):
        return _plot_latent(run_dirs, out, n, steps, seed, labels, device)


def _plot_latent(run_dirs, out, n, steps, seed, labels, device) -> Path:
    import matplotlib.pyplot as plt

    device = device or torch.device("cpu")
    panels, scores = [], {}
    for i, run in enumerate(run_dirs):
        clean, adv, y, name, score = latent_embedding(Path(run), n, steps, seed, device)
        scores[str(run)] = {"method": name, "adv_nn_agreement": score, "n": len(y), "pgd_steps": steps}
        panels.append(
            {
                "title": f"{labels[i] if labels else name} (adv-NN agreement {100 * score:.0f}%)",
                "clean": clean,
                "adv": adv,
                "y": y,
            }
        )
    fig = latent_figure(panels, steps)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    # The numbers behind the titles, for tables.
    write_json(Path(out).with_suffix(".json"), scores)
    return Path(out)


def latent_figure(panels: Sequence[dict], steps: int):
    """Side-by-side scatter panels (``title``, 2-d ``clean`` / ``adv`` points, labels ``y``); returns the figure.

    Colour = true class, with a key for the classes present; dots = clean, crosses = adversarial.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, panel in zip(axes[0], panels):
        colours = cmap(panel["y"] % 10)
        ax.scatter(panel["clean"][:, 0], panel["clean"][:, 1], c=colours, s=8, marker="o", alpha=0.7, linewidths=0)
        ax.scatter(panel["adv"][:, 0], panel["adv"][:, 1], c=colours, s=14, marker="x", alpha=0.8, linewidths=0.8)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    classes = sorted(set(int(c) for panel in panels for c in panel["y"]))
    handles = [
        plt.Line2D([], [], ls="", marker="o", color="k", label="clean"),
        plt.Line2D([], [], ls="", marker="x", color="k", label=f"PGD-{steps}"),
    ]
    handles += [plt.Line2D([], [], ls="", marker="s", markersize=7, color=cmap(c % 10), label=str(c)) for c in classes]
    ncol = len(handles) if len(panels) > 1 else 6  # one row under two or more panels, two under one
    fig.legend(
        handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False, handletextpad=0.2, columnspacing=1.0
    )
    fig.suptitle("t-SNE of penultimate features (colour = true class)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if ncol == len(handles) else 0.12, 1, 1))
    return fig


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
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
    path = plot_latent(
        [Path(r) for r in args.runs],
        Path(args.out),
        args.n,
        args.steps,
        args.seed,
        args.labels,
        pick_device(args.device),
        args.threads or None,
    )
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
