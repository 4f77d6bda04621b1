"""Settings checked before any work, nothing to build, a full disk.

Real settings, a real Dagster instance, the real `imagenet-int8` and `dagster` commands in
subprocesses, real tmpfs file systems (mounted as root; skipped with the reason printed when
mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from imagenet_int8_assets.assets.disk_space import SpaceNeeds, disk_full_error
from imagenet_int8_assets.build.run_events import error_text
from imagenet_int8_assets.core.quality.metrics import ssim
from imagenet_int8_assets.core.common.layout import manifest_path
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.resources import MIN_CROP_SIZE, ImagenetInt8Settings, SettingsError
from imagenet_int8_assets_tests.support.builds import BIN, cli_env, make_image_folder, run_cli

TINY = {"vae": "tiny-random", "device": "cpu", "workers": 1}






@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real, small tmpfs at ``path`` (root only); skips the test, saying why, when it cannot mount."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = f"cannot mount a tmpfs here ({(proc.stderr or proc.stdout).strip() or 'mount failed'}); needs root"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path, leave: int) -> Path:
    """Fill ``folder``'s file system with one file so that about ``leave`` bytes stay free."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def _materialize(settings: ImagenetInt8Settings, selection: list[str], instance=None):
    defs = build_definitions(settings, partitions_per_run=10)
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance or dg.DagsterInstance.ephemeral(),
        asset_selection=[dg.AssetKey(k) for k in selection],
        raise_on_error=False,
    )


def _step_errors(result) -> dict[str, str]:
    return {
        e.step_key: error_text(e.event_specific_data.error)
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    }


# --- every value is checked before any work -------------------------------------------------

# (variable, raw environment value, settings field, value as the field holds it, run it in Dagster)
BAD_VALUES = [
    ("IMAGENET_INT8_QUANT_RANGE", "inf", "quant_range", math.inf, True),
    ("IMAGENET_INT8_QUANT_RANGE", "nan", "quant_range", math.nan, True),
    ("IMAGENET_INT8_QUANT_RANGE", "-3", "quant_range", -3.0, True),
    ("IMAGENET_INT8_REPORT_MAX_PSNR_GAP", "nan", "report_max_psnr_gap", math.nan, True),
    ("IMAGENET_INT8_REPORT_MAX_CLIP_FRACTION", "nan", "report_max_clip_fraction", math.nan, True),
    ("IMAGENET_INT8_REPORT_MAX_CLIP_FRACTION", "1.5", "report_max_clip_fraction", 1.5, True),
    ("IMAGENET_INT8_WORKERS", "-1", "workers", -1, True),
    ("IMAGENET_INT8_SEED", "-1", "seed", -1, True),
    ("IMAGENET_INT8_SEED", str(2**32), "seed", 2**32, True),
    ("IMAGENET_INT8_CROP_SIZE", "1000000", "crop_size", 1000000, True),
    ("IMAGENET_INT8_CROP_SIZE", "8", "crop_size", 8, True),
    ("IMAGENET_INT8_CROP_SIZE", "260", "crop_size", 260, True),
    ("IMAGENET_INT8_DEVICE", "gpu", "device", "gpu", True),
    ("IMAGENET_INT8_DEVICE", "cuda:x", "device", "cuda:x", True),
    ("IMAGENET_INT8_PROBE_POOL", "8", "probe_pool", 8, True),  # with a crop of 72: latents 9x9
    ("IMAGENET_INT8_SOURCE", "", "source", "", False),  # empty: was silently the sample
    ("IMAGENET_INT8_OUTPUT", " ", "output", " ", False),
]


