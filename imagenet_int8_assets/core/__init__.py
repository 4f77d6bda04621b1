"""The pure core: no Dagster import anywhere below this package.

Modules: ``sources`` (folder scan, labels, manifest probing), ``preprocess`` (crop recipes),
``storage`` (atomic writes, crop/latent file layout), ``vae`` (presets and loading), ``encode``
(batched encoding, deterministic sampling), ``quantize`` (uint8 codec and streaming statistics),
``mds`` (MDS encoding, writer, merged index), ``parallel`` (process pools).
"""
