"""One class's float latents on disk (``latents/<class>/latents.npz`` and ``meta.json``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.common.files import atomic_dir, atomic_write_json
from imagenet_int8_assets.core.common.layout import latents_dir, read_meta


# IMAGENET_INT8_LATENT_STORAGE: which float32 arrays latents/<class>/latents.npz keeps.
# ``full``: the posterior mean and std, the stored latent and its flip; ``latent``: only what the
# dataset, the statistics, the report and the parquet export read (the stored latent and its flip).
LATENT_STORAGES = ("full", "latent")
DEFAULT_LATENT_STORAGE = "full"
LATENT_ONLY_ARRAYS = ("latent", "latent_flip")


def check_latent_storage(value: str) -> str:
    if value not in LATENT_STORAGES:
        raise ValueError(f"unknown latent storage {value!r}: use one of {', '.join(LATENT_STORAGES)}")
    return value


def latents_to_store(arrays: dict[str, np.ndarray], storage: str = DEFAULT_LATENT_STORAGE) -> dict[str, np.ndarray]:
    """The arrays that ``storage`` keeps (``full``: all of them; ``latent``: the stored latent and its flip)."""
    if check_latent_storage(storage) == "full":
        return dict(arrays)
    return {k: v for k, v in arrays.items() if k in LATENT_ONLY_ARRAYS}


def write_latents(
    output: str | os.PathLike,
    class_folder: str,
    ids: list[str],
    arrays: dict[str, np.ndarray],
    meta: dict,
    storage: str = DEFAULT_LATENT_STORAGE,
) -> Path:
    """Store one class's latents (float32 arrays keyed by name, first axis = image) atomically.

    ``storage`` (``full`` or ``latent``, see ``latents_to_store``) decides which arrays are kept;
    it is not written into ``meta`` (which becomes part of the dataset's build record): the file's
    arrays say what it holds.
    """
    arrays = latents_to_store(arrays, storage)
    for name, arr in arrays.items():
        if arr.shape[0] != len(ids):
            raise ValueError(f"latents[{name!r}] has {arr.shape[0]} rows for {len(ids)} ids")
    final = latents_dir(output, class_folder)
    with atomic_dir(final) as tmp:
        np.savez(
            tmp / "latents.npz",
            ids=np.array(ids, dtype=str),
            **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
        )
        atomic_write_json(tmp / "meta.json", {**meta, "count": len(ids)})
    return final


def read_latents(
    output: str | os.PathLike, class_folder: str
) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """(ids, {"latent", ...}, meta) for one class: ``latent`` (what the dataset stores) and
    ``latent_flip`` when flips are stored; ``mean`` and ``std`` only when written with
    ``latent_storage=full`` (and ``std`` only for VAEs with a posterior)."""
    folder = latents_dir(output, class_folder)
    meta = read_meta(folder, "latents", "vae_latents")
    with np.load(folder / "latents.npz", allow_pickle=False) as data:
        ids = [str(x) for x in data["ids"]]
        arrays = {k: data[k] for k in data.files if k != "ids"}
    return ids, arrays, meta