@pytest.mark.parametrize("var,raw,field,value,in_dagster", BAD_VALUES, ids=[f"{c[0]}={c[1]!r}" for c in BAD_VALUES])
def test_bad_values_are_refused_in_one_line_before_any_work(tmp_path, var, raw, field, value, in_dagster):
    extra = {"IMAGENET_INT8_CROP_SIZE": "72"} if field == "probe_pool" else {}
    with pytest.raises(SettingsError) as caught:
        ImagenetInt8Settings.from_env({var: raw, **extra})
    message = str(caught.value)
    assert "\n" not in message and var in message
    assert f"{var}={value!r}" in message or f"{var}={raw!r}" in message, message
    if not in_dagster:
        return
    # The same value given as run config (the launchpad) is refused by raw_manifest's preflight.
    source = make_image_folder(tmp_path / "src", {"a": 1})
    options = {**TINY, field: value, **({"crop_size": 72} if field == "probe_pool" else {})}
    settings = ImagenetInt8Settings(source=str(source), output=str(tmp_path / "out"), **options)
    result = _materialize(settings, ["raw_manifest"])
    assert not result.success
    assert _step_errors(result)["raw_manifest"] == message
    assert not manifest_path(settings.output_path).exists()  # no work was done


def test_the_smallest_crop_size_is_one_the_report_can_score():
    """MIN_CROP_SIZE is the first multiple of 8 on which the report's SSIM (11x11 window) works."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (MIN_CROP_SIZE, MIN_CROP_SIZE, 3)).astype(np.uint8)
    noisy = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255)
    assert 0.0 < ssim(image, noisy) < 1.0
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(image[: MIN_CROP_SIZE - 8, : MIN_CROP_SIZE - 8], image[: MIN_CROP_SIZE - 8, : MIN_CROP_SIZE - 8])


def _path_cases(tmp_path: Path) -> dict[str, tuple[dict, str, str]]:
    """name -> (settings overrides, variable named, value named) for the file-system checks."""
    source = make_image_folder(tmp_path / "src", {"a": 1, "b": 1})
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "vae-no-weights").mkdir()
    (tmp_path / "vae-no-weights" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link-to-src").symlink_to(source)
    return {
        "output is a file": ({"output": str(tmp_path / "a-file")}, "IMAGENET_INT8_OUTPUT", str(tmp_path / "a-file")),
        "output cannot be created": (
            {"output": str(tmp_path / "a-file" / "out")}, "IMAGENET_INT8_OUTPUT", str(tmp_path / "a-file" / "out")
        ),
        "output is the source": ({"output": str(source)}, "IMAGENET_INT8_OUTPUT", str(source)),
        "output inside the source": ({"output": str(source / "out")}, "IMAGENET_INT8_OUTPUT", str(source / "out")),
        "output inside the source through a symlink": (
            {"output": str(tmp_path / "data" / "link-to-src" / "out")}, "IMAGENET_INT8_OUTPUT", str(source / "out")
        ),
        "source inside the output": ({"output": str(tmp_path)}, "IMAGENET_INT8_SOURCE", str(source)),
        "a GPU torch cannot see": ({"device": "cuda:99"}, "IMAGENET_INT8_DEVICE", "cuda:99"),
        # found before any work (it failed after the manifest, telling to "use cuda:N with N < 0")
        "a device list naming a GPU torch cannot see": ({"devices": "cuda:7"}, "IMAGENET_INT8_DEVICES", "cuda:7"),
        "a VAE folder that does not exist": (
            {"vae": str(tmp_path / "no-vae")}, "IMAGENET_INT8_VAE", str(tmp_path / "no-vae")
        ),
        "a VAE folder without weights": (
            {"vae": str(tmp_path / "vae-no-weights")}, "IMAGENET_INT8_VAE", str(tmp_path / "vae-no-weights")
        ),
    }


def test_paths_device_and_vae_are_checked_at_the_start_of_raw_manifest(tmp_path):
    """One run per case through a real Dagster instance: a Failure with one line, no manifest."""
    cases = _path_cases(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    for name, (overrides, var, value) in cases.items():
        options = {"source": str(tmp_path / "src"), "output": str(tmp_path / "out"), **TINY, **overrides}
        settings = ImagenetInt8Settings(**options)
        result = _materialize(settings, ["raw_manifest"], instance)
        assert not result.success, name
        message = _step_errors(result)["raw_manifest"]
        assert "\n" not in message and var in message and repr(value) in message, (name, message)
        assert not manifest_path(Path(options["output"]).expanduser().resolve()).exists(), name
        assert not manifest_path(tmp_path / "out").exists(), name


def test_a_read_only_output_is_refused(tmp_path):
    source = make_image_folder(tmp_path / "src", {"a": 1})
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as out:
        settings = ImagenetInt8Settings(source=str(source), output=str(out), **TINY)
        with pytest.raises(SettingsError, match="IMAGENET_INT8_OUTPUT=.* is not writable .*Read-only file system"):
            settings.preflight()
        result = _materialize(settings, ["raw_manifest"])
        assert "is not writable" in _step_errors(result)["raw_manifest"]


@pytest.mark.slow
def test_hub_vaes_are_resolved_without_loading_weights(tmp_path):
    """The local HF cache, HF_HUB_OFFLINE, a lookup that cannot reach the Hub, the demo's fallback."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-vae"
    (repo / "snapshots" / revision).mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # never read: the check loads nothing
        (repo / "snapshots" / revision / name).write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = (
        "import json, sys\n"
        "from imagenet_int8_assets.core.latents.vae import check_vae, VaeLoadError\n"
        "out = {}\n"
        "cases = [('acme/tiny-vae', None), ('acme/missing', None), ('acme/missing', 'tiny-random')]\n"
        "cases.append(('flux1-vae', None))\n"
        "for spec, fallback in cases:\n"
        "    try:\n"
        "        out[f'{spec}|{fallback}'] = ['ok', check_vae(spec, fallback=fallback)]\n"
        "    except VaeLoadError as exc:\n"
        "        out[f'{spec}|{fallback}'] = ['error', str(exc)]\n"
        "print(json.dumps(out))\n"
    )
    import json

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    offline = json.loads(run_cli([sys.executable, "-c", code], env, timeout=120).stdout)
    assert offline["acme/tiny-vae|None"] == ["ok", None]  # found in the cache, nothing loaded
    status, message = offline["acme/missing|None"]
    assert status == "error" and "IMAGENET_INT8_VAE='acme/missing'" in message and "HF_HUB_OFFLINE" in message
    status, reason = offline["acme/missing|tiny-random"]
    assert status == "ok" and "acme/missing" in reason  # the demo falls back, as before
    assert offline["flux1-vae|None"][0] == "error" and "vae/config.json" in offline["flux1-vae|None"][1]
    # Not offline: one metadata lookup, here to an endpoint that refuses connections.
    env = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    online = json.loads(run_cli([sys.executable, "-c", code], env, timeout=120).stdout)
    assert online["acme/tiny-vae|None"] == ["ok", None]
    status, message = online["acme/missing|None"]
    assert status == "error" and "nor found on the Hub" in message and "\n" not in message


