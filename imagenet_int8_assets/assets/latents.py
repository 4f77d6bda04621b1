"""vae_latents: the crops encoded by the VAE, plus the blocking check that they are finite."""


import time

import numpy as np
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    BackfillPolicy,
    MaterializeResult,
    MetadataValue,
    PartitionsDefinition,
    asset,
    asset_check,
)

from imagenet_int8_assets.assets.metadata import GROUP, markdown_table, progress_logger
from imagenet_int8_assets.core.encode import encode_posterior, non_finite_count, select_latent
from imagenet_int8_assets.core.storage import read_crops_with_meta, read_latents, write_latents
from imagenet_int8_assets.core.vae import load_vae, resolve_device
from imagenet_int8_assets.resources import ImagenetInt8Settings

FALLBACK_BANNER = (
    "!!! VAE FALLBACK: real weights for {requested!r} could not be loaded, so this run encodes "
    "with {source!r} RANDOM WEIGHTS. The latents are NOT meaningful; use them only to try the "
    "pipeline. Reason: {reason}"
)


def build_latents_assets(partitions_def: PartitionsDefinition, backfill_policy: BackfillPolicy):
    @asset(
        name="vae_latents",
        group_name=GROUP,
        partitions_def=partitions_def,
        backfill_policy=backfill_policy,
        deps=["preprocessed_crops"],
        pool="gpu",
        kinds={"pytorch"},
        description=(
            "The crops of one class encoded by the VAE (GPU when there is one, fp32). Stores the "
            "posterior mean and std as float32 and the latent that goes into the dataset "
            "('sample': mean + std * noise seeded by the run seed and the image id, so rebuilds "
            "give the same bytes; or 'mean'), in latents/<class>/latents.npz. A batched run loads "
            "the model once for all its partitions."
        ),
    )
    def vae_latents(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
        import torch

        device = resolve_device(settings.device)
        started = time.monotonic()
        model, info = load_vae(settings.vae, fallback=settings.vae_fallback or None)
        model = model.to(device, memory_format=torch.channels_last)
        load_s = time.monotonic() - started
        if info.is_fallback:
            context.log.warning(
                FALLBACK_BANNER.format(requested=info.requested, source=settings.vae_fallback, reason=info.fallback_reason)
            )
        context.log.info(
            f"Loaded VAE {info.requested!r} ({info.source}) on {device} in {load_s:.1f}s for "
            f"{len(context.partition_keys)} partition(s)"
        )
        provenance = {
            "vae": info.as_dict(),
            "device": device,
            "dtype": "float32",
            "latent_value": settings.latent_value,
            "seed": settings.seed,
        }
        for key in context.partition_keys:
            ids, images, crop_meta = read_crops_with_meta(settings.output_path, key, mmap=True)
            t0 = time.monotonic()
            mean, std = encode_posterior(
                model,
                images,
                device,
                settings.batch_size,
                progress_logger(context.log.info, f"{key}: encoded", total=len(ids)),
            )
            latent = select_latent(mean, std, ids, settings.latent_value, settings.seed)
            seconds = time.monotonic() - t0
            bad = non_finite_count(mean, std, latent)
            meta = {**provenance, "crops": {"recipe": crop_meta["recipe"], "size": crop_meta["size"]}}
            folder = write_latents(settings.output_path, key, ids, {"mean": mean, "std": std, "latent": latent}, meta)
            finite = latent[np.isfinite(latent)]
            partition_metadata = {
                "path": MetadataValue.path(str(folder)),
                "images": len(ids),
                "latent_shape": str(tuple(latent.shape[1:])),
                "latent_value": settings.latent_value,
                "vae": info.requested,
                "vae_source": info.source,
                "vae_revision": info.revision or "",
                "vae_weights_sha256": info.weights_sha256 or "",
                "vae_fallback": bool(info.is_fallback),
                "device": device,
                "seconds": round(seconds, 3),
                "images_per_second": round(len(ids) / seconds, 3) if seconds > 0 and ids else 0.0,
                "non_finite_values": bad,
                "latent_mean": float(finite.mean()) if finite.size else float("nan"),
                "latent_std": float(finite.std()) if finite.size else float("nan"),
                "latent_min": float(finite.min()) if finite.size else float("nan"),
                "latent_max": float(finite.max()) if finite.size else float("nan"),
            }
            if info.is_fallback:
                partition_metadata["WARNING"] = FALLBACK_BANNER.format(
                    requested=info.requested, source=settings.vae_fallback, reason=info.fallback_reason
                )
            context.add_asset_metadata(partition_metadata, partition_key=key)
            context.log.info(f"{key}: {len(ids)} latents in {seconds:.1f}s -> {folder}")
        return MaterializeResult()

    @asset_check(
        asset=vae_latents,
        partitions_def=partitions_def,
        blocking=True,
        description="Blocks the dataset when any stored latent (mean, std or the stored value) is NaN or infinite.",
    )
    def latents_are_finite(context: AssetCheckExecutionContext, settings: ImagenetInt8Settings) -> AssetCheckResult:
        rows = []
        for key in context.partition_keys:
            ids, arrays, _ = read_latents(settings.output_path, key)
            rows.append({"partition": key, "images": len(ids), "non_finite": non_finite_count(*arrays.values())})
        failing = [r["partition"] for r in rows if r["non_finite"]]
        return AssetCheckResult(
            passed=not failing,
            description=(
                "all latents are finite"
                if not failing
                else f"non-finite latents in {', '.join(failing)}: re-materialize vae_latents for them "
                "(in fp32) before building the dataset"
            ),
            metadata={"partitions": MetadataValue.md(markdown_table(rows)), "failing": ", ".join(failing)},
        )

    return vae_latents, latents_are_finite
