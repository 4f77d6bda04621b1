"""core.hub.hub_upload without Dagster: the repository layout, what a re-upload sends and deletes,
branches and the Hub's folder limit, against the fake Hub (the real huggingface_hub client)."""

import numpy as np
import pytest
from huggingface_hub import HfApi

from imagenet_int8_assets.core.hub import hub_upload as hub
from imagenet_int8_assets.core.dataset import mds, mds_index

INFO = {"vae": {"family": "autoencoder-kl", "requested": "tiny-random", "repo_id": None}, "seed": 0}


def _publish(root, classes: dict[str, int], seed: int = 0) -> None:
    for n, (name, count) in enumerate(sorted(classes.items())):
        codes = np.random.default_rng(seed + n).integers(0, 256, (count, 4, 32, 32), dtype=np.uint8)
        mds.write_class_shards(root, name, codes, n, f"text {name}", INFO)
    index, summary = mds_index.merged_index(root, sorted(classes))
    mds_index.swap_in_index(root, index, mds_index.dataset_record(mds_index.read_class_build_info(root, sorted(classes)[0]), summary))


def _layout(tmp_path, root):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: other\n---\n# a card\n")
    return hub.repository_layout(root, card=card)


def test_layout_names_only_the_published_versions_and_the_final_files(tmp_path):
    root = tmp_path / "mds"
    _publish(root, {"a": 2, "b": 3})
    first = mds_index.current_version_dir(root, "b")
    _publish(root, {"a": 2, "b": 3}, seed=7)  # new versions of both classes; the old ones stay on disk
    assert first.is_dir() and mds_index.current_version_dir(root, "b") != first
    layout = _layout(tmp_path, root)
    index = mds_index.read_index(root)
    folders = {p.rsplit("/", 1)[0] for p in layout if p.startswith("classes/")}
    assert folders == {s["raw_data"]["basename"].rsplit("/", 1)[0] for s in index["shards"]}
    assert not [p for p in layout if p.startswith(first.relative_to(root).as_posix())]
    assert {"index.json", "build.json", "README.md"} <= set(layout)


def test_reupload_sends_the_difference_and_deletes_only_what_it_manages(tmp_path, fake_hub):
    api = HfApi(endpoint=fake_hub.endpoint, token=fake_hub.env()["HF_TOKEN"])
    root = tmp_path / "mds"
    _publish(root, {"a": 2, "b": 3})
    layout = _layout(tmp_path, root)
    first = hub.upload_dataset(api, "me/ds", layout, files_per_commit=2, hash_cache=tmp_path / "hashes.json")
    assert first.created and first.files_sent == len(layout) and first.files_skipped == 0
    assert len(first.commits) == -(-(len(layout) - 3) // 2) + 1  # shards in pairs, then the final files
    last = fake_hub.stats("me/ds")["commits"][-1]
    assert set(last["added_paths"]) == set(hub.FINAL_FILES)  # the index goes last
    # a file of the user's own, outside the folders this tool manages, is left alone
    api.upload_file(path_or_fileobj=b"mine", path_in_repo="notes.txt", repo_id="me/ds", repo_type="dataset")

    _publish(root, {"a": 2, "b": 4}, seed=0)  # class b changes (a keeps its bytes and version)
    layout2 = _layout(tmp_path, root)
    fake_hub.reset_stats("me/ds")
    second = hub.upload_dataset(api, "me/ds", layout2, hash_cache=tmp_path / "hashes.json")
    added = set(second.added)
    assert added and all(p.startswith("classes/b/") or p in ("index.json", "build.json") for p in added), added
    assert second.deleted and all(p.startswith("classes/b/") for p in second.deleted)
    assert len(second.commits) == 2 and second.files_skipped == len(layout2) - len(added)  # b, then the final files
    remote = fake_hub.files("me/ds")
    assert remote["notes.txt"] == b"mine"
    assert {p for p in remote if p.startswith("classes/")} == {p for p in layout2 if p.startswith("classes/")}
    assert remote["index.json"] == (root / "index.json").read_bytes()

    third = hub.upload_dataset(api, "me/ds", layout2, hash_cache=tmp_path / "hashes.json")
    assert third.commits == [] and third.files_sent == 0 and "up to date" in third.summary()


def test_a_branch_is_created_and_main_is_left_alone(tmp_path, fake_hub):
    api = HfApi(endpoint=fake_hub.endpoint, token=fake_hub.env()["HF_TOKEN"])
    root = tmp_path / "mds"
    _publish(root, {"a": 1})
    result = hub.upload_dataset(api, "me/ds", _layout(tmp_path, root), revision="dev", private=False)
    assert result.url.endswith("/datasets/me/ds/tree/dev") and result.private is False
    assert "index.json" in fake_hub.files("me/ds", "dev")
    assert "index.json" not in fake_hub.files("me/ds", "main")


def test_a_folder_over_the_hub_limit_is_refused_before_sending(tmp_path):
    paths = [f"data/{i}.parquet" for i in range(hub.MAX_FILES_PER_FOLDER + 1)]
    with pytest.raises(hub.PublishError, match="'data' would hold 10001 entries"):
        hub.check_folder_sizes(paths)
    hub.check_folder_sizes(paths[:-1])  # exactly the limit is fine


def test_a_dataset_that_was_never_published_is_refused(tmp_path):
    with pytest.raises(hub.PublishError, match="build it first"):
        hub.repository_layout(tmp_path / "mds", card=tmp_path / "README.md")


def test_lfs_content_uploaded_before_a_failed_commit_is_not_sent_again(tmp_path, fake_hub):
    """The upload dies after its LFS objects reached the Hub but before their commit: the re-run
    commits them without sending their content (the LFS batch API says they are there)."""
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=fake_hub.endpoint, token=fake_hub.env()["HF_TOKEN"])
    root = tmp_path / "mds"
    _publish(root, {"a": 2, "b": 3, "c": 1})
    layout = _layout(tmp_path, root)
    api.create_repo("me/ds", repo_type="dataset")
    fake_hub.fail("POST", r"/commit/", status=503, times=1)  # the first commit is lost after its uploads
    with pytest.raises(HfHubHTTPError):
        hub.upload_dataset(api, "me/ds", layout, files_per_commit=3)
    uploaded = fake_hub.stats("me/ds")["lfs_uploads"]
    assert uploaded >= 1 and not [c for c in fake_hub.stats("me/ds")["commits"] if not c.get("empty")]

    fake_hub.reset_stats("me/ds")
    result = hub.upload_dataset(api, "me/ds", layout, files_per_commit=3)
    stats = fake_hub.stats("me/ds")
    assert result.files_resumed == uploaded == stats["batch_present"]
    assert stats["lfs_uploads"] == sum(len(c["lfs_paths"]) for c in stats["commits"]) - uploaded
    assert result.files_sent + result.files_resumed == len(layout)
    remote = fake_hub.files("me/ds")
    assert all(remote[p] == layout[p].read_bytes() for p in layout)


