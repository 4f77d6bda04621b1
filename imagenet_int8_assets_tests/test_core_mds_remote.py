"""core.mds_remote: the published dataset mirrored to an S3-compatible bucket (moto's server mode,
started here, reached over HTTP by the real boto3 client and by streaming's reader)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imagenet_int8_assets.core import mds_index
from imagenet_int8_assets.core.mds_remote import RemoteError, RemoteMds, check_remote_url
from imagenet_int8_assets.core.storage import mds_root
from imagenet_int8_assets.reader import open_dataset
from imagenet_int8_assets.resources import ImagenetInt8Settings, SettingsError
from imagenet_int8_assets_tests.local_servers import s3_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture
def root(built_sample, tmp_path) -> Path:
    """A copy of a built dataset's MDS root (the tests change it)."""
    copy = tmp_path / "mds"
    shutil.copytree(mds_root(built_sample["settings"].output_path), copy)
    return copy


def _recording_client(s3) -> tuple[object, list[str]]:
    """The real boto3 client, with botocore's own event hook noting each PutObject's key in order."""
    client, puts = s3.client(), []
    client.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: puts.append(params["Key"]))
    return client, puts


def _version_files(root: Path, index: dict) -> dict[str, int]:
    folders = {Path(s["raw_data"]["basename"]).parent for s in index["shards"]}
    return {
        p.relative_to(root).as_posix(): p.stat().st_size for folder in folders for p in (root / folder).iterdir()
    }


def _samples(dataset) -> list[tuple]:
    return [(s["label"], s["label_as_text"], s["latent"].tobytes()) for s in (dataset[i] for i in range(len(dataset)))]


def test_publish_uploads_the_versions_then_the_index_and_streaming_reads_the_bucket(root, s3_env, tmp_path):
    bucket = s3_env.new_bucket()
    client, puts = _recording_client(s3_env)
    remote = RemoteMds(f"s3://{bucket}/imagenet.int8", client=client)
    index = json.loads((root / "index.json").read_text())

    result = remote.publish(root)

    files = _version_files(root, index)
    assert result.published and sorted(result.uploaded) == sorted(files) and result.removed == []
    assert remote.list_sizes() == {**files, "index.json": (root / "index.json").stat().st_size,
                                   "build.json": (root / "build.json").stat().st_size}
    # nothing names a shard before it is there: every version file first, then the index, then build.json
    keys = [k.removeprefix("imagenet.int8/") for k in puts]
    assert keys[-2:] == ["index.json", "build.json"] and set(keys[:-2]) == set(files)
    for folder in {Path(k).parent for k in files}:  # inside a version: shards, then its index.json and build.json
        order = [Path(k).name for k in keys if Path(k).parent == folder]
        assert order[-2:] == ["index.json", "build.json"], order

    # the real reader, remote=s3://..., downloads the shards and reads what the local folder holds
    from_bucket = open_dataset(f"s3://{bucket}/imagenet.int8", local=tmp_path / "cache")
    assert _samples(from_bucket) == _samples(open_dataset(root))

    again = RemoteMds(f"s3://{bucket}/imagenet.int8", client=client).publish(root)
    assert (again.uploaded, again.published, again.present) == ([], False, len(files))


def test_an_interrupted_upload_resumes_and_an_object_is_never_replaced(root, s3_env):
    bucket = s3_env.new_bucket()
    remote = RemoteMds(f"s3://{bucket}/ds", client=s3_env.client())
    index = json.loads((root / "index.json").read_text())
    files = sorted(_version_files(root, index))
    # a run killed after some uploads: those files are there, no index yet
    for relative in files[:3]:
        assert remote.create(relative, root / relative, (root / relative).stat().st_size)
    assert remote.read("index.json") is None

    result = remote.publish(root)
    assert result.published and result.present == 3 and sorted(result.uploaded) == files[3:]

    # a bucket object that contradicts its version (same name, other bytes) stops the publication
    other = RemoteMds(f"s3://{bucket}/other", client=s3_env.client())
    shard = next(f for f in files if f.endswith(".mds"))
    s3_env.client().put_object(Bucket=bucket, Key=f"other/{shard}", Body=b"not the shard")
    with pytest.raises(RemoteError, match=r"exists with 13 bytes.*delete that object and re-run"):
        other.publish(root)
    assert other.read("index.json") is None  # never an index naming a bad shard
    assert other.list_sizes()[shard] == 13  # and the object was not replaced


def _new_version(root: Path, class_name: str, marker: int) -> str:
    """A rebuilt class: its current version with another build record, committed as a new version,
    merged and published locally the way mds_dataset does."""
    current = mds_index.current_version_dir(root, class_name)
    staged = root / f".tmp-{marker}"
    shutil.copytree(current, staged)
    info = json.loads((staged / "build.json").read_text())
    (staged / "build.json").write_text(json.dumps({**info, "rebuild": marker}))
    folder = mds_index.commit_class_version(root, class_name, staged)
    classes = sorted(mds_index.read_published_index(root)[mds_index.RECORD_KEY]["per_class"])
    index, summary = mds_index.merged_index(root, classes)
    assert mds_index.publish(root, index, mds_index.dataset_record(info, summary))
    mds_index.collect_garbage(root)
    return folder.relative_to(root).as_posix()


def test_the_previous_index_keeps_its_versions_one_publication_then_they_go(root, s3_env):
    bucket = s3_env.new_bucket()
    remote = RemoteMds(f"s3://{bucket}/ds", client=s3_env.client())
    first_index = (root / "index.json").read_bytes()
    remote.publish(root)
    class_name = sorted(json.loads(first_index)[mds_index.RECORD_KEY]["per_class"])[0]
    first = mds_index.current_version_dir(root, class_name).relative_to(root).as_posix()

    second = _new_version(root, class_name, 1)
    result = remote.publish(root)
    assert result.published and result.removed == []
    assert remote.read(".previous-index.json") == first_index  # readers of the old index keep their shards
    assert any(k.startswith(first + "/") for k in remote.list_sizes()) and (root / first).is_dir()

    _new_version(root, class_name, 2)
    assert not (root / first).exists()  # the local sweep removed it: no index refers to it any more
    result = remote.publish(root)
    assert result.removed == [first]
    listed = remote.list_sizes()
    assert not any(k.startswith(first + "/") for k in listed) and any(k.startswith(second + "/") for k in listed)


def test_a_bad_remote_is_named_with_what_to_do(s3_env, tmp_path):
    with pytest.raises(ValueError, match="not an s3:// URL"):
        check_remote_url("gs://bucket/x")
    with pytest.raises(SettingsError, match=r"IMAGENET_INT8_MDS_REMOTE='/local/path'"):
        ImagenetInt8Settings(output=str(tmp_path), mds_remote="/local/path").validate_values()
    with pytest.raises(RemoteError, match=r"s3://no-such-bucket/x.*NoSuchBucket.*Check that the bucket exists"):
        RemoteMds("s3://no-such-bucket/x", client=s3_env.client()).list_sizes()

