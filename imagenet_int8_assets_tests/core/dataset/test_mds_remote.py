"""core.dataset.mds_remote: the published dataset mirrored to an S3-compatible bucket (moto's server mode,
started here, reached over HTTP by the real boto3 client and by streaming's reader)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.dataset.mds_remote import RemoteError, RemoteMds, check_remote_url
from imagenet_int8_assets.core.common.layout import manifest_path, mds_root
from imagenet_int8_assets.reader import DatasetDamaged, open_dataset
from imagenet_int8_assets.resources import ImagenetInt8Settings, SettingsError
from imagenet_int8_assets_tests.support.builds import BIN, cli_env, run_cli

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def s3_env(s3, monkeypatch):
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture
def sample_mds(built_sample, tmp_path) -> Path:
    """A copy of the built sample's MDS root (the tests change it)."""
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


@pytest.mark.slow
def test_publish_uploads_the_versions_then_the_index_and_streaming_reads_the_bucket(sample_mds, s3_env, tmp_path):
    bucket = s3_env.new_bucket()
    client, puts = _recording_client(s3_env)
    remote = RemoteMds(f"s3://{bucket}/imagenet.int8", client=client)
    index = json.loads((sample_mds / "index.json").read_text())

    result = remote.mirror_dataset(sample_mds)

    files = _version_files(sample_mds, index)
    assert result.published and sorted(result.uploaded) == sorted(files) and result.removed == []
    assert remote.list_sizes() == {**files, "index.json": (sample_mds / "index.json").stat().st_size,
                                   "build.json": (sample_mds / "build.json").stat().st_size}
    # nothing names a shard before it is there: every version file first, then the index, then build.json
    keys = [k.removeprefix("imagenet.int8/") for k in puts]
    assert keys[-2:] == ["index.json", "build.json"] and set(keys[:-2]) == set(files)
    for folder in {Path(k).parent for k in files}:  # inside a version: shards, then its index.json and build.json
        order = [Path(k).name for k in keys if Path(k).parent == folder]
        assert order[-2:] == ["index.json", "build.json"], order

    # the real reader, remote=s3://..., downloads the shards and reads what the local folder holds
    from_bucket = open_dataset(f"s3://{bucket}/imagenet.int8", local=tmp_path / "cache")
    assert _samples(from_bucket) == _samples(open_dataset(sample_mds))

    again = RemoteMds(f"s3://{bucket}/imagenet.int8", client=client).mirror_dataset(sample_mds)
    assert (again.uploaded, again.published, again.present) == ([], False, len(files))


def test_an_interrupted_upload_resumes_and_an_object_is_never_replaced(sample_mds, s3_env):
    bucket = s3_env.new_bucket()
    remote = RemoteMds(f"s3://{bucket}/ds", client=s3_env.client())
    index = json.loads((sample_mds / "index.json").read_text())
    files = sorted(_version_files(sample_mds, index))
    # a run killed after some uploads: those files are there, no index yet
    for relative in files[:3]:
        assert remote.create(relative, sample_mds / relative, (sample_mds / relative).stat().st_size)
    assert remote.read("index.json") is None

    result = remote.mirror_dataset(sample_mds)
    assert result.published and result.present == 3 and sorted(result.uploaded) == files[3:]

    # a bucket object that contradicts its version (same name, other bytes) stops the publication
    other = RemoteMds(f"s3://{bucket}/other", client=s3_env.client())
    shard = next(f for f in files if f.endswith(".mds"))
    s3_env.client().put_object(Bucket=bucket, Key=f"other/{shard}", Body=b"not the shard")
    with pytest.raises(RemoteError, match=r"exists with 13 bytes.*delete that object and re-run"):
        other.mirror_dataset(sample_mds)
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
    assert mds_index.swap_in_index(root, index, mds_index.dataset_record(info, summary))
    mds_index.collect_garbage(root)
    return folder.relative_to(root).as_posix()


