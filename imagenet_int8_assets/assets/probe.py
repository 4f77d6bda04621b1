"""The latent probe (the CIFAR-10 latent study as assets): how well classes can be told apart from latents."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.manifest import (
    dataset_classes,
    recorded_labels_or_fail,
    require_usable_images_or_fail,
)
from imagenet_int8_assets.assets.metadata import PROBE_GROUP, markdown_table
from imagenet_int8_assets.core.common.plotting import markdown_image
from imagenet_int8_assets.core.quality.probe import save_features
from imagenet_int8_assets.core.quality.probe_step import (
    collect_probe_features,
    features_path,
    probe_latents,
    probed_classes,
    report_dir,
)
from imagenet_int8_assets.core.source.manifest import COUNT_COLUMNS, read_manifest
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
    keys = probed_classes(all_keys, settings.probe_max_classes, settings.seed)
    if len(keys) < len(all_keys):
        context.log.info(f"Probing a seeded subset of {len(keys)} of {len(all_keys)} classes")
    features = collect_probe_features(
        settings.output_path, keys, labels, settings.probe_per_class, settings.probe_pool, settings.seed
    )
    warning = features.warning()
    if warning:  # classes built in both modes: rebuilding the latent-only ones brings the set back
        context.log.warning(warning)
    path = features_path(settings.output_path)
    space = SpaceNeeds("probe_features", settings.output_path)
    space.writing(1, features.nbytes())
    with space.guard():
        save_features(path, features.labels, features.class_names, features.arrays)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "samples": len(features.labels),
            "classes": len(set(features.labels)),
            "feature_sets": MetadataValue.json({k: list(v.shape) for k, v in features.arrays.items()}),
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
    outcome = probe_latents(settings.output_path, settings.seed)
    if outcome.note is not None:  # an ordinary outcome for a small dataset (the metadata's status says it too)
        context.log.info(f"latent_probe {outcome.note}")
        return MaterializeResult(metadata={"status": outcome.note})
    result, report = outcome.result, outcome.report
    for note in result.notes:  # caveats that describe the result (also in the report): information, nothing to fix
        context.log.info(note)
    images, accuracy, detailed = report.images, report.accuracy, report.detailed
    space = SpaceNeeds("latent_probe", settings.output_path)
    space.writing(1, report.size())
    with space.guard():
        report.write(report_dir(settings.output_path))
    best = result.best
    return MaterializeResult(
        metadata={
            "report": MetadataValue.path(str(report_dir(settings.output_path) / "report.html")),
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