# --- the CLI: exit code 2, one line, nothing done ---------------------------------------------


def _cli_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict, str, str]]:
    source = make_image_folder(tmp_path / "src", {"a": 1})
    (tmp_path / "home-file").write_text("")
    return {
        "infinite range": ([], {"IMAGENET_INT8_QUANT_RANGE": "inf"}, "IMAGENET_INT8_QUANT_RANGE", "inf"),
        "DAGSTER_HOME is a file": (
            [], {"DAGSTER_HOME": str(tmp_path / "home-file")}, "DAGSTER_HOME", str(tmp_path / "home-file")
        ),
        "output inside the source": (
            ["--output", str(source / "out")], {}, "IMAGENET_INT8_OUTPUT", str(source / "out")
        ),
        "unknown Hub VAE": (["--vae", "acme/missing"], {}, "IMAGENET_INT8_VAE", "acme/missing"),
        "a GPU this machine does not have": ([], {"IMAGENET_INT8_DEVICES": "cuda:7"}, "IMAGENET_INT8_DEVICES", "cuda:7"),
    }


@pytest.mark.slow
def test_cli_refuses_bad_settings_with_one_line_exit_2_and_no_work(tmp_path):
    for name, (args, extra, var, value) in _cli_cases(tmp_path).items():
        env = cli_env(tmp_path, **extra)
        proc = run_cli([str(BIN / "imagenet-int8"), "build", "--source", str(tmp_path / "src"), *args], env, cwd=tmp_path)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        assert lines[0].startswith("imagenet-int8: ") and var in lines[0] and value in lines[0], (name, lines[0])
        assert not (tmp_path / "out").exists() and not (tmp_path / "src" / "out").exists(), name
        assert proc.stdout == "", name


