"""The latent probe's tables, figures and report folder (no Dagster import).

From a ``probe.ProbeResult``: the seed's Table 1 (``accuracy_table_markdown``) and the detailed
table (``full_table_rows`` / ``full_table_markdown``), the confusion matrix of the best model,
a PCA scatter and per-class feature densities (PNG bytes made with :mod:`.plotting`), and
``build_probe_report``, which adds results.json and a self-contained report.html, written as one
folder, atomically, by ``ProbeReport.write``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imagenet_int8_assets.core.common.plotting import figure_png, pyplot
from imagenet_int8_assets.core.quality.probe import ProbeResult
from imagenet_int8_assets.core.common.files import write_folder

CHANCE_ROW = "Chance (most frequent)"
RANDOM_ROW = "Random (1/k)"

#: Class names are written on the confusion-matrix axes up to this many classes.
MAX_TICK_CLASSES = 30
#: Legends (PCA scatter, densities) are drawn up to this many classes.
MAX_LEGEND_CLASSES = 20


# --------------------------------------------------------------------------- tables


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def accuracy_table_markdown(result: ProbeResult, digits: int = 3) -> str:
    """The seed's Table 1: a row per model plus the chance rows; accuracy, then macro F1, per feature set.

    Columns: ``Model | Accuracy sample | Accuracy mean+std | Macro F1 sample | Macro F1 mean+std``
    (the mean+std columns only when that feature set was probed). "Chance (most frequent)" predicts
    the most frequent training class; "Random (1/k)" is the uniform guess's expected accuracy.
    """
    sets = result.feature_sets
    header = ["Model"] + [f"Accuracy {fs}" for fs in sets] + [f"Macro F1 {fs}" for fs in sets]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (2 * len(sets))) + "|"]
    for model in result.models:
        cells = [model]
        cells += [_fmt(result.accuracy(model, fs), digits) for fs in sets]
        cells += [_fmt(result.row(model, fs)["f1"], digits) for fs in sets]
        lines.append("| " + " | ".join(cells) + " |")
    chance = result.chance
    lines.append("| " + " | ".join([CHANCE_ROW] + [_fmt(chance["accuracy"], digits)] * len(sets)
                                   + [_fmt(chance["f1"], digits)] * len(sets)) + " |")
    lines.append("| " + " | ".join([RANDOM_ROW] + [_fmt(chance["uniform"], digits)] * len(sets)
                                   + ["–"] * len(sets)) + " |")
    return "\n".join(lines)


def full_table_rows(result: ProbeResult, digits: int = 4) -> list[dict[str, Any]]:
    """Detailed rows (model, features, accuracy, precision, recall, f1, seconds), then the chance row.

    The chance row (model "Chance (most frequent)", features "any") scores the most-frequent-class
    predictor on the same test split; its seconds are 0.
    """
    rows = []
    for r in result.table:
        rows.append({
            "model": r["model"],
            "features": r["features"],
            **{k: round(float(r[k]), digits) for k in ("accuracy", "precision", "recall", "f1")},
            "seconds": round(float(r["seconds"]), 3),
        })
    rows.append({
        "model": CHANCE_ROW,
        "features": "any",
        **{k: round(float(result.chance[k]), digits) for k in ("accuracy", "precision", "recall", "f1")},
        "seconds": 0.0,
    })
    return rows


def full_table_markdown(result: ProbeResult, digits: int = 3) -> str:
    """:func:`full_table_rows` as a markdown table."""
    rows = full_table_rows(result, digits=digits)
    keys = ["model", "features", "accuracy", "precision", "recall", "f1", "seconds"]
    lines = ["| " + " | ".join(keys) + " |", "|---|---|" + "---:|" * (len(keys) - 2)]
    for r in rows:
        lines.append("| " + " | ".join(
            str(r[k]) if isinstance(r[k], str) else (f"{r[k]:.{digits}f}" if k != "seconds" else f"{r[k]:.2f}")
            for k in keys) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def _class_colors(k: int) -> np.ndarray:
    plt = pyplot()
    if k <= 10:
        return np.asarray(plt.get_cmap("tab10").colors)[:k]
    if k <= 20:
        return np.asarray(plt.get_cmap("tab20").colors)[:k]
    return plt.get_cmap("turbo")(np.linspace(0.0, 1.0, k))


def _as_matrix(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim == 1:
        return x.reshape(-1, 1)
    return x.reshape(len(x), -1) if x.ndim > 2 else x


def confusion_matrix_png(result: ProbeResult, dpi: int = 100) -> bytes:
    """The best model's confusion matrix, normalized by row (true class), with a colorbar.

    Class names label the axes up to 30 classes; cell values are written up to 12.
    """
    plt = pyplot()
    cm = np.asarray(result.best["confusion_matrix"], dtype=np.float64)
    names = result.best["class_names"]
    totals = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    k = len(names)
    side = float(np.clip(2.5 + 0.35 * k, 4.5, 14.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= MAX_TICK_CLASSES:
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8 if k > 12 else 9)
        ax.set_yticks(range(k), names, fontsize=8 if k > 12 else 9)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if k <= 12:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{result.best['model']} on {result.best['features']} "
                 f"(accuracy {result.best['accuracy']:.2f}, {k} classes)")
    return figure_png(fig, dpi=dpi)


def pca_scatter_png(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    seed: int = 0,
    max_points: int = 5000,
    dpi: int = 100,
) -> bytes:
    """2-D PCA of ``features`` (N, D), one colour per class; a legend up to 20 classes.

    At most ``max_points`` points are drawn (seeded subsample) so large probes stay readable.
    """
    from sklearn.decomposition import PCA

    plt = pyplot()
    x = _as_matrix(features).astype(np.float64)
    labels = np.asarray(labels)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} feature rows for {len(labels)} labels")
    if len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), size=max_points, replace=False))
        x, labels = x[keep], labels[keep]
    n_comp = min(2, x.shape[1], len(x))
    pca = PCA(n_components=n_comp, random_state=seed)
    xy = pca.fit_transform(x)
    if n_comp < 2:
        xy = np.column_stack([xy, np.zeros(len(xy))])
    ratio = list(pca.explained_variance_ratio_) + [0.0] * (2 - n_comp)
    present = np.unique(labels)
    colors = _class_colors(len(present))
    fig, ax = plt.subplots(figsize=(7.5, 6))
    size = 12 if len(x) <= 2000 else 5
    for color, cls in zip(colors, present):
        sel = labels == cls
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=color, alpha=0.7, linewidths=0,
                   label=str(class_names[int(cls)]))
    if len(present) <= MAX_LEGEND_CLASSES:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=1.5, frameon=False)
    ax.set_xlabel(f"PC 1 ({ratio[0]:.1%} of variance)")
    ax.set_ylabel(f"PC 2 ({ratio[1]:.1%} of variance)")
    ax.set_title(f"PCA of the latent features ({len(x)} items, {len(present)} classes)")
    return figure_png(fig, dpi=dpi)


def _density(values: np.ndarray, grid: np.ndarray, bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a density curve: a Gaussian KDE where possible, else a normalized histogram."""
    if len(values) >= 2 and np.ptp(values) > 0:
        try:
            from scipy.stats import gaussian_kde

            return grid, gaussian_kde(values)(grid)
        except (ImportError, np.linalg.LinAlgError, ValueError):
            pass
    hist, edges = np.histogram(values, bins=bins, density=True)
    return 0.5 * (edges[:-1] + edges[1:]), hist


