"""Latent probe: how well can classes be told apart from the VAE latents alone?

This follows the CIFAR-10 latent study (seed 001): encode the images, train five scikit-learn
classifiers on the latents (Logistic Regression, Random Forest, KNN with k=25, an RBF SVM and
HistGradientBoosting), once on the stored ``.sample()`` latent and once on the concatenated
distribution parameters ("mean+std"), and report accuracy with macro precision/recall/F1 next to
a chance level (Table 1), the confusion matrix of the best model (Figure 2), a 2-D PCA scatter
coloured by class (Figure 3) and per-class densities of the first features (Figure 4).

Features are average-pooled before the probe (:func:`pool_features`): an ImageNet latent is
4x32x32 = 4096 values, and five classifiers on 4096-dim features x 1000 classes (SVM, boosting
with one tree per class and iteration) would not train on a CPU in minutes. Pooling to 8x8 keeps
256 features per latent (512 for mean+std), which is what the probe is about: whether the coarse
latent statistics carry the class, not how far a large model can push it.

Everything is seeded (split, subsample, every model), so the same inputs give the same table.
Pure core: no Dagster import; figures are PNG bytes made with :mod:`.plotting`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imagenet_int8_assets.core.plotting import figure_png, pyplot

SAMPLE = "sample"
MEAN_STD = "mean+std"

LOGISTIC = "Logistic Regression"
FOREST = "Random Forest"
KNN = "KNN (n=25)"
SVM = "SVM (RBF)"
HGB = "HistGradientBoosting"
#: The five models of the seed's Table 1, in its order (LightGBM/XGBoost are not dependencies).
DEFAULT_MODELS: tuple[str, ...] = (LOGISTIC, FOREST, KNN, SVM, HGB)

KNN_NEIGHBORS = 25
LOGISTIC_MAX_ITER = 2000
HGB_MAX_ITER = 50
FOREST_TREES = 100

CHANCE_ROW = "Chance (most frequent)"
RANDOM_ROW = "Random (1/k)"

#: Class names are written on the confusion-matrix axes up to this many classes.
MAX_TICK_CLASSES = 30
#: Legends (PCA scatter, densities) are drawn up to this many classes.
MAX_LEGEND_CLASSES = 20


# --------------------------------------------------------------------------- features


def pool_features(latents: np.ndarray, size: int) -> np.ndarray:
    """Average-pool ``latents`` (N, C, H, W) to (N, C, size, size) and flatten to (N, C*size*size).

    ``size`` must divide H and W; ``size == H == W`` is no pooling (a plain flatten, C order).
    Why pool: a full ImageNet latent is 4x32x32 = 4096 features, and the probe's models (an RBF
    SVM, gradient boosting with one tree per class per iteration) on 4096 dims x 1000 classes would
    not train on a CPU in minutes; 8x8 pooling leaves 256 features that still carry the coarse
    per-region statistics the probe asks about. Returns float32 (uint8 input is averaged as numbers).
    """
    x = np.asarray(latents)
    if x.ndim != 4:
        raise ValueError(f"latents must be (N, C, H, W), got shape {x.shape}")
    n, c, h, w = x.shape
    size = int(size)
    if size <= 0 or h % size or w % size:
        raise ValueError(f"pool size {size} must be positive and divide the latent's H={h} and W={w}")
    x = x.astype(np.float32, copy=False)
    if size == h and size == w:
        return x.reshape(n, c * h * w).copy()
    pooled = x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5), dtype=np.float64)
    return pooled.astype(np.float32).reshape(n, c * size * size)


def _pool_or_flatten(x: np.ndarray, pool: int | None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"latents must be (N, C, H, W), got shape {x.shape}")
    h, w = x.shape[2:]
    if pool is None or (pool >= h and pool >= w):
        return pool_features(x, h) if h == w else x.astype(np.float32).reshape(len(x), -1)
    return pool_features(x, pool)


def build_feature_sets(
    sample: np.ndarray,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    pool: int | None = 8,
) -> dict[str, np.ndarray]:
    """Feature matrices for the probe, as in the seed: ``"sample"`` and optionally ``"mean+std"``.

    ``sample`` is the stored latent (N, C, H, W); ``mean`` and ``std`` are the encoder's
    distribution parameters with the same shape. ``"mean+std"`` (both given) is the pooled mean
    next to the pooled std, twice the features of ``"sample"``. Latents are pooled to
    ``pool`` x ``pool`` (:func:`pool_features`); ``pool=None`` or a pool at least the latent size
    means no pooling.
    """
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: give both for the 'mean+std' features, or neither")
    sets = {SAMPLE: _pool_or_flatten(sample, pool)}
    if mean is not None and std is not None:
        mean, std = np.asarray(mean), np.asarray(std)
        if mean.shape != np.shape(sample) or std.shape != np.shape(sample):
            raise ValueError(
                f"mean {mean.shape} and std {std.shape} must have the sample's shape {np.shape(sample)}"
            )
        sets[MEAN_STD] = np.concatenate([_pool_or_flatten(mean, pool), _pool_or_flatten(std, pool)], axis=1)
    return sets


def stratified_subsample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``per_class`` items of every class, drawn with ``seed``.

    Classes with fewer items keep all of them. Same labels and seed -> same indices.
    """
    labels = np.asarray(labels)
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) > per_class:
            members = rng.choice(members, size=per_class, replace=False)
        keep.append(members)
    if not keep:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(keep)).astype(np.int64)