def test_the_previous_index_keeps_its_versions_one_publication_then_they_go(sample_mds, s3_env):
    bucket = s3_env.new_bucket()
    remote = RemoteMds(f"s3://{bucket}/ds", client=s3_env.client())
    first_index = (sample_mds / "index.json").read_bytes()
    remote.mirror_dataset(sample_mds)
    class_name = sorted(json.loads(first_index)[mds_index.RECORD_KEY]["per_class"])[0]
    first = mds_index.current_version_dir(sample_mds, class_name).relative_to(sample_mds).as_posix()

    second = _new_version(sample_mds, class_name, 1)
    result = remote.mirror_dataset(sample_mds)
    assert result.published and result.removed == []
    assert remote.read(".previous-index.json") == first_index  # readers of the old index keep their shards
    assert any(k.startswith(first + "/") for k in remote.list_sizes()) and (sample_mds / first).is_dir()

    _new_version(sample_mds, class_name, 2)
    assert not (sample_mds / first).exists()  # the local sweep removed it: no index refers to it any more
    result = remote.mirror_dataset(sample_mds)
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



# ---- the mirror holds exactly the local dataset: content, not size --------------------------------


def _altered(body: bytes) -> bytes:
    """The same length, one byte changed (in the middle of the last sample's data)."""
    at = len(body) - 100
    return body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1:]


def _put_altered(s3, bucket: str, key: str) -> None:
    client = s3.client()
    client.put_object(Bucket=bucket, Key=key, Body=_altered(client.get_object(Bucket=bucket, Key=key)["Body"].read()))


def _multipart(client, bucket: str, key: str, body: bytes) -> None:
    """An object uploaded in one part of a multipart upload: its ETag is "<md5 of md5s>-1", not the MD5."""
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    part = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=body)
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]}
    )


def test_an_object_changed_in_the_bucket_with_the_same_length_is_never_accepted(sample_mds, s3_env):
    bucket = s3_env.new_bucket()
    remote = RemoteMds(f"s3://{bucket}/ds", client=s3_env.client())
    remote.mirror_dataset(sample_mds)
    first_index = remote.read("index.json")
    index = json.loads(first_index)
    shard = index["shards"][0]["raw_data"]["basename"]
    _put_altered(s3_env, bucket, f"ds/{shard}")
    assert remote.list_sizes()[shard] == (sample_mds / shard).stat().st_size  # a size check cannot see it

    message = rf"s3://{bucket}/ds/{re.escape(shard)} exists with the size of the local file .* but other content.*" \
              r"delete that object and re-run"
    with pytest.raises(RemoteError, match=message):  # the same index again
        RemoteMds(f"s3://{bucket}/ds", client=s3_env.client()).mirror_dataset(sample_mds)
    other_class = next(c for c in sorted(index[mds_index.RECORD_KEY]["per_class"]) if not shard.startswith(
        mds_index.current_version_dir(sample_mds, c).relative_to(sample_mds).as_posix()))
    _new_version(sample_mds, other_class, 1)
    with pytest.raises(RemoteError, match=message):  # a new index naming the changed shard is not published
        RemoteMds(f"s3://{bucket}/ds", client=s3_env.client()).mirror_dataset(sample_mds)
    assert remote.read("index.json") == first_index

    # create() meets it too (another run listed the bucket before it appeared): refused, not replaced
    with pytest.raises(RemoteError, match=message):
        remote.create(shard, sample_mds / shard, (sample_mds / shard).stat().st_size)
    same = index["shards"][1]["raw_data"]["basename"]
    assert remote.create(same, sample_mds / same, (sample_mds / same).stat().st_size) is False  # same content: kept


def test_an_object_changed_after_its_upload_is_caught_by_the_check_before_the_index(sample_mds, s3_env):
    bucket = s3_env.new_bucket()
    client, puts = _recording_client(s3_env)
    shard = json.loads((sample_mds / "index.json").read_text())["shards"][0]["raw_data"]["basename"]
    changed = []

    def change_once(**_):  # before the listing that follows the uploads: someone rewrites the shard
        if f"ds/{shard}" in puts and not changed:
            changed.append(shard)
            _put_altered(s3_env, bucket, f"ds/{shard}")

    client.meta.events.register("before-call.s3.ListObjectsV2", change_once)
    remote = RemoteMds(f"s3://{bucket}/ds", client=client)
    with pytest.raises(RemoteError, match=rf"1 file\(s\) the index names are not in .* local content .*{re.escape(shard)}"):
        remote.mirror_dataset(sample_mds)
    assert changed and remote.read("index.json") is None


