"""Latent probe: how well can classes be told apart from the VAE latents alone?

This follows the CIFAR-10 latent study: encode the images, train five scikit-learn
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

This module holds the features (pooling, feature sets, the ``features.npz`` file) and the
training (``run_probe``); the tables, figures and report folder are in :mod:`.probe_report`.

Everything is seeded (split, subsample, every model), so the same inputs give the same table.
Pure core: no Dagster import.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imagenet_int8_assets.core.common.files import atomic_write_bytes

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

#: The probe needs this many latents in each class, so that a 25% stratified test split leaves
#: every class in both parts.
MIN_PER_CLASS = 4
FEATURES_FILE = "features.npz"


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


# --------------------------------------------------------------------------- the features file


def save_features(
    path: str | os.PathLike, labels: Sequence[int], class_names: Sequence[str], feature_sets: Mapping[str, np.ndarray]
) -> int:
    """Write ``features.npz`` atomically: ``labels`` (dataset label index per row), the names of
    the classes present in label order, and one ``features:<set>`` array per feature set.
    Returns the bytes written."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        labels=np.asarray(labels),
        class_names=np.array(list(class_names), dtype=str),
        **{f"features:{k}": v for k, v in feature_sets.items()},
    )
    atomic_write_bytes(path, buffer.getvalue())
    return buffer.getbuffer().nbytes


def load_features(path: str | os.PathLike) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """``save_features``' file back: (labels, class names, {feature set: array})."""
    with np.load(path, allow_pickle=False) as data:
        labels = data["labels"]
        class_names = [str(n) for n in data["class_names"]]
        features = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("features:")}
    return labels, class_names, features


def too_few_to_probe(labels: np.ndarray) -> str | None:
    """Why the probe cannot run on these labels (None: it can): it needs at least
    ``MIN_PER_CLASS`` latents in each of at least 2 classes for a stratified held-out split."""
    present, counts = np.unique(np.asarray(labels), return_counts=True)
    smallest = int(counts.min()) if len(counts) else 0
    if len(present) >= 2 and smallest >= MIN_PER_CLASS:
        return None
    return (
        f"skipped: the probe needs at least {MIN_PER_CLASS} latents in each of at least 2 classes "
        f"for a stratified held-out split; found {len(present)} class(es), the smallest with {smallest}"
    )
