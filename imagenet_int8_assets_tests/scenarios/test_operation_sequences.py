"""Ordinary operations in any order never break the build, lose data or serve wrong latents.

A randomized test of operation sequences (hypothesis' rule-based state machine): from a small
generated source, the operations a user performs are interleaved (add, remove and rename a class;
add, delete, replace and edit in place an image, a corrupt file among them; build with
`imagenet-int8 build`; materialize a class and the dataset with `dagster asset materialize`; kill a
build with SIGKILL at a random moment; export to parquet, into a fresh folder and into one holding a
user's file; publish to a local S3 server), and after every step the invariants a reader observes
are checked:

- the published dataset (if any) opens and verifies (every shard present with its size and hash, the
  index's counts those of the shards), and every class in it holds exactly the latents of a state of
  that class the user actually had (never a mix of two states, never another class's images);
- after a completed build, every class of the source is in the dataset with its current images;
- no file outside what the product owns was changed or removed (the source, the user's folder);
- a mirror in the bucket, once published, is exactly the local dataset;
- the next build succeeds (checked at the end of every sequence).

The expected latents come from the product's own core, image by image (crop, encode with the tiny
VAE, the seeded sample, the uint8 codec): the orchestration is what is under test here, the numerics
have their own tests. A failure prints its steps as a program and hypothesis' blob
(``@reproduce_failure``) that replays it exactly. Sequences that found bugs are kept below as fixed
cases; IMAGENET_INT8_SEQUENCE_EXAMPLES / _STEPS run longer searches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from PIL import Image

from imagenet_int8_assets.core.source.sources import imagenet_classes
from imagenet_int8_assets_tests.support.builds import BIN, cli_env

WNIDS = [wnid for wnid, _, _ in imagenet_classes()[:6]]  # sorted; labels 0..5
LABEL = {wnid: i for i, (wnid, _, _) in enumerate(imagenet_classes())}
SIZE = (40, 30)  # tiny BMPs: the crop recipe upsamples them; BMP keeps a file's size when pixels change
STEPS = int(os.environ.get("IMAGENET_INT8_SEQUENCE_STEPS", "7"))
EXAMPLES = int(os.environ.get("IMAGENET_INT8_SEQUENCE_EXAMPLES", "3"))


# ------------------------------------------------------------------------------------------
# what a clean build gives, image by image (the product's own core, cached by content)

_VAE = None
_CODES: dict[tuple[str, str], bytes] = {}


def expected_code(path: Path, image_id: str) -> bytes | None:
    """The uint8 codes a clean build stores for the image at ``path`` with manifest id ``image_id``
    (None when it is not a usable image)."""
    global _VAE
    from imagenet_int8_assets.core.latents.encode import encode_posterior, select_latent
    from imagenet_int8_assets.core.crops.preprocess import CropError, crop_file
    from imagenet_int8_assets.core.latents.quantize import quantize
    from imagenet_int8_assets.core.latents.vae import load_vae

    data = path.read_bytes()
    key = (image_id, hashlib.sha256(data).hexdigest())
    if key not in _CODES:
        try:
            crop = crop_file(path)
        except CropError:
            _CODES[key] = None
            return None
        if _VAE is None:
            _VAE = load_vae("tiny-random")
        post = encode_posterior(_VAE, crop[None], "cpu", batch_size=16)
        latent = select_latent(post.mean, post.std, [image_id], "sample", 0)
        _CODES[key] = quantize(latent, _VAE.info.quant_range).tobytes()
    return _CODES[key]


def write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, SIZE[0])[None, :, None] * rng.integers(-120, 120, 3)
    pixels = np.clip(base + ramp + rng.normal(0, 12, (SIZE[1], SIZE[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="BMP")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------
# the machine


class OperationSequences(RuleBasedStateMachine):
    """The user's source (``self.src``), the output (``self.out``) and what a reader must see."""

    def __init__(self, workspace: Path, s3):
        super().__init__()
        self.workspace, self.s3 = workspace, s3

    @initialize(first=st.sampled_from(WNIDS[1:5]), second=st.sampled_from(WNIDS[1:5]))
    def start(self, first, second):
        run = self.workspace / f"run-{len(list(self.workspace.iterdir())):03d}"
        self.src, self.out, self.user = run / "src", run / "out", run / "user"
        for folder in (self.src, self.user):
            folder.mkdir(parents=True)
        (self.user / "notes.txt").write_text("the user's own file\n")
        self.env = cli_env(run, IMAGENET_INT8_SOURCE=str(self.src), IMAGENET_INT8_OUTPUT=str(self.out))
        self.counter = 0
        # every state each class was in when a build or a materialization could have read it
        self.history: dict[str, list[list[bytes]]] = {}
        self.built = False  # the last build completed: the dataset holds the source as it is
        self.bucket = None
        for wnid in sorted({first, second}):
            self._new_class(wnid, 2)

    # ---- helpers -----------------------------------------------------------------------------

    def _log(self, what: str) -> None:
        """One line per step on stderr (shown with a failure, or with -s): what the sequence did."""
        import sys

        print(f"[sequence {self.out.parent.name}] {time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)

    def _image(self, wnid: str) -> None:
        self.counter += 1
        write_image(self.src / wnid / f"img{self.counter:03d}.bmp", seed=self.counter)
        self.built = False

    def _new_class(self, wnid: str, images: int) -> None:
        (self.src / wnid).mkdir()
        for _ in range(images):
            self._image(wnid)

    def _classes(self) -> list[str]:
        return sorted(p.name for p in self.src.iterdir() if p.is_dir())

    def _images(self, wnid: str) -> list[Path]:
        return sorted(p for p in (self.src / wnid).iterdir() if p.is_file())

    def _state(self, wnid: str) -> list[bytes]:
        """The class's current images as a clean build stores them (sorted codes)."""
        codes = [expected_code(p, f"{wnid}/{p.name}") for p in self._images(wnid)]
        return sorted(c for c in codes if c is not None)

    def _remember(self) -> None:
        """The source as a build now reads it: each class's state joins its history."""
        for wnid in self._classes():
            state = self._state(wnid)
            if state not in self.history.setdefault(wnid, []):
                self.history[wnid].append(state)

    def _build(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        self._remember()
        return subprocess.run(
            [str(BIN / "imagenet-int8"), "build", *args], env=env or self.env, cwd=self.workspace,
            capture_output=True, text=True, timeout=900,
        )

    def _published(self) -> dict[str, tuple[int, list[bytes]]] | None:
        """Per class of the published dataset: its label and its samples' codes (sorted)."""
        from imagenet_int8_assets.core.dataset.dataset_check import class_of_shard
        from imagenet_int8_assets.reader import load_latents, open_dataset

        root = self.out / "mds"
        if not (root / "index.json").is_file():
            return None
        dataset = open_dataset(root, verify="hash")  # every shard, its size, its hash, its counts
        assert dataset.num_samples >= 0
        del dataset
        arrays = load_latents(root, verify="hash")
        found: dict[str, tuple[int, list[bytes]]] = {}
        for shard in arrays.shards:
            wnid = class_of_shard(arrays.root, shard.basename)
            codes = [arrays.codes[i].tobytes() for i in range(shard.start, shard.stop)]
            labels = {int(arrays.labels[i]) for i in range(shard.start, shard.stop)}
            assert labels <= {LABEL[wnid]}, (wnid, labels)
            label, old = found.get(wnid, (LABEL[wnid], []))
            found[wnid] = (label, old + codes)
        return {wnid: (label, sorted(codes)) for wnid, (label, codes) in found.items()}

    # ---- the user's operations on the source --------------------------------------------------

    # the operations themselves (the rules below draw their arguments; the fixed cases call them)

    def do_add_class(self, wnid: str, images: int) -> None:
        self._log(f"add class {wnid} with {images} image(s)")
        self._new_class(wnid, images)

    def do_rename_class(self, old: str, new: str) -> None:
        self._log(f"rename class {old} -> {new}")
        (self.src / old).rename(self.src / new)
        self.built = False

    def do_edit_in_place(self, path: Path) -> None:
        """New pixels, the same size and modification time (`touch -r`, a restore, some sync tools)."""
        self._log(f"edit {path.parent.name}/{path.name} in place")
        before = path.stat()
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB")).copy()
        except OSError:  # a corrupt file: nothing to edit in place
            return
        pixels[:, : SIZE[0] // 2] = 255 - pixels[:, : SIZE[0] // 2]
        Image.fromarray(pixels).save(path, format="BMP")
        assert path.stat().st_size == before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.built = False

    @precondition(lambda self: len(self._classes()) < 5)
    @rule(data=st.data(), images=st.integers(1, 2))
    def add_class(self, data, images):
        free = [w for w in WNIDS if not (self.src / w).exists()]
        self.do_add_class(data.draw(st.sampled_from(free), label="new class"), images)

    @precondition(lambda self: len(self._classes()) > 1)
    @rule(data=st.data())
    def remove_class(self, data):
        wnid = data.draw(st.sampled_from(self._classes()), label="removed class")
        self._log(f"remove class {wnid}")
        shutil.rmtree(self.src / wnid)
        self.built = False

    @precondition(lambda self: len(self._classes()) < len(WNIDS))
    @rule(data=st.data())
    def rename_class(self, data):
        old = data.draw(st.sampled_from(self._classes()), label="renamed class")
        new = data.draw(st.sampled_from([w for w in WNIDS if not (self.src / w).exists()]), label="new name")
        self.do_rename_class(old, new)

    @rule(data=st.data())
    def add_image(self, data):
        wnid = data.draw(st.sampled_from(self._classes()), label="class")
        self._log(f"add an image to {wnid}")
        self._image(wnid)

    @rule(data=st.data(), corrupt=st.booleans())
    def replace_or_corrupt_image(self, data, corrupt):
        wnid = data.draw(st.sampled_from(self._classes()), label="class")
        path = data.draw(st.sampled_from(self._images(wnid)), label="image")
        self._log(f"{'corrupt' if corrupt else 'replace'} {wnid}/{path.name}")
        if corrupt:
            path.write_bytes(b"BM" + os.urandom(64))  # a truncated, undecodable file
        else:
            self.counter += 1
            write_image(path, seed=1000 + self.counter)
        self.built = False

    @precondition(lambda self: any(len(self._images(w)) > 1 for w in self._classes()))
    @rule(data=st.data())
    def delete_image(self, data):
        wnid = data.draw(st.sampled_from([w for w in self._classes() if len(self._images(w)) > 1]), label="class")
        path = data.draw(st.sampled_from(self._images(wnid)), label="image")
        self._log(f"delete {wnid}/{path.name}")
        path.unlink()
        self.built = False

    @rule(data=st.data())
    def edit_image_in_place(self, data):
        wnid = data.draw(st.sampled_from(self._classes()), label="class")
        self.do_edit_in_place(data.draw(st.sampled_from(self._images(wnid)), label="image"))

    # ---- building, from the CLI and through Dagster -------------------------------------------

    @rule(force=st.booleans())
    def build(self, force=False):
        """`imagenet-int8 build`, or with `--force` (every class rebuilt, in one run per stretch)."""
        self._log("build --force" if force else "build")
        proc = self._build(*(["--force"] if force else []))
        assert proc.returncode == 0, f"the build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        self.built = True

    @precondition(lambda self: (self.out / "dagster_home").is_dir())
    @rule(data=st.data())
    def materialize_a_class_then_the_dataset(self, data):
        """`dagster asset materialize` of one registered class, then of the dataset (the UI's way)."""
        self._log("materialize_a_class_then_the_dataset")
        import dagster as dg

        with dg.DagsterInstance.from_config(str(self.out / "dagster_home")) as instance:
            registered = instance.get_dynamic_partitions("classes")
        present = [w for w in registered if (self.src / w).is_dir()]
        if not present:
            return
        wnid = data.draw(st.sampled_from(present), label="class")
        env = {**self.env, "DAGSTER_HOME": str(self.out / "dagster_home")}
        command = [str(BIN / "dagster"), "asset", "materialize", "-m", "imagenet_int8_assets"]
        self._remember()
        proc = subprocess.run(
            [*command, "--select", "raw_manifest"], env=env, cwd=self.workspace, capture_output=True, text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = subprocess.run(
            [*command, "--select", "preprocessed_crops,vae_latents,mds_shards", "--partition", wnid], env=env,
            cwd=self.workspace, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        # the dataset step refuses (exit 1, one message) while another class is stale or missing:
        # whatever it does, the published dataset stays one the invariants accept
        subprocess.run(
            [*command, "--select", "quantization_stats,mds_dataset"], env=env, cwd=self.workspace,
            capture_output=True, text=True, timeout=600,
        )
        self.built = False

    @rule(delay=st.floats(0.5, 12.0))
    def kill_a_build(self, delay):
        """`kill -9` a build at a random moment: the published dataset stays whole."""
        self._log(f"kill_a_build delay={delay!r}")
        self._remember()
        proc = subprocess.Popen(
            [str(BIN / "imagenet-int8"), "build"], env=self.env, cwd=self.workspace,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the build and every process it started
        proc.wait(timeout=60)
        self.built = False

    # ---- what a user does with the result -----------------------------------------------------

    @precondition(lambda self: (self.out / "mds" / "index.json").is_file())
    @rule(into_user_folder=st.booleans())
    def export(self, into_user_folder):
        self._log(f"export into_user_folder={into_user_folder!r}")
        from imagenet_int8_assets.reader import export_parquet, load_latents

        if into_user_folder:  # a folder holding the user's file: refused, nothing removed
            with pytest.raises(ValueError):
                export_parquet(self.out / "mds", self.user, rows_per_file=10)
            with pytest.raises(ValueError):
                export_parquet(self.out / "mds", self.out, rows_per_file=10)
            return
        dest = self.workspace / f"export-{self.counter}-{random.random():.6f}"
        files = export_parquet(self.out / "mds", dest, rows_per_file=10)
        import pyarrow.parquet as pq

        rows = sum(pq.read_metadata(f).num_rows for f in files)
        assert rows == len(load_latents(self.out / "mds", verify="size"))

    @precondition(lambda self: (self.out / "mds" / "index.json").is_file())
    @rule()
    def publish_to_the_bucket(self):
        """Build with the bucket set: the mirror holds exactly the local dataset afterwards."""
        self._log("publish_to_the_bucket")
        if self.bucket is None:
            self.bucket = self.s3.new_bucket()
        env = {**self.env, **self.s3.env(), "IMAGENET_INT8_MDS_REMOTE": f"s3://{self.bucket}/ds"}
        proc = self._build(env=env)
        assert proc.returncode == 0, f"the build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert f"published to s3://{self.bucket}/ds too" in proc.stdout, proc.stdout[-2000:]
        self.built = True
        from imagenet_int8_assets.core.dataset.mds_remote import RemoteMds

        with _environ(self.s3.env()):
            remote = RemoteMds(f"s3://{self.bucket}/ds")
            assert remote.read("index.json") == (self.out / "mds" / "index.json").read_bytes()
            listed = remote.list_sizes()
        for entry in listed:
            if entry.startswith("classes/"):
                assert (self.out / "mds" / entry).is_file(), f"{entry} in the bucket, not in the local dataset"

    # ---- the invariants -------------------------------------------------------------------------

    @invariant()
    def the_user_files_are_untouched(self):
        if not hasattr(self, "user"):
            return
        assert tree_digest(self.user) == {"notes.txt": hashlib.sha256(b"the user's own file\n").hexdigest()}

    @invariant()
    def the_published_dataset_is_whole_and_each_class_a_state_the_user_had(self):
        if not hasattr(self, "out"):
            return
        published = self._published()
        if published is None:
            return
        for wnid, (_, codes) in published.items():
            states = self.history.get(wnid, [])
            assert codes in states, (
                f"class {wnid}: the dataset holds {len(codes)} samples that are no state the user had "
                f"({[len(s) for s in states]} sample(s) in its known states)"
            )
        if self.built:
            for wnid in self._classes():
                state = self._state(wnid)
                assert wnid in published or not state, f"class {wnid} of the source is not in the dataset"
                if state:
                    assert published[wnid][1] == state, f"class {wnid} is not its current images after a build"

    def teardown(self):
        if hasattr(self, "out"):
            proc = self._build()  # the next build succeeds, whatever came before
            assert proc.returncode == 0, f"the build after the sequence failed:\n{proc.stderr[-3000:]}"
            self.built = True
            self.the_published_dataset_is_whole_and_each_class_a_state_the_user_had()


@contextlib.contextmanager
def _environ(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_random_sequences_of_ordinary_operations_keep_every_invariant(tmp_path, s3):
    Machine = type("Machine", (OperationSequences,), {"__init__": lambda self: OperationSequences.__init__(self, tmp_path, s3)})
    options = settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, print_blob=True,
        suppress_health_check=list(HealthCheck), database=None,
    )
    # a failure prints the steps as code and the blob for @reproduce_failure: both replay it exactly
    run_state_machine_as_test(Machine, settings=options)


# ------------------------------------------------------------------------------------------
# sequences that found bugs, kept as fixed cases (each step checked as in the random test)


def _check(machine: OperationSequences) -> None:
    machine.the_user_files_are_untouched()
    machine.the_published_dataset_is_whole_and_each_class_a_state_the_user_had()


@pytest.mark.slow
def test_a_class_that_sorts_first_and_a_renamed_class_are_built(tmp_path, s3):
    """A class added later whose name sorts before the built ones was never built when it shared a run
    with them (its run's range, first .. last in sorted order, was empty in the instance's registration
    order: `--force`, or labels renumbered by the new class) and every later build failed ("No latents
    at .../latents/<class>", --force included); a renamed ImageNet class folder did the same."""
    machine = OperationSequences(tmp_path, s3)
    machine.start(first=WNIDS[2], second=WNIDS[3])
    machine.build()
    _check(machine)
    machine.do_add_class(WNIDS[0], 2)  # sorts before both
    machine.build(force=True)  # every class in one run: its range must cover all three
    _check(machine)
    machine.do_rename_class(WNIDS[3], WNIDS[1])  # the new name sorts before the other built one
    machine.build()
    _check(machine)
    assert set(machine._published()) >= {WNIDS[0], WNIDS[1], WNIDS[2]}
    machine.teardown()


@pytest.mark.slow
def test_an_image_edited_in_place_is_rebuilt_and_a_killed_build_leaves_a_whole_dataset(tmp_path, s3):
    """New pixels with the size and modification time kept were never rebuilt (and the report's advice
    to run the build looped); a build killed with SIGKILL right after leaves the published dataset
    whole, and exports never touch the user's folder or the output."""
    machine = OperationSequences(tmp_path, s3)
    machine.start(first=WNIDS[1], second=WNIDS[4])
    machine.build()
    machine.do_edit_in_place(machine._images(WNIDS[1])[0])
    machine.build()
    _check(machine)  # after a completed build: the edited class holds its new pixels
    machine.export(into_user_folder=True)
    machine.export(into_user_folder=False)
    machine.do_edit_in_place(machine._images(WNIDS[4])[1])
    machine.kill_a_build(4.0)
    _check(machine)
    machine.teardown()
