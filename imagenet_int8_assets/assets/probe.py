"""The latent probe (the CIFAR-10 latent study as assets): how well classes can be told apart from latents."""

import numpy as np
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.manifest import (
    dataset_classes,
    recorded_labels_or_fail,
    require_usable_images_or_fail,
)
from imagenet_int8_assets.assets.metadata import PROBE_GROUP, markdown_table
from imagenet_int8_assets.core.common.plotting import markdown_image
from imagenet_int8_assets.core.quality.probe import (
    FEATURES_FILE,
    build_feature_sets,
    load_features,
    save_features,
    too_few_to_probe,
)
from imagenet_int8_assets.core.quality.reconstruct import choose_samples
from imagenet_int8_assets.core.source.manifest import COUNT_COLUMNS, read_manifest
from imagenet_int8_assets.core.common.layout import MissingArtifact, probe_dir
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.resources import ImagenetInt8Settings


@asset(
    name="probe_features",
    group_name=PROBE_GROUP,
    deps=["vae_latents"],
    kinds={"numpy"},
    description=(
        "A seeded subsample of IMAGENET_INT8_PROBE_PER_CLASS latents per class (of at most "
        "IMAGENET_INT8_PROBE_MAX_CLASSES classes), average-pooled "
        "to IMAGENET_INT8_PROBE_POOL x IMAGENET_INT8_PROBE_POOL and flattened: the stored "
        "latent ('sample') and, when the VAE has a posterior and the latents keep it "
        "(IMAGENET_INT8_LATENT_STORAGE=full), mean and std ('mean+std')."
    ),
)
def probe_features(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    require_usable_images_or_fail(read_manifest(settings.output_path, COUNT_COLUMNS))
    settings.require_recorded_settings_or_fail()
    all_keys = dataset_classes(context.instance, settings).in_dataset
    labels = recorded_labels_or_fail(settings, all_keys)
    keys = all_keys
    if len(all_keys) > settings.probe_max_classes:  # SVC and boosting scale with the class count
        chosen = choose_samples(len(all_keys), settings.probe_max_classes, settings.seed, "probe:classes")
        keys = [all_keys[int(i)] for i in chosen]
        context.log.info(f"Probing a seeded subset of {len(keys)} of {len(all_keys)} classes")
    sets: dict[str, list[np.ndarray]] = {}
    y, latent_only = [], []
    for key in keys:
        ids, arrays, _ = read_latents(settings.output_path, key)
        pick = choose_samples(len(ids), settings.probe_per_class, settings.seed, f"probe:{key}")
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
            pool=settings.probe_pool,
        )
        for name, values in features.items():
            sets.setdefault(name, []).append(values)
        y.extend([labels.index[key]] * len(pick))
    if not y:
        raise MissingArtifact("No latents to probe: materialize vae_latents first.")
    # a feature set is probed only when every class has it (classes may be kept in different modes)
    incomplete = [name for name, parts in sets.items() if sum(len(v) for v in parts) != len(y)]
    if incomplete:  # classes built in both modes: rebuilding the latent-only ones brings the feature set back
        context.log.warning(
            f"Not probing {', '.join(incomplete)}: {len(latent_only)} class(es) keep only the stored latent "
            f"(IMAGENET_INT8_LATENT_STORAGE=latent), e.g. {', '.join(latent_only[:5])}. To probe it, rebuild them "
            "with IMAGENET_INT8_LATENT_STORAGE=full (vae_latents for those partitions, then probe_features)."
        )
    arrays = {name: np.concatenate(parts) for name, parts in sets.items() if name not in incomplete}
    present = sorted(set(y))
    names = [labels.text[k] for k in keys if labels.index[k] in present]
    path = probe_dir(settings.output_path) / FEATURES_FILE
    space = SpaceNeeds("probe_features", settings.output_path)
    space.writing(1, len(y) * 8 + sum(v.nbytes for v in arrays.values()))
    with space.guard():
        save_features(path, y, names, arrays)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "samples": len(y),
            "classes": len(present),
            "feature_sets": MetadataValue.json({k: list(v.shape) for k, v in arrays.items()}),
        }
    )

@asset(
    name="latent_probe",
    group_name=PROBE_GROUP,
    deps=[probe_features],
    kinds={"sklearn"},
    description=(
        "Logistic regression, k-NN (k=25), SVC, histogram gradient boosting and random forest "
        "trained on the probe features with a stratified held-out split: an accuracy table in "
        "the shape of the CIFAR-10 latent study's Table 1 (plus precision/recall/F1 and a chance row), the best "
        "model's confusion matrix, a PCA scatter and per-feature densities."
    ),
)
def latent_probe(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    from imagenet_int8_assets.core.quality.probe import run_probe
    from imagenet_int8_assets.core.quality.probe_report import build_probe_report

    labels, class_names, features = load_features(probe_dir(settings.output_path) / FEATURES_FILE)
    note = too_few_to_probe(labels)
    if note is not None:  # an ordinary outcome for a small dataset (the metadata's status says it too)
        context.log.info(f"latent_probe {note}")
        return MaterializeResult(metadata={"status": note})
    # labels are dataset indices (e.g. ImageNet's); the probe wants 0..k-1 with names in order
    y = np.searchsorted(np.unique(labels), labels)
    result = run_probe(features, y, class_names, seed=settings.seed)
    for note in result.notes:  # caveats that describe the result (also in the report): information, nothing to fix
        context.log.info(note)
    report = build_probe_report(result, features["sample"], y, class_names)
    images, accuracy, detailed = report.images, report.accuracy, report.detailed
    space = SpaceNeeds("latent_probe", settings.output_path)
    space.writing(1, report.size())
    with space.guard():
        report.write(probe_dir(settings.output_path) / "report")
    best = result.best
    return MaterializeResult(
        metadata={
            "report": MetadataValue.path(str(probe_dir(settings.output_path) / "report" / "report.html")),
            "accuracy": MetadataValue.md(accuracy),
            "details": MetadataValue.md(markdown_table(detailed)),
            "best_model": f"{best['model']} on {best['features']}",
            "best_accuracy": float(best["accuracy"]),
            "chance_accuracy": float(result.chance["accuracy"]),
            "uniform_accuracy": float(result.chance["uniform"]),
            "confusion_matrix": MetadataValue.md(markdown_image(images["confusion_matrix"], "confusion matrix")),
            "pca": MetadataValue.md(markdown_image(images["pca"], "PCA of the latents")),
            "feature_density": MetadataValue.md(markdown_image(images["feature_density"], "feature densities")),
        }
    )

