"""The fake Hub (fake_hub.py) against the REAL huggingface_hub client: nothing of the client is
mocked, it talks HTTP to the fake, which must answer as the Hub does."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from imagenet_int8_assets_tests.support.fake_hub import git_blob_id, lfs_pointer

REPO = "fake-user/tiny-int8"
MiB = 1024 * 1024


def _api(hub, token=None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=token or os.environ["HF_TOKEN"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local_tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }


@contextlib.contextmanager
def _hub_debug_log(name: str = "huggingface_hub._commit_api"):
    """The client's debug messages from ``name`` (huggingface_hub logs at WARNING by default)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger, handler = logging.getLogger(name), Keep(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def files(tmp_path):
    """A small JSON (regular), a 1 MiB random binary (LFS: binary sample) and a 10 MiB text file
    (LFS: size), on disk."""
    folder = tmp_path / "local"
    (folder / "shards").mkdir(parents=True)
    (folder / "index.json").write_text(json.dumps({"version": 2, "shards": ["shards/0.mds"]}))
    (folder / "shards" / "0.mds").write_bytes(os.urandom(MiB))
    (folder / "big.txt").write_bytes(b"0123456789abcde\n" * (10 * MiB // 16))
    return folder


def _publish(hub, folder: Path, message="Publish", private=True):
    from huggingface_hub import CommitOperationAdd

    api = _api(hub)
    api.create_repo(REPO, repo_type="dataset", private=private, exist_ok=True)
    ops = [CommitOperationAdd(path, str(folder / path)) for path in _local_tree(folder)]
    return api.create_commit(REPO, ops, commit_message=message, repo_type="dataset")


def test_private_repo_commit_and_tree_match_local_files(fake_hub, files):
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    api = _api(fake_hub)
    url = api.create_repo(REPO, repo_type="dataset", private=True)
    assert url.repo_id == REPO and url.repo_type == "dataset" and url.endpoint == fake_hub.endpoint
    info = _publish(fake_hub, files, message="First publish")
    assert info.oid == fake_hub.head(REPO) and info.repo_url.repo_id == REPO

    assert api.dataset_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError):  # private: not visible without a token
        api.dataset_info(REPO, token=False)

    local = _local_tree(files)
    tree = {e.path: e for e in api.list_repo_tree(REPO, repo_type="dataset", recursive=True, expand=True)}
    assert set(tree) == set(local) | {".gitattributes", "shards"}
    for path, content in local.items():
        entry = tree[path]
        assert isinstance(entry, RepoFile) and entry.size == len(content)
        assert entry.last_commit is not None and entry.last_commit.title == "First publish"
    assert tree["index.json"].lfs is None and tree["index.json"].blob_id == git_blob_id(local["index.json"])
    for path in ("shards/0.mds", "big.txt"):  # binary sample, and >= 10 MiB
        assert tree[path].lfs.sha256 == _sha256(local[path]) and tree[path].lfs.size == len(local[path])
        assert tree[path].blob_id == git_blob_id(lfs_pointer(_sha256(local[path]), len(local[path])))
    paths = api.get_paths_info(REPO, ["index.json", "shards", "missing"], repo_type="dataset")
    assert [p.path for p in paths] == ["index.json", "shards"]
    assert fake_hub.files(REPO) == {**local, ".gitattributes": fake_hub.files(REPO)[".gitattributes"]}

    stats = fake_hub.stats(REPO)
    assert stats["lfs_uploads"] == 2 and stats["lfs_bytes"] == len(local["shards/0.mds"]) + len(local["big.txt"])
    assert stats["regular_files"] == 1 and stats["regular_bytes"] == len(local["index.json"])
    [commit] = stats["commits"]
    assert commit["message"] == "First publish" and commit["added"] == 3 and commit["deleted"] == 0
    assert sorted(commit["lfs_paths"]) == ["big.txt", "shards/0.mds"] and commit["regular_paths"] == ["index.json"]
    assert fake_hub.server_errors == []


def test_preuploaded_lfs_object_already_stored_is_not_sent_again(fake_hub, files):
    from huggingface_hub import CommitOperationAdd

    api = _api(fake_hub)
    first = _publish(fake_hub, files)
    fake_hub.reset_stats(REPO)
    shard = files / "shards" / "0.mds"
    copy = CommitOperationAdd("shards/1.mds", str(shard))  # same content, new path
    with _hub_debug_log() as log:
        api.preupload_lfs_files(REPO, [copy], repo_type="dataset")
        second = api.create_commit(REPO, [copy], commit_message="Same bytes, new name", repo_type="dataset")
    assert "Content of file shards/1.mds is already present upstream - skipping upload." in log
    stats = fake_hub.stats(REPO)
    assert stats["batch_calls"] == 1 and stats["batch_present"] == 1
    assert stats["lfs_uploads"] == 0 and stats["lfs_bytes"] == 0
    assert [c["added_paths"] for c in stats["commits"]] == [["shards/1.mds"]]
    assert second.oid != first.oid and fake_hub.files(REPO)["shards/1.mds"] == shard.read_bytes()

    # Same path, same content: the client learns the remote oid from /preupload and makes no commit.
    fake_hub.reset_stats(REPO)
    same = [CommitOperationAdd(p, str(files / p)) for p in ("index.json", "shards/0.mds")]
    third = api.create_commit(REPO, same, commit_message="Nothing changed", repo_type="dataset")
    stats = fake_hub.stats(REPO)
    assert third.oid == second.oid == fake_hub.head(REPO)
    assert stats["commits"] == [] and stats["lfs_uploads"] == 0 and stats["preupload_calls"] == 1


def test_a_commit_that_changes_nothing_is_still_a_commit_on_the_hub(fake_hub, files):
    """huggingface_hub skips such commits itself; the Hub, sent one, records an empty commit."""
    _publish(fake_hub, files)
    before = fake_hub.head(REPO)
    content = (files / "index.json").read_bytes()
    lines = [
        {"key": "header", "value": {"summary": "Resend index.json", "description": ""}},
        {"key": "file", "value": {"path": "index.json", "content": base64.b64encode(content).decode(), "encoding": "base64"}},
    ]
    r = requests.post(
        f"{fake_hub.endpoint}/api/datasets/{REPO}/commit/main",
        data=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
        headers={"Authorization": f"Bearer {os.environ['HF_TOKEN']}", "Content-Type": "application/x-ndjson"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["commitOid"] == fake_hub.head(REPO) != before
    assert r.json()["commitUrl"].endswith(f"/datasets/{REPO}/commit/{fake_hub.head(REPO)}")
    last = fake_hub.stats(REPO)["commits"][-1]
    assert last["empty"] is True and last["unchanged_paths"] == ["index.json"] and last["parent"] == before


def test_delete_commit(fake_hub, files):
    from huggingface_hub import CommitOperationDelete
    from huggingface_hub.errors import EntryNotFoundError

    api = _api(fake_hub)
    _publish(fake_hub, files)
    api.create_commit(
        REPO,
        [CommitOperationDelete("big.txt"), CommitOperationDelete("shards/")],
        commit_message="Drop old files",
        repo_type="dataset",
    )
    assert set(fake_hub.files(REPO)) == {".gitattributes", "index.json"}
    assert {e.path for e in api.list_repo_tree(REPO, repo_type="dataset", recursive=True)} == {".gitattributes", "index.json"}
    last = fake_hub.stats(REPO)["commits"][-1]
    assert last["message"] == "Drop old files" and sorted(last["deleted_paths"]) == ["big.txt", "shards/0.mds"]
    with pytest.raises(EntryNotFoundError, match="doesn't exist"):
        api.create_commit(REPO, [CommitOperationDelete("big.txt")], commit_message="Again", repo_type="dataset")
    assert len(fake_hub.stats(REPO)["commits"]) == 2


def test_snapshot_download_round_trip_and_offline_cache(fake_hub, files, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    info = _publish(fake_hub, files)
    expected = fake_hub.files(REPO)
    local_dir = tmp_path / "download"
    got = snapshot_download(REPO, repo_type="dataset", endpoint=fake_hub.endpoint, local_dir=local_dir)
    assert Path(got) == local_dir.resolve() and _local_tree(local_dir) == expected

    cache = tmp_path / "cache"
    first = snapshot_download(REPO, repo_type="dataset", endpoint=fake_hub.endpoint, cache_dir=cache)
    assert Path(first).name == info.oid and _local_tree(Path(first)) == expected
    requests_before = len(fake_hub.request_log)
    again = snapshot_download(REPO, repo_type="dataset", endpoint=fake_hub.endpoint, cache_dir=cache, local_files_only=True)
    assert again == first and _local_tree(Path(again)) == expected
    assert len(fake_hub.request_log) == requests_before  # the cache answered: no request at all

    one = hf_hub_download(REPO, "shards/0.mds", repo_type="dataset", revision=info.oid,
                          endpoint=fake_hub.endpoint, cache_dir=tmp_path / "cache2")
    assert Path(one).read_bytes() == expected["shards/0.mds"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.json", repo_type="dataset", endpoint=fake_hub.endpoint, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "index.json", repo_type="dataset", revision="no-branch", endpoint=fake_hub.endpoint, cache_dir=cache)
    stats = fake_hub.stats(REPO)
    assert stats["downloads"] >= 2 * len(expected) and stats["download_bytes"] >= 2 * sum(map(len, expected.values()))


def test_resolve_headers_and_ranges(fake_hub, files):
    _publish(fake_hub, files)
    head = fake_hub.head(REPO)
    auth = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"}
    base = f"{fake_hub.endpoint}/datasets/{REPO}/resolve/main"
    shard, index = (files / "shards" / "0.mds").read_bytes(), (files / "index.json").read_bytes()

    r = requests.head(f"{base}/shards/0.mds", headers=auth, timeout=30)
    assert r.status_code == 200 and r.headers["X-Repo-Commit"] == head
    assert r.headers["X-Linked-Etag"] == f'"{_sha256(shard)}"' and int(r.headers["X-Linked-Size"]) == len(shard)
    r = requests.head(f"{base}/index.json", headers=auth, timeout=30)
    assert r.headers["ETag"] == f'"{git_blob_id(index)}"' and int(r.headers["Content-Length"]) == len(index)
    assert "X-Linked-Etag" not in r.headers
    r = requests.get(f"{base}/shards/0.mds", headers={**auth, "Range": "bytes=10-19"}, timeout=30)
    assert r.status_code == 206 and r.content == shard[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(shard)}"
    r = requests.get(f"{base}/index.json", timeout=30)  # private repository, no token
    assert r.status_code == 401 and r.headers["X-Error-Code"] == "RepoNotFound"


def test_upload_large_folder_completes_and_a_second_call_uploads_nothing(fake_hub, files, tmp_path):
    (files / "big.txt").unlink()  # keep it quick
    (files / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny\n")
    script = textwrap.dedent(
        f"""
        from huggingface_hub import HfApi
        HfApi().upload_large_folder({REPO!r}, {str(files)!r}, repo_type="dataset", private=True,
                                    num_workers=1, print_report=False)
        """
    )
    env = {**os.environ, **fake_hub.env(tmp_path / "hf-home-subprocess")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    local = _local_tree(files)
    remote = fake_hub.files(REPO)
    assert {p: remote[p] for p in local} == local and set(remote) == set(local) | {".gitattributes"}
    stats = fake_hub.stats(REPO)
    assert len(stats["commits"]) == 1 and stats["lfs_uploads"] == 1 and stats["regular_files"] == 2
    assert fake_hub.repo_exists(REPO) and _api(fake_hub).dataset_info(REPO).private is True

    # Again in this process, from a fresh copy (no .cache/huggingface upload records): nothing to send.
    fake_hub.reset_stats(REPO)
    fresh = tmp_path / "fresh"
    shutil.copytree(files, fresh, ignore=shutil.ignore_patterns(".cache"))
    _api(fake_hub).upload_large_folder(REPO, fresh, repo_type="dataset", num_workers=1, print_report=False)
    stats = fake_hub.stats(REPO)
    assert stats["commits"] == [] and stats["lfs_uploads"] == 0 and stats["regular_files"] == 0
    # The shard is asked about twice (its preupload job, then again by create_commit: the client
    # rebuilds the operation without its "uploaded" mark); both times the batch API says "stored".
    assert stats["preupload_calls"] >= 1 and stats["batch_present"] == 2


def test_wrong_or_missing_token_gets_a_clear_401(fake_hub, files):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    _publish(fake_hub, files)
    wrong = _api(fake_hub, token="hf_not_the_right_token")
    for call in (
        lambda: wrong.create_repo("fake-user/other", repo_type="dataset"),
        lambda: wrong.dataset_info(REPO),
        lambda: wrong.list_repo_tree(REPO, repo_type="dataset").__next__(),
    ):
        with pytest.raises(HfHubHTTPError, match="Invalid credentials in Authorization header") as exc:
            call()
        assert exc.value.response.status_code == 401 and not isinstance(exc.value, RepositoryNotFoundError)
    with pytest.raises(requests.HTTPError, match="Invalid user token"):  # whoami re-raises a plain HTTPError
        wrong.whoami()
    with pytest.raises(HfHubHTTPError, match="must be authenticated") as exc:
        _api(fake_hub).create_repo("fake-user/other", repo_type="dataset", token=False)
    assert exc.value.response.status_code == 401
    assert not fake_hub.repo_exists("fake-user/other")
    assert _api(fake_hub).whoami()["name"] == "fake-user"


def test_card_validation_accepts_good_yaml_and_rejects_bad_yaml(fake_hub):
    from huggingface_hub import CommitOperationAdd, DatasetCard

    good = "---\nlicense: apache-2.0\npretty_name: Tiny\nconfigs:\n- config_name: default\n  data_files: data/*.parquet\n---\n# Tiny\n"
    # DatasetCard parses its YAML itself (a syntax error or a list fails in its constructor), so
    # what reaches the server through validate() is well-formed YAML with Hub-level errors.
    DatasetCard(good).validate()  # posts to https://huggingface.co/api/validate-yaml: routed to the fake
    with pytest.raises(ValueError, match='"license" must be a string or an array of strings'):
        DatasetCard("---\nlicense:\n  name: mine\n---\n# Odd license\n").validate()
    with pytest.raises(ValueError, match='"configs" must be an array of objects'):
        DatasetCard("---\nconfigs: 5\n---\n").validate()
    assert [status for _, path, status in fake_hub.request_log if path == "/api/validate-yaml"] == [200, 400, 400]

    # create_commit sends README.md's raw text to {endpoint}/api/validate-yaml before any upload.
    api = _api(fake_hub)
    api.create_repo(REPO, repo_type="dataset")
    fake_hub.reset_stats(REPO)
    for bad, message in (("---\nlicense: [apache-2.0\n---\n# Broken\n", "Invalid YAML"),
                         ("---\n- just\n- a list\n---\n", "YAML metadata must be a mapping")):
        with pytest.raises(ValueError, match=f"Invalid metadata in README.md.\n- {message}"):
            api.create_commit(REPO, [CommitOperationAdd("README.md", bad.encode())], commit_message="card", repo_type="dataset")
    assert fake_hub.stats(REPO)["preupload_calls"] == 0 and fake_hub.stats(REPO)["commits"] == []
    api.create_commit(REPO, [CommitOperationAdd("README.md", good.encode())], commit_message="card", repo_type="dataset")
    assert api.dataset_info(REPO).card_data.pretty_name == "Tiny"


def test_module_level_functions_reach_the_fake_through_the_fixture(fake_hub, tmp_path):
    """huggingface_hub.create_repo & co. are bound at import to an HfApi on https://huggingface.co;
    the fixture routes those requests to the fake (and HF_TOKEN gives the token)."""
    import huggingface_hub

    url = huggingface_hub.create_repo(REPO, repo_type="dataset", private=True)
    assert url.repo_id == REPO and fake_hub.repo_exists(REPO)
    huggingface_hub.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="a.json", repo_id=REPO, repo_type="dataset")
    path = huggingface_hub.hf_hub_download(REPO, "a.json", repo_type="dataset")
    assert Path(path).read_bytes() == b'{"a": 1}' and str(tmp_path / "hf-home") in path
    assert fake_hub.stats(REPO)["commits"][0]["added_paths"] == ["a.json"]


def test_branches_refs_commits_and_pagination(fake_hub):
    api = _api(fake_hub)
    api.create_repo(REPO, repo_type="dataset")
    fake_hub.commit_files(REPO, {f"data/{i:03d}.json": b"{}" * (i + 1) for i in range(60)}, message="seed")
    for i in range(55):
        fake_hub.commit_files(REPO, {"counter.txt": str(i).encode()}, message=f"count {i}")
    api.create_branch(REPO, repo_type="dataset", branch="v1")
    api.create_branch(REPO, repo_type="dataset", branch="v1", exist_ok=True)
    api.create_tag(REPO, repo_type="dataset", tag="first", revision="v1")
    refs = api.list_repo_refs(REPO, repo_type="dataset")
    assert {b.name for b in refs.branches} == {"main", "v1"} and [t.name for t in refs.tags] == ["first"]
    commits = api.list_repo_commits(REPO, repo_type="dataset")  # 57: two Link-header pages
    assert len(commits) == 57 and commits[0].title == "count 54" and commits[-1].title == "initial commit"
    tree = list(api.list_repo_tree(REPO, path_in_repo="data", repo_type="dataset", expand=True))  # 50 per page
    assert [e.path for e in tree] == [f"data/{i:03d}.json" for i in range(60)]
    assert all(e.last_commit.title == "seed" for e in tree)
    paths = [path for method, path, _ in fake_hub.request_log if method == "GET"]
    assert paths.count(f"/api/datasets/{REPO}/tree/main/data") == 2  # followed the Link header
    assert paths.count(f"/api/datasets/{REPO}/commits/main") == 2
    api.upload_file(path_or_fileobj=b"on v1", path_in_repo="v1.txt", repo_id=REPO, repo_type="dataset", revision="v1")
    assert "v1.txt" in fake_hub.files(REPO, revision="v1") and "v1.txt" not in fake_hub.files(REPO)


def test_missing_repo_revision_and_anonymous_private_reads(fake_hub, files):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    api = _api(fake_hub)
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("fake-user/does-not-exist")
    _publish(fake_hub, files)
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(REPO, revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, repo_type="dataset", endpoint=fake_hub.endpoint, token=False,
                          cache_dir=fake_hub.root.parent / "anon-cache")


def test_killed_commit_then_retry_sends_only_what_is_missing(fake_hub, files):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api = _api(fake_hub)
    api.create_repo(REPO, repo_type="dataset", private=True)
    fake_hub.fail("POST", r"/commit/", status=500, times=1)
    ops = [CommitOperationAdd(p, str(files / p)) for p in _local_tree(files)]
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit(REPO, ops, commit_message="Killed", repo_type="dataset")
    assert exc.value.response.status_code == 500
    assert fake_hub.stats(REPO)["lfs_uploads"] == 2 and fake_hub.stats(REPO)["commits"] == []
    fake_hub.reset_stats(REPO)
    ops = [CommitOperationAdd(p, str(files / p)) for p in _local_tree(files)]
    api.create_commit(REPO, ops, commit_message="Retry", repo_type="dataset")
    stats = fake_hub.stats(REPO)
    assert stats["lfs_uploads"] == 0 and stats["batch_present"] == 2 and len(stats["commits"]) == 1


def test_the_fake_refuses_what_the_hub_refuses(fake_hub, files):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api = _api(fake_hub)
    first = _publish(fake_hub, files)
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="v.txt", repo_id=REPO, repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as exc:  # the branch moved since `first`
        api.create_commit(REPO, [CommitOperationAdd("w.txt", b"w")], commit_message="stale",
                          repo_type="dataset", parent_commit=first.oid)
    assert exc.value.response.status_code == 412

    auth = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"}

    def commit(*ops):
        lines = [{"key": "header", "value": {"summary": "raw"}}, *ops]
        return requests.post(f"{fake_hub.endpoint}/api/datasets/{REPO}/commit/main", headers=auth, timeout=30,
                             data=b"".join(json.dumps(line).encode() + b"\n" for line in lines))

    binary = {"key": "file", "value": {"path": "x.bin", "content": base64.b64encode(b"\0\1\2").decode()}}
    r = commit(binary)
    assert r.status_code == 400 and "binary" in r.json()["error"]
    ghost = {"key": "lfsFile", "value": {"path": "g.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}}
    r = commit(ghost)
    assert r.status_code == 400 and "does not exist" in r.json()["error"]
    # An LFS upload href accepts only the announced bytes.
    data = os.urandom(1000)
    batch = requests.post(f"{fake_hub.endpoint}/datasets/{REPO}.git/info/lfs/objects/batch", headers=auth, timeout=30,
                          json={"operation": "upload", "objects": [{"oid": _sha256(data), "size": len(data)}]}).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert os.environ["HF_TOKEN"] not in href
    assert requests.put(href, data=data[:-1] + b"x", timeout=30).status_code == 400
    assert requests.put(href.replace("sig=", "sig=0"), data=data, timeout=30).status_code == 403
    assert requests.put(href, data=data, timeout=30).status_code == 200
    assert fake_hub.stats(REPO)["lfs_uploads"] == 3
    assert fake_hub.server_errors == []


@pytest.mark.slow
def test_stats_route_reset_and_the_token_written_nowhere(fake_hub, files, tmp_path, capfd):
    from huggingface_hub import snapshot_download

    token = os.environ["HF_TOKEN"]
    _publish(fake_hub, files)
    snapshot_download(REPO, repo_type="dataset", endpoint=fake_hub.endpoint, local_dir=tmp_path / "dl")
    with contextlib.suppress(Exception):
        _api(fake_hub, token="hf_wrong").dataset_info(REPO)

    stats = requests.get(f"{fake_hub.endpoint}/_fake/stats", params={"repo_id": REPO}, timeout=30).json()
    assert stats == fake_hub.stats(REPO) and stats["lfs_uploads"] == 2 and len(stats["commits"]) == 1
    assert requests.post(f"{fake_hub.endpoint}/_fake/reset", json={"repo_id": REPO}, timeout=30).status_code == 401
    r = requests.post(f"{fake_hub.endpoint}/_fake/reset", json={"repo_id": REPO}, timeout=30,
                      headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and fake_hub.stats(REPO)["lfs_uploads"] == 0

    everything = json.dumps([fake_hub.stats(), fake_hub.request_log, fake_hub.server_errors, repr(fake_hub)])
    assert token not in everything
    out, err = capfd.readouterr()
    assert token not in out and token not in err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
