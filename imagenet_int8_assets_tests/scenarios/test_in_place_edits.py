"""A source image whose content changes while its size and modification time stay (``touch -r``, a
restore from backup, some sync tools) is noticed by the next scan and rebuilt by the next
`imagenet-int8 build`; a change the scan cannot see is rebuilt once reading the crops finds it,
so the advice of every crop verification error leads somewhere. Real files, real Pillow, the real
CLI in subprocesses and its Dagster instance; no mocks."""

from __future__ import annotations

import io
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagenet_int8_assets.core.crops.crop_store import (
    VERIFICATION_FAILED_FILE,
    CropVerificationError,
    verification_failure,
)
from imagenet_int8_assets.core.source.sources import ClassLabels, class_data_versions, scan_source
from imagenet_int8_assets.core.common.layout import crops_dir, manifest_path
from imagenet_int8_assets.core.crops.crop_store import read_crops, write_crops
from imagenet_int8_assets_tests.support.builds import BIN, cli_env, crops, encoded_classes, make_image_folder, run_cli

NEW_COLUMNS = ["ctime_ns", "inode", "change"]


def rewrite_in_place(path: Path) -> None:
    """Other pixels in the same number of bytes, the modification time put back (what `touch -r` or a
    restore does): a JPEG of the half-inverted picture, padded after its end marker (decoders stop
    there) to the old size."""
    st = path.stat()
    with Image.open(path) as img:
        before = np.asarray(img.convert("RGB"))
    pixels = before.copy()
    pixels[: pixels.shape[0] // 2] = 255 - pixels[: pixels.shape[0] // 2]
    for quality in range(90, 0, -10):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        if len(data := buffer.getvalue()) <= st.st_size:
            break
    path.write_bytes(data + b"\0" * (st.st_size - len(data)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = path.stat()
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with Image.open(path) as img:
        after = np.asarray(img.convert("RGB"))
    assert after.shape == before.shape and np.abs(after.astype(int) - before).mean() > 20  # other pixels


def _scan(root: Path, previous: pd.DataFrame | None = None):
    frame, labels = scan_source(root, previous=previous)
    return frame, class_data_versions(frame, labels)


def _row(frame: pd.DataFrame, image_id: str) -> dict:
    return frame.set_index("id").loc[image_id].to_dict()


# ------------------------------------------------------------------------------------------
# the scan: stamps, their persistence, false positives and the upgrade


def test_a_file_rewritten_in_place_changes_only_its_class_version_until_it_changes_again(tmp_path):
    root = make_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    first, versions = _scan(root)
    assert (first["change"] == "").all() and (first["ctime_ns"] > 0).all() and (first["inode"] > 0).all()
    again, same = _scan(root, first)
    assert same == versions and again.attrs["reused_rows"] == 4  # a rescan with no change: nothing new

    edited = root / "a" / "a_0000.JPEG"
    rewrite_in_place(edited)
    third, after = _scan(root, again)
    assert third.attrs["rewritten_files"] == 1 and third.attrs["reused_rows"] == 3  # decoded again, alone
    stamp = _row(third, "a/a_0000.JPEG")["change"]
    assert stamp == f"{edited.stat().st_ctime_ns}:{edited.stat().st_ino}"
    assert after["a"] != versions["a"] and after["b"] == versions["b"]

    fourth, kept = _scan(root, third)  # the file stays as it is: the stamp and the version stay
    assert kept == after and fourth.attrs["reused_rows"] == 4 and _row(fourth, "a/a_0000.JPEG")["change"] == stamp

    st = edited.stat()  # an ordinary edit later (a new modification time) is still a change
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fifth, later = _scan(root, fourth)
    assert later["a"] not in (versions["a"], after["a"]) and later["b"] == versions["b"]
    assert _row(fifth, "a/a_0000.JPEG")["change"] == "" and fifth.attrs["rewritten_files"] == 0

    replacement = tmp_path / "replacement.JPEG"  # replaced by a rename, times and size kept: a new inode
    replacement.write_bytes(edited.read_bytes())
    st = edited.stat()
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, edited)
    sixth, renamed = _scan(root, fifth)
    assert sixth.attrs["rewritten_files"] == 1 and renamed["a"] != later["a"] and renamed["b"] == versions["b"]


def test_a_permission_change_alone_rebuilds_at_most_its_class(tmp_path):
    """chmod, chown or a new hard link change the ctime as a rewrite does: the scan cannot tell them
    apart, so the class is rebuilt (documented), and no other class is."""
    root = make_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    first, versions = _scan(root)
    os.chmod(root / "b" / "b_0001.JPEG", 0o600)
    second, after = _scan(root, first)
    assert second.attrs["rewritten_files"] == 1 and after["a"] == versions["a"]
    assert (second["status"] == first["status"]).all()  # decoded again, to the same rows


def test_a_manifest_of_an_earlier_release_is_a_baseline(tmp_path):
    """A manifest written before ctime and inode were recorded: its rows are reused on size and
    modification time as before, so every class keeps the version the earlier release recorded (an
    upgrade rebuilds nothing); from then on an edit in place is detected."""
    root = make_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    frame, _ = scan_source(root)
    path = tmp_path / "old.parquet"
    frame.drop(columns=NEW_COLUMNS).to_parquet(path, index=False)  # as an earlier release wrote it
    old = pd.read_parquet(path)
    _, labels = scan_source(root)
    earlier = class_data_versions(old, labels)  # the earlier releases' versions (pinned in core/source/test_sources.py)

    upgraded, versions = _scan(root, old)
    assert versions == earlier and upgraded.attrs["reused_rows"] == 4 and (upgraded["change"] == "").all()
    assert (upgraded["ctime_ns"] > 0).all()  # recorded now, for the next scan

    rewrite_in_place(root / "b" / "b_0000.JPEG")
    _, after = _scan(root, upgraded)
    assert after["b"] != earlier["b"] and after["a"] == earlier["a"]


def test_only_non_empty_stamps_enter_the_data_version():
    frame = pd.DataFrame(
        {
            "id": ["a/1.jpg", "a/2.jpg", "b/1.jpg"], "class_folder": ["a", "a", "b"], "bytes": [10, 11, 12],
            "mtime_ns": [5, 6, 7], "status": ["ok", "ok", "ok"], "reason": ["", "", ""], "change": ["", "", ""],
        }
    )
    labels = ClassLabels("folder-order", {"a": 0, "b": 1}, {"a": "A", "b": "B"}, "")
    versions = class_data_versions(frame, labels)
    assert class_data_versions(frame.drop(columns=["change"]), labels) == versions
    stamped = frame.assign(change=["", "123:45", ""])
    changed = class_data_versions(stamped, labels)
    assert changed["a"] != versions["a"] and changed["b"] == versions["b"]
    other = class_data_versions(frame.assign(change=["", "123:46", ""]), labels)
    assert other["a"] not in (versions["a"], changed["a"])


# ------------------------------------------------------------------------------------------
# crop verification failures are recorded for the build


@pytest.mark.parametrize("storage", ["png", "none"])
def test_a_failed_verification_is_recorded_until_the_crops_are_written_again(tmp_path, storage):
    source = tmp_path / "src" / "a"
    source.mkdir(parents=True)
    images = crops(2)
    ids = []
    for i, image in enumerate(images):  # sources whose centre crop at 256 is the image itself
        Image.fromarray(image).save(source / f"{i}.png")
        ids.append(f"a/{i}.png")
    out, folder = tmp_path / "out", crops_dir(tmp_path / "out", "a")
    meta = {"recipe": "imagenet.int8", "size": 256, "failed": []}
    write_crops(out, "a", ids, images, meta, storage, tmp_path / "src")
    assert np.array_equal(np.asarray(read_crops(out, "a")[1]), images) and verification_failure(folder) is None

    damaged = folder / "images" / "000001.png" if storage == "png" else source / "1.png"
    damaged.write_bytes(damaged.read_bytes()[:-40])  # truncated: no longer the recorded pixels
    with pytest.raises(CropVerificationError) as caught:
        read_crops(out, "a")[1][[0, 1]]
    message = str(caught.value)
    record = folder / VERIFICATION_FAILED_FILE
    assert f"Run `imagenet-int8 build`: it rebuilds class 'a' (this failure is recorded in {record}" in message
    assert "preprocessed_crops, vae_latents and mds_shards for class 'a'" in message and str(damaged) in message
    recorded = verification_failure(folder)
    assert recorded["class"] == "a" and recorded["paths"] == [str(damaged)]

    if storage == "none":
        Image.fromarray(images[1]).save(damaged)  # the source put right: writing the crops again clears it
    write_crops(out, "a", ids, images, meta, storage, tmp_path / "src")
    assert verification_failure(folder) is None and np.array_equal(np.asarray(read_crops(out, "a")[1]), images)


# ------------------------------------------------------------------------------------------
# the real CLI


def _dataset_bytes(out: Path) -> dict[str, bytes]:
    from imagenet_int8_assets.core.dataset.mds_index import read_published_index

    root = out / "mds"
    shards = read_published_index(root)["shards"]
    return {s["raw_data"]["basename"]: (root / s["raw_data"]["basename"]).read_bytes() for s in shards}


def _build(env: dict, cwd: Path) -> str:
    proc = run_cli([str(BIN / "imagenet-int8"), "build"], env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


class OutputInstance:
    """The CLI's output seen in process, as the UI sees it: its settings, definitions and instance."""

    def __init__(self, env: dict, out: Path):
        from imagenet_int8_assets.definitions import build_definitions
        from imagenet_int8_assets.resources import ImagenetInt8Settings

        self.settings = ImagenetInt8Settings(
            source=env["IMAGENET_INT8_SOURCE"], output=str(out), vae="tiny-random", device="cpu", workers=1,
            crop_size=int(env["IMAGENET_INT8_CROP_SIZE"]),
        )
        self.defs = build_definitions(self.settings)
        self.home = str(out / "dagster_home")

    def materialize(self, asset: str):
        with dg.DagsterInstance.from_config(self.home) as instance:
            job = self.defs.resolve_implicit_global_asset_job_def()
            return job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(asset)], raise_on_error=False)

    def rescan(self) -> tuple[int, list[str]]:
        """raw_manifest materialized: (its changed_classes, the classes `imagenet-int8 build` would build)."""
        from imagenet_int8_assets.core.source.manifest import read_source_classes
        from imagenet_int8_assets.build.plan import plan_build

        result = self.materialize("raw_manifest")
        assert result.success
        changed = next(
            m for m in result.asset_materializations_for_node("raw_manifest") if m.asset_key == dg.AssetKey("raw_manifest")
        ).metadata["changed_classes"].value
        with dg.DagsterInstance.from_config(self.home) as instance:
            plan = plan_build(instance, self.defs, self.settings, read_source_classes(self.settings.output_path)["classes"], False)
        return changed, plan.classes


@pytest.mark.slow
def test_build_rebuilds_the_class_of_an_image_rewritten_in_place_and_follows_its_own_advice(tmp_path):
    from imagenet_int8_assets.build.driver import _failures

    source = make_image_folder(tmp_path / "src", {"a": 2, "b": 2, "c": 2})
    env = cli_env(tmp_path, IMAGENET_INT8_SOURCE=str(source), IMAGENET_INT8_CROP_SIZE="64")
    out = tmp_path / "out"
    _build(env, tmp_path)
    output = OutputInstance(env, out)

    # an upgrade: the manifest as an earlier release wrote it (no ctime, inode or stamps) marks nothing stale
    pd.read_parquet(manifest_path(out)).drop(columns=NEW_COLUMNS).to_parquet(manifest_path(out), index=False)
    assert output.rescan() == (0, [])

    # b: content rewritten in place, size and modification time kept (the scan sees its new ctime)
    rewrite_in_place(source / "b" / "b_0000.JPEG")
    # a: the same, but the scan cannot see it (a file system whose ctime and inode do not change: the
    # manifest is told the file's new ones); the report, which recomputes the crops, finds it
    hidden = source / "a" / "a_0001.JPEG"
    rewrite_in_place(hidden)
    manifest = pd.read_parquet(manifest_path(out))
    row = manifest["id"] == "a/a_0001.JPEG"
    manifest.loc[row, "ctime_ns"], manifest.loc[row, "inode"] = hidden.stat().st_ctime_ns, hidden.stat().st_ino
    manifest.to_parquet(manifest_path(out), index=False)
    report = output.materialize("reconstruction_report")
    message = " ".join(_failures(report))
    assert not report.success and str(hidden) in message and "Traceback" not in message
    assert "Run `imagenet-int8 build`: it rebuilds class 'a'" in message, message

    # following the advice: the build rebuilds both classes, only them, and the report passes
    log = _build(env, tmp_path)
    assert "2 of 3 class(es) to build (1 crops failed verification when read, 1 stale: has a new data version)" in log
    assert encoded_classes(out) == {"a": 2, "b": 2, "c": 1}
    assert verification_failure(crops_dir(out, "a")) is None
    # b's stamp stays while the file does: its version does not flip back, nothing is left to build
    assert output.rescan() == (0, [])

    # the dataset equals a clean build of the edited source
    clean = cli_env(tmp_path / "clean", IMAGENET_INT8_SOURCE=str(source), IMAGENET_INT8_CROP_SIZE="64")
    _build(clean, tmp_path)
    assert _dataset_bytes(out) == _dataset_bytes(tmp_path / "clean" / "out")