@pytest.mark.slow
def test_dagster_asset_materialize_gives_the_same_one_line_message(tmp_path):
    source = make_image_folder(tmp_path / "src", {"a": 1})
    env = cli_env(tmp_path, IMAGENET_INT8_SOURCE=str(source), IMAGENET_INT8_OUTPUT=str(source / "out"),
               DAGSTER_HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "imagenet_int8_assets", "--select", "raw_manifest"]
    proc = run_cli(command, env)
    assert proc.returncode != 0
    expected = (
        f"IMAGENET_INT8_OUTPUT={str(source / 'out')!r} is inside IMAGENET_INT8_SOURCE={str(source)!r}: the next "
        "build would read its own output (report images, crops) as images. Choose an output outside the source."
    )
    assert f"dagster._core.definitions.events.Failure: {expected}" in proc.stderr, proc.stderr[-3000:]
    assert not (source / "out" / "manifest").exists()


# --- nothing to build -----------------------------------------------------------------------


def _all_bad_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    for name in ("a", "b"):
        (source / name).mkdir(parents=True)
        (source / name / "broken.JPEG").write_bytes(b"\xff\xd8\xff garbage")
        (source / name / "README.txt").write_text("notes")
    (source / "c").mkdir()  # an empty class
    return source


NO_USABLE = "No usable images: the manifest lists 4 file(s) in 2 class folder(s), 0 ok, 2 bad, 2 skipped"


def test_nothing_to_build_says_no_usable_images_with_the_counts(tmp_path):
    settings = ImagenetInt8Settings(source=str(_all_bad_source(tmp_path)), output=str(tmp_path / "out"), **TINY)
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(settings, ["raw_manifest"], instance).success  # the manifest records the bad files
    result = _materialize(settings, ["mds_dataset", "probe_features"], instance)
    errors = _step_errors(result)
    for step in ("mds_dataset", "probe_features"):
        assert errors[step].startswith(NO_USABLE), errors
        assert "Traceback" not in errors[step]


