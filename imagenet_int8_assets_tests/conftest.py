"""Fixtures only (the helpers are in support/): a temp dir and StreamingDataset shared memory of
its own for every test, the bundled sample built once per session, and a fake Hugging Face Hub."""

from __future__ import annotations

import os
import tempfile

import dagster as dg
import pytest

from imagenet_int8_assets_tests.support.builds import materialize_all
from imagenet_int8_assets_tests.support.shared_memory import release_streaming_segments, streaming_segments


if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # The suite runs in a pytest process per core (pytest-xdist, setup.cfg): torch's default of a
    # thread per core in each of them (and in the builds they start) only makes the threads spin.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The slow tests first, the servers' (the longest) before the others (after servers/conftest.py
    has marked its own): the suite runs on every core (pytest-xdist, setup.cfg), and the longest
    tests started last would leave the other cores idle at the end."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, "/servers/" not in str(item.fspath)))


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
    before = streaming_segments()
    yield tmp
    release_streaming_segments(before, tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True, scope="module")
def own_shared_memory_per_module(tmp_path_factory):
    """The segments of datasets opened by module-scoped fixtures are unlinked when the module ends,
    so later datasets do not attach to (and keep descriptors for) every earlier module's."""
    before = streaming_segments()
    yield
    release_streaming_segments(before, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_vae():
    """The tiny random VAE on the CPU, loaded once; tests only read it (a test that changes a VAE,
    or wraps one, loads or wraps its own)."""
    from imagenet_int8_assets.core.latents.vae import load_vae

    return load_vae("tiny-random").to("cpu")


@pytest.fixture(scope="session")
def s3():
    """One S3-compatible server (moto's server mode) for the session; every test makes its own
    bucket (``s3.new_bucket()``), and ``s3.env()`` / ``s3.client()`` reach it."""
    from imagenet_int8_assets_tests.support.local_servers import s3_server

    with s3_server() as server:
        yield server


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