def test_objects_whose_etag_is_not_an_md5_are_compared_by_reading_them(sample_mds, s3_env):
    bucket = s3_env.new_bucket()
    client = s3_env.client()
    shard = json.loads((sample_mds / "index.json").read_text())["shards"][0]["raw_data"]["basename"]
    body = (sample_mds / shard).read_bytes()
    _multipart(client, bucket, f"ok/{shard}", body)
    assert "-" in client.head_object(Bucket=bucket, Key=f"ok/{shard}")["ETag"]
    result = RemoteMds(f"s3://{bucket}/ok", client=client).mirror_dataset(sample_mds)
    assert result.published and shard not in result.uploaded  # read back: the same bytes, kept

    _multipart(client, bucket, f"bad/{shard}", _altered(body))
    with pytest.raises(RemoteError, match=r"with the size of the local file .* but other content"):
        RemoteMds(f"s3://{bucket}/bad", client=client).mirror_dataset(sample_mds)


# ---- reading from the bucket: each downloaded shard checked against its recorded hash -------------


def test_reading_from_the_bucket_checks_each_downloaded_shard_against_its_hash(sample_mds, s3_env, tmp_path):
    bucket = s3_env.new_bucket()
    RemoteMds(f"s3://{bucket}/ds", client=s3_env.client()).mirror_dataset(sample_mds)
    url = f"s3://{bucket}/ds"
    local = _samples(open_dataset(sample_mds))
    intact = open_dataset(url, local=tmp_path / "intact")
    assert intact.verified.startswith(f"each shard's xxh3_64 hash recorded in index.json, by streaming as the shard "
                                      f"is downloaded from {url}")
    assert _samples(intact) == local

    index = json.loads((sample_mds / "index.json").read_text())
    shard = index["shards"][1]["raw_data"]["basename"]
    _put_altered(s3_env, bucket, f"ds/{shard}")
    damaged = open_dataset(url, local=tmp_path / "damaged")
    first = index["shards"][0]["samples"]  # the changed shard's first sample
    for _ in range(2):  # and again: the bad download is not kept in the cache
        with pytest.raises(DatasetDamaged, match=rf"shard {re.escape(shard)} downloaded from {url} does not match "
                                                 r"the xxh3_64 hash its index.json records"):
            damaged[first]
    assert not (tmp_path / "damaged" / shard).exists()
    assert _samples_of(damaged, range(first)) == local[:first]  # the other shards read as before

    unchecked = open_dataset(url, local=tmp_path / "unchecked", verify="none")
    assert unchecked.verified.startswith("nothing (verify='none'")


def _samples_of(dataset, ids) -> list[tuple]:
    return [(s["label"], s["label_as_text"], s["latent"].tobytes()) for s in (dataset[i] for i in ids)]


# ---- a bucket set on a built output is published; the summary says "published" only when it is ----


@pytest.mark.slow
def test_a_bucket_set_on_a_built_output_gets_the_dataset_and_the_summary_tells_the_truth(
    built_sample, s3_env, tmp_path, monkeypatch
):
    from imagenet_int8_assets.build.plan import plan_build
    from imagenet_int8_assets.build.driver import _summary

    built = built_sample["settings"]
    url = f"s3://{s3_env.new_bucket()}/ds2"
    settings = ImagenetInt8Settings(output=built.output, vae="tiny-random", device="cpu", workers=1, mds_remote=url)
    root = mds_root(built.output_path)
    classes = sorted(json.loads((root / "index.json").read_text())[mds_index.RECORD_KEY]["per_class"])
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))

    def plan(with_settings):
        return plan_build(built_sample["instance"], built_sample["defs"], with_settings, classes, force=False)

    assert (plan(built).classes, plan(built).dataset) == ([], False)  # the output is up to date
    assert (plan(settings).classes, plan(settings).dataset) == ([], True)  # but the bucket is empty
    assert f"(NOT published to {url}: " in _summary(settings) and "published to" not in _summary(built)

    RemoteMds(url).mirror_dataset(root)  # what mds_dataset does
    assert plan(settings).dataset is False
    assert f"Dataset: {root} (published to {url} too)" in _summary(settings)

    RemoteMds(url).write("index.json", b"{}")  # the bucket serves something else
    assert plan(settings).dataset is True and f"(NOT published to {url}: " in _summary(settings)


# ---- credentials never inside the URL, never shown -----------------------------------------------