def feature_density_png(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    n_features: int = 4,
    max_classes: int = 20,
    feature_names: Sequence[str] | None = None,
    dpi: int = 100,
) -> bytes:
    """Per-class density of each of the first ``n_features`` features, one subplot per feature.

    A Gaussian KDE (scipy.stats.gaussian_kde) per class, or a histogram where scipy is missing or
    a class has too few / constant values. Only the first ``max_classes`` classes (by label) are
    drawn, with a legend up to 20, since a thousand overlapping curves say nothing.
    """
    plt = pyplot()
    x = _as_matrix(features).astype(np.float64)
    labels = np.asarray(labels)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} feature rows for {len(labels)} labels")
    n = max(1, min(int(n_features), x.shape[1]))
    present = np.unique(labels)
    shown = present[:max_classes]
    colors = _class_colors(len(shown))
    cols = min(n, 2) if n <= 4 else min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    for f in range(n):
        ax = axes[f // cols][f % cols]
        column = x[:, f]
        lo, hi = np.percentile(column, [0.5, 99.5]) if len(column) else (0.0, 1.0)
        pad = 0.1 * (hi - lo) if hi > lo else 1.0
        grid = np.linspace(lo - pad, hi + pad, 256)
        bins = np.linspace(lo - pad, hi + pad, 31)
        for color, cls in zip(colors, shown):
            gx, gy = _density(column[labels == cls], grid, bins)
            ax.plot(gx, gy, color=color, lw=1.3, label=str(class_names[int(cls)]))
        title = feature_names[f] if feature_names is not None else f"feature {f}"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("density")
    for f in range(n, rows * cols):
        axes[f // cols][f % cols].axis("off")
    if len(shown) <= MAX_LEGEND_CLASSES:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    suffix = f" (first {len(shown)} of {len(present)} classes)" if len(shown) < len(present) else ""
    fig.suptitle(f"Per-class density of the first {n} features{suffix}")
    fig.tight_layout()
    return figure_png(fig, dpi=dpi)


# --------------------------------------------------------------------------- the report folder


def notes_html(notes: Sequence[str]) -> str:
    """Each note as its own escaped paragraph ("-" without notes), for ``html_report``."""
    if not notes:
        return "<p>-</p>"
    return "\n".join(f"<p>{html.escape(note)}</p>" for note in notes)


@dataclass
class ProbeReport:
    images: dict[str, bytes]  # name -> PNG
    accuracy: str  # Table 1, markdown
    detailed: list[dict[str, Any]]  # full_table_rows
    results: dict[str, Any]  # results.json
    html: str

    def files(self) -> dict[str, bytes]:
        """Every file of the report folder, by name."""
        out = {f"{name}.png": png for name, png in self.images.items()}
        out["accuracy.md"] = self.accuracy.encode("utf-8")
        out["results.json"] = json.dumps(self.results, indent=2, default=float).encode("utf-8")
        out["report.html"] = self.html.encode("utf-8")
        return out

    def size(self) -> int:
        return sum(len(data) for data in self.files().values())

    def write(self, folder: str | os.PathLike) -> Path:
        """Replace ``folder`` with the report as a whole (``files.write_folder``)."""
        return write_folder(folder, self.files())


def build_probe_report(
    result: ProbeResult, features: np.ndarray, y: np.ndarray, class_names: Sequence[str]
) -> ProbeReport:
    """The probe's report: the three figures (PNG), accuracy.md, results.json (the detailed
    table, the chance row, the notes) and report.html, in memory (``ProbeReport.write``).

    ``features`` are the latents the PCA and densities show (the "sample" set), ``y`` their
    class indices 0..k-1 and ``class_names`` the k names.
    """
    from imagenet_int8_assets.core.quality.report_figures import html_report, html_table

    images = {
        "confusion_matrix": confusion_matrix_png(result),
        "pca": pca_scatter_png(features, y, class_names),
        "feature_density": feature_density_png(features, y, class_names, n_features=4),
    }
    accuracy = accuracy_table_markdown(result)
    detailed = full_table_rows(result)
    page = html_report(
        "Latent probe",
        [("Accuracy", html_table(detailed, list(detailed[0]))), ("Notes", notes_html(result.notes))],
        images,
    )
    results = {"table": detailed, "chance": result.chance, "notes": result.notes}
    return ProbeReport(images, accuracy, detailed, results, page)
