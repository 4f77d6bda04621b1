"""Shared fixtures: small generated datasets, per-test temp dirs, and one built dataset."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import dagster as dg
import pytest

from imagenet_int8_assets.build.stages import DATASET_STEPS
from imagenet_int8_assets.sample import synthetic_picture

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # where `imagenet-int8` and `dagster` are installed


def cli_env(tmp_path: Path, **extra: str) -> dict:
    """Environment for the real CLI in a subprocess: output under ``tmp_path``, tiny VAE on CPU,
    offline, none of the caller's IMAGENET_INT8_* or DAGSTER_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGENET_INT8_", "DAGSTER_HOME"))}
    env.update(
        IMAGENET_INT8_OUTPUT=str(tmp_path / "out"),
        IMAGENET_INT8_VAE="tiny-random",
        IMAGENET_INT8_DEVICE="cpu",
        IMAGENET_INT8_WORKERS="1",
        TMPDIR=os.environ.get("TMPDIR", tempfile.gettempdir()),
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "hf-cache"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_cli(args, env: dict, cwd=REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def own_tmpdir(tmp_path_factory, monkeypatch):
    """StreamingDataset leaves shared memory and lock files in the temp dir: one per test.

    It also never unlinks its shared-memory segments (/dev/shm/NNNNNN_*), and every new
    StreamingDataset attaches to all the earlier ones while looking for a free prefix, keeping a
    descriptor open for each: in one long pytest process the open descriptors grow with the square
    of the datasets opened, until "Too many open files". Unlinking the segments that this test's
    datasets left (they are garbage once the test ends) keeps that growth linear.
    """
    tmp = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    before = _streaming_segments()
    yield tmp
    gc.collect()
    for name in _streaming_segments() - before:
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{name}")
    _close_unlinked_streaming_memory()


@pytest.fixture(autouse=True, scope="module")
def own_shared_memory_per_module():
    """The segments of datasets opened by module-scoped fixtures are unlinked when the module ends,
    so later datasets do not attach to (and keep descriptors for) every earlier module's."""
    before = _streaming_segments()
    yield
    gc.collect()
    for name in _streaming_segments() - before:
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{name}")
    _close_unlinked_streaming_memory()


def _close_unlinked_streaming_memory(threshold: int = 256) -> None:
    """StreamingDataset's shared-memory objects are kept alive by an atexit handler, each holding a
    descriptor (also those it only opened to look for a free prefix). Once their segments are
    unlinked they serve nobody: close them when this process holds many descriptors, so a long
    test session never runs out ("Too many open files")."""
    try:
        if len(os.listdir("/proc/self/fd")) < threshold:
            return
    except OSError:
        return
    from streaming.base.shared.memory import SharedMemory as StreamingSharedMemory

    for obj in gc.get_objects():
        if isinstance(obj, StreamingSharedMemory):
            shm = getattr(obj, "shm", None)
            if shm is not None and not os.path.exists(f"/dev/shm/{shm.name.lstrip('/')}"):
                with contextlib.suppress(Exception):  # a buffer still exported stays open
                    shm.close()


def _streaming_segments() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if STREAMING_SEGMENT.match(n)}
    except OSError:  # no /dev/shm on this platform
        return set()


STREAMING_SEGMENT = re.compile(r"\d{6}_")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def crops(n: int, seed: int = 0):
    """``n`` distinct 256x256 RGB synthetic pictures as one uint8 array (N, 256, 256, 3)."""
    import numpy as np

    return np.stack(
        [np.asarray(synthetic_picture(256, 256, (40 + 30 * i % 200, 90, 120), seed=seed + i).convert("RGB")) for i in range(n)]
    )


def make_image_folder(root: Path, classes: dict[str, int], size=(300, 240)) -> Path:
    """``classes`` maps class folder -> number of JPEGs; returns ``root``."""
    for c, (name, count) in enumerate(sorted(classes.items())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            w, h = size if i % 2 == 0 else size[::-1]
            synthetic_picture(w, h, (40 + 50 * c % 200, 90, 200 - 40 * c % 200), seed=97 * c + i).save(
                folder / f"{name}_{i:04d}.JPEG", quality=90
            )
    return root


def encoded_classes(out: Path) -> dict[str, int]:
    """How many vae_latents materializations each class has in the instance of the output ``out``
    (its default DAGSTER_HOME): which classes a build encoded, and how often."""
    with dg.DagsterInstance.from_config(str(out / "dagster_home")) as instance:
        records = instance.fetch_materializations(dg.AssetKey("vae_latents"), limit=1000).records
    counts: dict[str, int] = {}
    for record in records:
        counts[record.partition_key] = counts.get(record.partition_key, 0) + 1
    return counts


def materialize_all(defs: dg.Definitions, instance: dg.DagsterInstance, partitions_per_run: int = 50):
    """Materialize the whole graph as `imagenet-int8 build --force` does; returns the run results.

    The manifest runs first: it registers the class partitions, which the batches then cover."""
    from imagenet_int8_assets.partitions import registered_classes

    job = defs.resolve_implicit_global_asset_job_def()
    results = [job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")])]
    keys = registered_classes(instance)
    for start in range(0, len(keys), partitions_per_run):
        batch = keys[start : start + partitions_per_run]
        results.append(
            job.execute_in_process(
                instance=instance,
                asset_selection=[dg.AssetKey(k) for k in ("preprocessed_crops", "vae_latents", "mds_shards")],
                tags={
                    "dagster/asset_partition_range_start": batch[0],
                    "dagster/asset_partition_range_end": batch[-1],
                },
                raise_on_error=False,
            )
        )
    results.append(
        job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey(k) for k in DATASET_STEPS],
            raise_on_error=False,
        )
    )
    return results


@pytest.fixture(scope="session")
def built_sample(tmp_path_factory):
    """The bundled sample dataset built once with tiny-random through a real Dagster instance."""
    from imagenet_int8_assets.definitions import build_definitions
    from imagenet_int8_assets.resources import ImagenetInt8Settings

    out = tmp_path_factory.mktemp("built")
    settings = ImagenetInt8Settings(output=str(out / "out"), vae="tiny-random", device="cpu", workers=1)
    defs = build_definitions(settings, partitions_per_run=3)
    instance = dg.DagsterInstance.ephemeral()
    results = materialize_all(defs, instance, partitions_per_run=3)
    return {"settings": settings, "defs": defs, "instance": instance, "results": results}


# -- Fake Hugging Face Hub --------------------------------------------------------------------------
# imagenet_int8_assets_tests/support/fake_hub.py: a local server speaking the Hub routes the real
# huggingface_hub client uses (repos, preupload, LFS batch + PUT, commit, tree, paths-info, resolve,
# validate-yaml). The fixture starts one per test, under tmp_path.


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A started ``FakeHub`` (its ``.endpoint``, ``.stats(repo_id)``, ``.files(repo_id)``...) whose
    write token is in ``HF_TOKEN``; this process's huggingface_hub points at it for the test.

    Set with monkeypatch (undone after the test): ``HF_ENDPOINT``, ``HF_TOKEN``,
    ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_OFFLINE=0``, ``HF_HOME`` and
    ``HF_HUB_CACHE`` (under tmp_path/hf-home), for subprocesses (``os.environ`` or
    ``fake_hub.env(hf_home)``). huggingface_hub reads them at import, so the in-process copies in
    ``huggingface_hub.constants`` are patched too, and requests for https://huggingface.co (module
    level functions, ``RepoCard.validate``) are routed to the fake. Passing
    ``endpoint=fake_hub.endpoint`` explicitly still works and is the clearest.
    """
    import secrets

    from imagenet_int8_assets_tests.support.fake_hub import FakeHub, use_fake_hub

    token = "hf_fake" + secrets.token_hex(16)
    with FakeHub(tmp_path / "fake-hub", token) as hub, use_fake_hub(hub, tmp_path / "hf-home", monkeypatch):
        yield hub