def test_credentials_in_the_url_are_refused_and_never_shown(s3_env, tmp_path, monkeypatch):
    url = "s3://AKIAEXAMPLE:se/cr+et@bucket/prefix"
    with pytest.raises(ValueError) as refused:
        check_remote_url(url)
    assert "'s3://***@bucket/prefix'" in str(refused.value) and "AWS_ACCESS_KEY_ID" in str(refused.value)
    with pytest.raises(SettingsError) as refused:
        ImagenetInt8Settings(output=str(tmp_path), mds_remote=url).validate_values()
    assert "IMAGENET_INT8_MDS_REMOTE='s3://***@bucket/prefix': credentials do not belong in the URL" in str(refused.value)
    assert "se/cr+et" not in str(refused.value) and "AKIAEXAMPLE" not in str(refused.value)

    # the endpoint may carry credentials too: errors show it redacted
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://user:pw-secret@127.0.0.1:{port}")
    remote = RemoteMds("s3://bucket/x")
    for call in (remote.list_sizes, remote.check_bucket):
        with pytest.raises(RemoteError) as failed:
            call()
        assert f"http://***@127.0.0.1:{port}" in str(failed.value) and "pw-secret" not in str(failed.value)


# ---- a missing or unreachable bucket is found before any work ------------------------------------


@pytest.mark.slow
def test_check_bucket_names_a_missing_bucket_and_fails_fast_on_a_silent_endpoint(s3_env, monkeypatch):
    bucket = s3_env.new_bucket()
    RemoteMds(f"s3://{bucket}/x").check_bucket()  # exists: nothing to say
    with pytest.raises(RemoteError, match=rf"bucket 'no-such-bucket' does not exist at {s3_env.endpoint} .*create it"):
        RemoteMds("s3://no-such-bucket/x").check_bucket()

    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"bucket 'b' cannot be reached at .*check the endpoint"):
            RemoteMds("s3://b/x").check_bucket()
        assert time.monotonic() - start < 30


def test_build_with_a_missing_bucket_stops_before_the_manifest_run(s3, tmp_path):
    env = cli_env(tmp_path, **s3.env(), IMAGENET_INT8_MDS_REMOTE="s3://no-such-bucket/imagenet.int8")
    proc = run_cli([str(BIN / "imagenet-int8"), "build"], env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("IMAGENET_INT8_MDS_REMOTE='s3://no-such-bucket/imagenet.int8': bucket 'no-such-bucket' does not exist "
            f"at {s3.endpoint}") in proc.stderr
    assert "Building from" not in proc.stdout and not manifest_path(tmp_path / "out").exists()

    env["IMAGENET_INT8_MDS_REMOTE"] = "s3://AKIAEXAMPLE:se/cr+et@bucket/prefix"
    proc = run_cli([str(BIN / "imagenet-int8"), "build"], env)
    assert proc.returncode == 2 and "credentials do not belong in the URL" in proc.stderr, proc.stderr
    assert "se/cr+et" not in proc.stdout + proc.stderr


def test_a_remote_dataset_decodes_with_the_shape_and_range_it_records(s3_env, tmp_path):
    """A dataset built with another layout and range (16x8x8 at +-5) read from the bucket: the codes
    decode as its build record says, not with the published 4x32x32 at +-12."""
    import numpy as np

    from imagenet_int8_assets.core.dataset import mds
    from imagenet_int8_assets.core.latents.quantize import dequantize
    from imagenet_int8_assets.reader import open_dataset

    root = tmp_path / "mds"
    codes = np.random.default_rng(5).integers(0, 256, (3, 16, 8, 8), dtype=np.uint8)
    info = {"latent_shape": [16, 8, 8], "quant_range": 5.0, "seed": 0}
    mds.write_class_shards(root, "a", codes, 0, "a", info, value_range=5.0)
    index, summary = mds_index.merged_index(root, ["a"])
    mds_index.swap_in_index(root, index, mds_index.dataset_record(info, summary))
    bucket = s3_env.new_bucket()
    RemoteMds(f"s3://{bucket}/ds", client=s3_env.client()).mirror_dataset(root)

    dataset = open_dataset(f"s3://{bucket}/ds", local=str(tmp_path / "cache"))
    latents = [dataset[i]["latent"] for i in range(len(dataset))]
    assert dataset.latent_shape == (16, 8, 8) and dataset.value_range == 5.0
    assert all(z.shape == (16, 8, 8) for z in latents)
    expected = sorted(dequantize(c, 5.0).astype(np.float32).tobytes() for c in codes)
    assert sorted(z.tobytes() for z in latents) == expected
