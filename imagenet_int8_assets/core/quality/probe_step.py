"""The probe stages, as the assets and the benchmark's reference call them: ``probe_features`` (a
seeded subsample of pooled latents per class) and ``latent_probe`` (classifiers on them, and the
report)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.common.layout import MissingArtifact, probe_dir
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.core.quality.probe import FEATURES_FILE, build_feature_sets, load_features, too_few_to_probe
from imagenet_int8_assets.core.quality.reconstruct import choose_samples
from imagenet_int8_assets.core.source.sources import ClassLabels


def features_path(output: str | os.PathLike) -> Path:
    return probe_dir(output) / FEATURES_FILE


def report_dir(output: str | os.PathLike) -> Path:
    return probe_dir(output) / "report"


def probed_classes(keys: list[str], max_classes: int, seed: int) -> list[str]:
    """``keys``, or a seeded subset of ``max_classes`` of them (SVC and boosting scale with the class count)."""
    if len(keys) <= max_classes:
        return list(keys)
    return [keys[int(i)] for i in choose_samples(len(keys), max_classes, seed, "probe:classes")]


@dataclass
class ProbeFeatures:
    """The probe's features: ``labels`` (dataset label indices), ``class_names`` (of the labels
    present, in class order) and one array per feature set; ``incomplete`` names the feature sets
    left out because some classes lack them (``latent_only``: the classes that keep only the stored
    latent)."""

    labels: list[int]
    class_names: list[str]
    arrays: dict[str, np.ndarray]
    incomplete: list[str] = field(default_factory=list)
    latent_only: list[str] = field(default_factory=list)

    def nbytes(self) -> int:
        return len(self.labels) * 8 + sum(v.nbytes for v in self.arrays.values())

    def warning(self) -> str | None:
        if not self.incomplete:
            return None
        return (
            f"Not probing {', '.join(self.incomplete)}: {len(self.latent_only)} class(es) keep only the stored latent "
            f"(IMAGENET_INT8_LATENT_STORAGE=latent), e.g. {', '.join(self.latent_only[:5])}. To probe it, rebuild them "
            "with IMAGENET_INT8_LATENT_STORAGE=full (vae_latents for those partitions, then probe_features)."
        )


def collect_probe_features(
    output: str | os.PathLike, keys: list[str], labels: ClassLabels, per_class: int, pool: int, seed: int
) -> ProbeFeatures:
    """A seeded subsample of ``per_class`` latents of each of ``keys``, pooled to ``pool`` x ``pool``
    (``build_feature_sets``). Raises ``MissingArtifact`` when no class has a latent."""
    sets: dict[str, list[np.ndarray]] = {}
    y: list[int] = []
    latent_only: list[str] = []
    for key in keys:
        ids, arrays, _ = read_latents(output, key)
        pick = choose_samples(len(ids), per_class, seed, f"probe:{key}")
        if not len(pick):
            continue
        # mean and std exist only for VAEs with a posterior and IMAGENET_INT8_LATENT_STORAGE=full
        posterior = "mean" in arrays and "std" in arrays
        if "mean" not in arrays:
            latent_only.append(key)
        features = build_feature_sets(
            arrays["latent"][pick],
            arrays["mean"][pick] if posterior else None,
            arrays["std"][pick] if posterior else None,
            pool=pool,
        )
        for name, values in features.items():
            sets.setdefault(name, []).append(values)
        y.extend([labels.index[key]] * len(pick))
    if not y:
        raise MissingArtifact("No latents to probe: materialize vae_latents first.")
    # a feature set is probed only when every class has it (classes may be kept in different modes)
    incomplete = [name for name, parts in sets.items() if sum(len(v) for v in parts) != len(y)]
    present = set(y)
    return ProbeFeatures(
        labels=y,
        class_names=[labels.text[k] for k in keys if labels.index[k] in present],
        arrays={name: np.concatenate(parts) for name, parts in sets.items() if name not in incomplete},
        incomplete=incomplete,
        latent_only=latent_only,
    )


@dataclass(frozen=True)
class ProbeOutcome:
    """``latent_probe``'s result: ``note`` when there is too little to probe (an ordinary outcome
    for a small dataset), else the classifiers' ``result`` and its ``report`` (not yet written)."""

    note: str | None
    result: object | None = None
    report: object | None = None


def probe_latents(output: str | os.PathLike, seed: int) -> ProbeOutcome:
    """Train the probe's classifiers on the saved features; the report is built, not written
    (``outcome.report.write(report_dir(output))``)."""
    from imagenet_int8_assets.core.quality.probe import run_probe  # scikit-learn: imported where it runs
    from imagenet_int8_assets.core.quality.probe_report import build_probe_report

    labels, class_names, features = load_features(features_path(output))
    note = too_few_to_probe(labels)
    if note is not None:
        return ProbeOutcome(note)
    # labels are dataset indices (e.g. ImageNet's); the probe wants 0..k-1 with names in order
    y = np.searchsorted(np.unique(labels), labels)
    result = run_probe(features, y, class_names, seed=seed)
    return ProbeOutcome(None, result, build_probe_report(result, features["sample"], y, class_names))