@pytest.mark.slow
def test_cli_stops_after_the_manifest_when_nothing_is_usable(tmp_path):
    env = cli_env(tmp_path)
    proc = run_cli([str(BIN / "imagenet-int8"), "build", "--source", str(_all_bad_source(tmp_path))], env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert NO_USABLE in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert manifest_path(out).is_file() and not (out / "crops").exists() and not (out / "latents").exists()
    assert not (out / "sample_source").exists()  # --source is the source everywhere, also when defs load


# --- disk full ------------------------------------------------------------------------------


def test_space_estimate_uses_the_bytes_per_image_measured_so_far(tmp_path):
    needs = SpaceNeeds("preprocessed_crops", tmp_path, total_items=10)
    needs.writing(4, 4000, "a")
    needs.writing(2, 2400, "b")  # a is done: 1,000 bytes per image; b (and 4 more) still to write
    error = OSError(28, "No space left on device", str(tmp_path / "crops" / "b"))
    message = needs.message(error)
    step = "Disk full while writing preprocessed_crops (class b)"
    assert message.startswith(f"{step} under {tmp_path}: No space left on device"), message
    assert "about 6.0 kB (6 image(s) x 1.0 kB per image, measured so far)" in message
    assert "run the same build again" in message and "\n" not in message
    assert disk_full_error(RuntimeError("wrapped")) is None
    try:
        try:
            raise error
        except OSError as exc:
            raise RuntimeError("a library wrapped it") from exc
    except RuntimeError as wrapped:
        assert disk_full_error(wrapped) is error


@pytest.mark.slow
def test_disk_full_names_the_step_and_a_rerun_completes_the_build(tmp_path):
    """A real 16 MB file system at an output path with a quote and a space: the crops of the
    second class do not fit; after freeing space the same command completes the build, and the
    commands it prints work in a real shell."""
    source = make_image_folder(tmp_path / "src", {"a": 3, "b": 3})  # 3 crops of 196,608 bytes each
    home = tmp_path / "home"
    with tmpfs(tmp_path / "it's out", "16m") as out:
        filler = _fill(out, leave=800_000)  # the manifest and one class of crops fit, not two
        env = cli_env(tmp_path, IMAGENET_INT8_OUTPUT=str(out), DAGSTER_HOME=str(home), IMAGENET_INT8_CROP_STORAGE="raw")
        args = [str(BIN / "imagenet-int8"), "build", "--source", str(source)]
        proc = run_cli(args, env, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr[-3000:]
        step = "crops_and_latents: Disk full while writing preprocessed_crops (class b) under "
        line = next((ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith(step)), proc.stderr[-3000:])
        assert line.startswith(f"{step}{out}: No space left on device"), line  # in the CLI's list of failures
        assert "The rest of this step needs about 589.8 kB (3 image(s) x 196.6 kB per image, measured so far)" in line
        assert "run the same build again" in line
        assert not (out / "mds" / "index.json").exists()

        filler.unlink()
        proc = run_cli(args, env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "6 samples in 2 classes" in proc.stdout
        hidden = [p for p in out.rglob(".*") if p.name.startswith((".tmp-", ".trash-"))]
        assert hidden == []

        printed = proc.stdout.splitlines()
        read = printed[printed.index("Read it:") + 1].strip()
        check = subprocess.run(["bash", "-c", read], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert check.returncode == 0, check.stderr[-3000:]
        assert check.stdout.split()[:4] == ["6", "(4,", "32,", "32)"]
        ui = printed[printed.index("See the runs and assets in the UI:") + 1].strip()
        assert ui.endswith(" dev -m imagenet_int8_assets")
        # Run the printed assignments through the shell, with `env` in place of `dagster dev`.
        shown = subprocess.run(
            ["bash", "-c", ui.rsplit(" ", 4)[0] + " env"], capture_output=True, text=True, timeout=60,
            env={"PATH": os.environ["PATH"]},
        )
        assert shown.returncode == 0, shown.stderr
        values = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
        assert values["IMAGENET_INT8_OUTPUT"] == str(out) and values["DAGSTER_HOME"] == str(home)
        assert values["IMAGENET_INT8_SOURCE"] == str(source) and values["IMAGENET_INT8_VAE"] == "tiny-random"
        assert shlex.split(ui)[-4:] == [str(BIN / "dagster"), "dev", "-m", "imagenet_int8_assets"]


@pytest.mark.slow
def test_a_full_dagster_home_is_reported_in_one_line(tmp_path):
    source = make_image_folder(tmp_path / "src", {"a": 1})
    with tmpfs(tmp_path / "home", "8m") as home:
        env = cli_env(tmp_path, DAGSTER_HOME=str(home))
        code = "import sys; from imagenet_int8_assets.build.instance import prepare_dagster_home as p; p(sys.argv[1])"
        assert run_cli([sys.executable, "-c", code, str(home)], env).returncode == 0  # an instance that worked
        _fill(home, leave=0)
        proc = run_cli([str(BIN / "imagenet-int8"), "build", "--source", str(source)], env, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        expected = f"imagenet-int8: the Dagster instance at DAGSTER_HOME={home} could not be written (SQLite: "
        assert last.startswith(expected), last
        assert "disk is probably full" in last and "run the same command again" in last
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