# --------------------------------------------------------------------------- probe


@dataclass
class ProbeResult:
    """What :func:`run_probe` measured.

    ``table``: one row per (model, feature set): model, features, accuracy, and macro precision,
    recall, F1 (zero_division=0) on the test split, and the model's fit seconds.
    ``chance``: the most-frequent-training-class predictor on the same test split (accuracy,
    precision, recall, f1, class) and ``uniform`` = 1/n_classes.
    ``best``: the most accurate (model, feature set) with its confusion matrix (counts, rows = true
    class, columns = predicted, in the order of ``class_names``), and its accuracy.
    ``notes``: caveats (split fallback, capped k, unconverged models, boosting settings).
    ``class_names`` / ``class_labels``: the classes present in the probed labels, in label order.
    """

    table: list[dict[str, Any]]
    chance: dict[str, Any]
    best: dict[str, Any]
    notes: list[str]
    feature_sets: list[str]
    models: list[str]
    class_names: list[str]
    class_labels: np.ndarray
    n_train: int
    n_test: int
    seed: int
    test_fraction: float
    stratified: bool
    train_index: np.ndarray = field(repr=False)
    test_index: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)

    def row(self, model: str, features: str) -> dict[str, Any]:
        for r in self.table:
            if r["model"] == model and r["features"] == features:
                return r
        raise KeyError((model, features))

    def accuracy(self, model: str, features: str) -> float:
        return float(self.row(model, features)["accuracy"])

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (arrays as lists) for metadata or a report file."""
        best = dict(self.best)
        best["confusion_matrix"] = np.asarray(best["confusion_matrix"]).tolist()
        return {
            "table": [dict(r) for r in self.table],
            "chance": dict(self.chance),
            "best": best,
            "notes": list(self.notes),
            "feature_sets": list(self.feature_sets),
            "models": list(self.models),
            "class_names": list(self.class_names),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "stratified": self.stratified,
        }


def make_model(name: str, n_train: int, seed: int):
    """One of :data:`DEFAULT_MODELS`, configured as the probe uses it (seeded, single-threaded)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    if name == LOGISTIC:
        return LogisticRegression(max_iter=LOGISTIC_MAX_ITER, random_state=seed)
    if name == FOREST:
        return RandomForestClassifier(n_estimators=FOREST_TREES, n_jobs=1, random_state=seed)
    if name == KNN:
        return KNeighborsClassifier(n_neighbors=max(1, min(KNN_NEIGHBORS, n_train)), n_jobs=1)
    if name == SVM:
        return SVC(kernel="rbf", random_state=seed)
    if name == HGB:
        return HistGradientBoostingClassifier(max_iter=HGB_MAX_ITER, early_stopping=False, random_state=seed)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(DEFAULT_MODELS)}")


def _model_specs(models, n_train: int, seed: int) -> list[tuple[str, Any]]:
    from sklearn.base import clone

    if models is None:
        models = DEFAULT_MODELS
    if isinstance(models, Mapping):
        return [(str(name), clone(est)) for name, est in models.items()]
    if isinstance(models, str):
        models = [models]
    return [(name, make_model(name, n_train, seed)) for name in models]


