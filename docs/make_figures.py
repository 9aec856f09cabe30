"""Draw the method pages' pictures from a quickstart run's logs.

    lightning-mim fit --config configs/quickstart/conmim.yaml
    python docs/make_figures.py --run-dir runs/quickstart/conmim

reads the run's CSV log (``<run-dir>/csv/version_*/metrics.csv``, the newest version) and the
grids that ``VisualDiagnostics`` wrote beside it (``diagnostics/step_*.png``), and writes

    docs/img/<name>_curves.png   kNN top-1 and the loss terms (or PSNR and codebook usage) per step
    docs/img/<name>_panels.png   the first and the last diagnostics grid, columns labelled

where ``<name>`` is the run folder's name (``conmim``, ``cmae``, ``mocov3``, ``mimco``,
``vq_tokenizer``, ``cim``). Each PNG records the files it was drawn from in its metadata
(``Source``). Needs matplotlib (the ``docs`` extra).
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt

IMG = Path(__file__).resolve().parent / "img"


@dataclass(frozen=True)
class Plot:
    """One subplot: its title, the logged keys drawn in it, and the y-axis label."""

    title: str
    keys: tuple[str, ...]
    ylabel: str = ""


KNN = Plot("kNN top-1 (1,000 held-out images)", ("val/knn_top1",), "%")
#: The subplots of each quickstart's curves figure.
CURVES: dict[str, tuple[Plot, ...]] = {
    "conmim": (KNN, Plot("training loss", ("train/loss",))),
    "cmae": (KNN, Plot("reconstruction", ("train/loss_rec",)), Plot("contrast", ("train/loss_con",))),
    "mocov3": (KNN, Plot("training loss", ("train/loss",))),
    "mimco": (KNN, Plot("patch level", ("train/loss_patch",)), Plot("image level", ("train/loss_image",))),
    "vq_tokenizer": (
        Plot("reconstruction PSNR", ("train/psnr",), "dB"),
        Plot("codebook usage per batch", ("train/codebook_usage",), "fraction of codes"),
    ),
    "cim": (KNN, Plot("generator cross-entropy", ("train/loss_gen",)), Plot("enhancer BCE", ("train/loss_enh",))),
}
#: The columns of each method's VisualDiagnostics grid, in order (lightning_mim.pictures).
PANELS: dict[str, tuple[str, ...]] = {
    "conmim": ("input", "mask", "similarity"),
    "cmae": ("input", "mask", "reconstruction"),
    "mimco": ("input", "mask", "similarity"),
    "cim": ("input", "mask", "corrupted", "revdet", "replaced"),
}


def read_metrics(run_dir: Path) -> tuple[Path, dict[str, list[tuple[int, float]]]]:
    """The newest CSV log of a run: key -> [(step, value)], in logged order."""
    logs = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not logs:
        raise SystemExit(f"make_figures: no {run_dir}/csv/version_*/metrics.csv (run the quickstart first)")
    series: dict[str, list[tuple[int, float]]] = {}
    with logs[-1].open() as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key not in ("epoch", "step") and value:
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return logs[-1], series


def draw_curves(name: str, metrics: Path, series: dict[str, list[tuple[int, float]]], out: Path) -> None:
    """One row of subplots, one per :class:`Plot`, steps on the x axis."""
    plots = CURVES[name]
    fig, axes = plt.subplots(1, len(plots), figsize=(3.6 * len(plots), 2.9), squeeze=False)
    for ax, plot in zip(axes[0], plots, strict=True):
        for key in plot.keys:
            if key not in series:
                raise SystemExit(f"make_figures: {metrics} has no {key!r} (logged: {sorted(series)})")
            steps, values = zip(*series[key], strict=True)
            marker = "o" if len(steps) <= 12 else None
            ax.plot(steps, values, marker=marker, markersize=4, linewidth=1.4, label=key)
            if marker:  # a few evaluations: print each value
                for step, value in zip(steps, values, strict=True):
                    ax.annotate(
                        f"{value:.1f}",
                        (step, value),
                        textcoords="offset points",
                        xytext=(0, 6),
                        ha="center",
                        fontsize=7,
                    )
        ax.set_title(plot.title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel(plot.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.margins(y=0.15)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110, metadata={"Source": str(metrics)})
    plt.close(fig)


def draw_panels(name: str, grids: list[Path], out: Path) -> None:
    """The first and the last diagnostics grid side by side, columns labelled."""
    columns = PANELS[name]
    first, last = grids[0], grids[-1]
    height, width = mpimg.imread(first).shape[:2]
    image_height = 4.8  # inches
    fig, axes = plt.subplots(1, 2, figsize=(2 * image_height * width / height + 1.0, image_height + 0.8))
    for ax, path in zip(axes, (first, last), strict=True):
        image = mpimg.imread(path)  # (H, W, 3) in [0, 1]; make_grid: padding 1 around every tile
        width = image.shape[1]
        tile = (width - 1) / len(columns) - 1
        if not tile.is_integer():
            raise SystemExit(f"make_figures: {path} is {width} px wide, not {len(columns)} columns {columns}")
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([1 + (tile + 1) * (i + 0.5) for i in range(len(columns))], columns, fontsize=8, rotation=30)
        plt.setp(ax.get_xticklabels(), ha="left", rotation_mode="anchor")
        ax.xaxis.tick_top()
        ax.set_yticks([])
        step = int(path.stem.split("_")[1])
        ax.set_xlabel(f"step {step}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Source": f"{first} and {last}"})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Draws the curves (and, where the method has them, the panels) of one quickstart run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a quickstart folder: runs/quickstart/conmim")
    parser.add_argument("--name", default=None, help="which quickstart (default: the folder's name)")
    parser.add_argument("--out", type=Path, default=IMG, help="output folder (default: docs/img)")
    args = parser.parse_args(argv)
    name = args.name or args.run_dir.name
    if name not in CURVES:
        raise SystemExit(f"make_figures: unknown quickstart {name!r}; one of {sorted(CURVES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    metrics, series = read_metrics(args.run_dir)
    curves = args.out / f"{name}_curves.png"
    draw_curves(name, metrics, series, curves)
    print(f"wrote {curves} from {metrics}")
    if name in PANELS:
        grids = sorted(metrics.parent.glob("diagnostics/step_*.png"))
        if not grids:
            raise SystemExit(f"make_figures: no diagnostics grids in {metrics.parent}/diagnostics")
        panels = args.out / f"{name}_panels.png"
        draw_panels(name, grids, panels)
        print(f"wrote {panels} from {grids[0].name} and {grids[-1].name}")
    for key, values in sorted(series.items()):
        if key.startswith("val/"):
            shown = ", ".join(f"{v:.1f}" if math.isfinite(v) else str(v) for _, v in values)
            print(f"{key}: {shown} at steps {[s for s, _ in values]}")


if __name__ == "__main__":
    main()
