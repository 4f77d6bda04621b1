"""The pure core: no Dagster import anywhere below this package.

Modules: ``sources`` (folder scan, labels, manifest probing), ``cifar`` (CIFAR-10 reader and
export), ``images`` (safe opening, odd modes), ``preprocess`` (crop recipes), ``storage`` (layout,
atomic writes), ``vae`` (presets and loading), ``aura`` (AuraEquiVAE, latent flips), ``encode``
(batched encoding, precision guard, seeded sampling), ``quantize`` (uint8 codec, streaming
statistics), ``mds`` (MDS encoding, writer, reader dataset), ``mds_index`` (merged index and build
records), ``dataset_check`` (verifying a dataset before it is read), ``reconstruct`` and
``metrics`` (decoding, PSNR/SSIM), ``report_figures`` and
``plotting`` (figures, HTML), ``probe`` (classifiers on latents), ``parallel`` (process pools).
"""