def _split(labels: np.ndarray, test_fraction: float, seed: int, notes: list[str]):
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    try:
        train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)
        return np.sort(train), np.sort(test), True
    except ValueError as err:
        notes.append(f"Stratified split impossible ({err}); fell back to a plain seeded random split, "
                     "so some classes may be missing from the training or test split.")
        train, test = train_test_split(index, test_size=test_fraction, random_state=seed)
        return np.sort(train), np.sort(test), False


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def run_probe(
    features: Mapping[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    test_fraction: float = 0.25,
    seed: int = 0,
    models: Sequence[str] | Mapping[str, Any] | None = None,
) -> ProbeResult:
    """Train every model on every feature set and score it on one shared held-out split.

    ``features`` maps a feature-set name to an (N, D) matrix (see :func:`build_feature_sets`);
    ``labels`` are N integers indexing ``class_names``. The split is stratified
    (``train_test_split(stratify=labels)``) when every class has enough items, otherwise a plain
    seeded split with a note. Features are standardized (StandardScaler fitted on the training
    split). ``models``: names from :data:`DEFAULT_MODELS` (default: all five), or a mapping
    name -> unfitted scikit-learn estimator (cloned before use). Everything is seeded by ``seed``.

    Cost grows fast with classes: HistGradientBoosting fits one tree per class per iteration and
    the SVM is one-vs-one, so on ImageNet restrict the classes or the models rather than the pool.
    """
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import confusion_matrix
    from sklearn.preprocessing import StandardScaler

    if not features:
        raise ValueError("no feature sets given")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers indexing class_names, got dtype {labels.dtype}")
    class_names = [str(c) for c in class_names]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)}) to index class_names")
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"the probe needs at least 2 classes, got {len(present)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    matrices = {}
    for name, x in features.items():
        x = np.asarray(x)
        x = x.reshape(len(x), -1) if x.ndim != 2 else x
        if len(x) != len(labels):
            raise ValueError(f"feature set {name!r} has {len(x)} rows for {len(labels)} labels")
        matrices[name] = x

    notes: list[str] = []
    train, test, stratified = _split(labels, test_fraction, seed, notes)
    y_train, y_test = labels[train], labels[test]
    if len(np.unique(y_train)) < 2:
        raise ValueError("the training split holds a single class; give more items per class")

    specs = _model_specs(models, len(train), seed)
    model_names = [name for name, _ in specs]
    for name, est in specs:
        if name == KNN and est.n_neighbors < KNN_NEIGHBORS:
            notes.append(f"{KNN}: n_neighbors capped at {est.n_neighbors}, the training-set size.")
        if name == HGB:
            notes.append(f"{HGB}: max_iter={est.max_iter}, early_stopping off (no random validation "
                         "split inside the fit), so the result is reproducible and the cost bounded.")

    table: list[dict[str, Any]] = []
    predictions: dict[tuple[str, str], np.ndarray] = {}
    unconverged: set[tuple[str, str]] = set()
    for fs, x in matrices.items():
        scaler = StandardScaler().fit(x[train])
        x_train = scaler.transform(x[train])
        x_test = scaler.transform(x[test])
        for name, template in specs:
            est = clone(template)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                start = time.perf_counter()
                est.fit(x_train, y_train)
                seconds = time.perf_counter() - start
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                unconverged.add((name, fs))
            y_pred = est.predict(x_test)
            predictions[(name, fs)] = y_pred
            table.append({"model": name, "features": fs, **_scores(y_test, y_pred), "seconds": float(seconds)})
    for name, fs in sorted(unconverged):
        notes.append(f"{name} on {fs}: did not converge (ConvergenceWarning); its score is a lower bound.")
    notes.append(f"Features standardized on the training split; {len(train)} train / {len(test)} test items, "
                 f"{len(present)} classes, seed {seed}.")

    values, counts = np.unique(y_train, return_counts=True)
    most = int(values[np.argmax(counts)])  # ties -> the smallest label
    chance = {
        "most_frequent_class": class_names[most],
        "most_frequent_label": most,
        **_scores(y_test, np.full_like(y_test, most)),
        "uniform": 1.0 / len(present),
        "n_classes": int(len(present)),
    }

    best_row = max(table, key=lambda r: r["accuracy"])  # first of equals, in table order
    cm = confusion_matrix(y_test, predictions[(best_row["model"], best_row["features"])], labels=present)
    best = {
        "model": best_row["model"],
        "features": best_row["features"],
        "accuracy": best_row["accuracy"],
        "confusion_matrix": cm,
        "class_names": [class_names[int(c)] for c in present],
    }
    return ProbeResult(
        table=table,
        chance=chance,
        best=best,
        notes=notes,
        feature_sets=list(matrices),
        models=model_names,
        class_names=[class_names[int(c)] for c in present],
        class_labels=present,
        n_train=int(len(train)),
        n_test=int(len(test)),
        seed=int(seed),
        test_fraction=float(test_fraction),
        stratified=stratified,
        train_index=train,
        test_index=test,
        y_test=y_test,
    )


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
