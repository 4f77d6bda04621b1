"""imagenet-int8-assets: image folders -> VAE latents -> Imagenet.int8-compatible MDS datasets.

The Dagster definitions are exposed lazily as ``imagenet_int8_assets.defs`` (PEP 562), so that
importing the pure core (``imagenet_int8_assets.core``) or the reader helper
(``imagenet_int8_assets.reader``) never imports Dagster. ``dagster ... -m imagenet_int8_assets``
finds ``defs`` through ``dir()``/``getattr`` like any module attribute.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "defs":
        from imagenet_int8_assets.definitions import defs

        return defs
    raise AttributeError(f"module 'imagenet_int8_assets' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "defs"])