def test_a_hub_that_stops_answering_a_commit_times_out_naming_the_step_and_a_rerun_completes(tmp_path, fake_hub):
    """Every request is bounded by the timeout (seconds of silence): a commit the Hub never answers
    fails within it, saying what was being done; the re-run, once the Hub answers, completes without
    sending again the content that had gone up. The client's HTTP setup is restored afterwards."""
    import time

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    api = HfApi(endpoint=fake_hub.endpoint, token=fake_hub.env()["HF_TOKEN"])
    root = tmp_path / "mds"
    _publish(root, {"a": 2, "b": 3})
    layout = _layout(tmp_path, root)
    factory, endpoint = _http._GLOBAL_BACKEND_FACTORY, constants.ENDPOINT
    fake_hub.hang("POST", r"/commit/")
    started = time.monotonic()
    with pytest.raises(hub.HubTimeout) as raised:
        hub.upload_dataset(api, "me/ds", layout, files_per_commit=3, timeout=1)
    assert time.monotonic() - started < 20  # 1 s of silence, not the fake's 600 s hang
    batches = -(-(len(layout) - 3) // 3) + 1
    assert str(raised.value) == (
        f"the Hub at {fake_hub.endpoint} did not answer for 1 s while committing 1/{batches} "
        "(3 file(s) added, 0 deleted)"
    )
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert _http._GLOBAL_BACKEND_FACTORY is factory and constants.ENDPOINT == endpoint
    uploaded = fake_hub.stats("me/ds")["lfs_uploads"]
    assert uploaded >= 1

    fake_hub.release()  # the held commit is dropped unanswered; the Hub answers again
    assert ("POST", "/api/datasets/me/ds/commit/main", 499) in fake_hub.request_log
    result = hub.upload_dataset(api, "me/ds", layout, files_per_commit=3, timeout=1)
    assert result.files_resumed == uploaded and result.files_sent + result.files_resumed == len(layout)
    assert all(fake_hub.files("me/ds")[p] == layout[p].read_bytes() for p in layout)
    assert _http._GLOBAL_BACKEND_FACTORY is factory and constants.ENDPOINT == endpoint


def test_credentials_in_the_endpoint_are_sent_as_basic_auth_and_appear_nowhere(tmp_path, fake_hub, monkeypatch):
    """HF_ENDPOINT=http://user:password@host (a Hub behind basic auth): the upload works with the
    credentials (huggingface_hub alone refuses such URLs when it parses its commit answers), sends
    them as basic auth, and neither its result nor its errors carry them."""
    from huggingface_hub import constants

    fake_hub.basic_auth = ("user", "secretpw")
    endpoint = fake_hub.endpoint.replace("http://", "http://user:secretpw@")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # HF_ENDPOINT as a process started with it reads it
    api = HfApi(token=False)  # no Bearer token: only the basic auth of the endpoint can authorize writes
    assert api.endpoint == endpoint
    root = tmp_path / "mds"
    _publish(root, {"a": 1, "b": 1})
    layout = _layout(tmp_path, root)

    fake_hub.fail("POST", r"/preupload/", status=500, times=1)
    with pytest.raises(Exception) as failed:
        hub.upload_dataset(api, "me/ds", layout)
    chain, error = [], failed.value
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    assert "500" in chain[0] and "secretpw" not in "\n".join(chain), chain

    fake_hub.hang("POST", r"/commit/")
    with pytest.raises(hub.HubTimeout) as raised:
        hub.upload_dataset(api, "me/ds", layout, timeout=1)
    shown = fake_hub.endpoint.replace("http://", "http://***@")
    assert str(raised.value).startswith(f"the Hub at {shown} did not answer for 1 s while committing 1/")
    fake_hub.release()

    result = hub.upload_dataset(api, "me/ds", layout)
    assert result.url == f"{fake_hub.endpoint}/datasets/me/ds" and "secretpw" not in result.summary()
    assert all(fake_hub.files("me/ds")[p] == layout[p].read_bytes() for p in layout)
    assert fake_hub.stats()["basic_auth_requests"] > 0
    assert constants.ENDPOINT == endpoint  # restored after the upload
