"""Loading a whole dataset: ``load_latents`` against the published Imagenet.int8 reader, same run.

Run from the repository root::

    python -m benchmarks.loader                        # 50,000 samples (50 classes x 1,000)
    python -m benchmarks.loader --samples 50000 --json loader.json

What is measured (samples per second, wall time):

1. A dataset of ``--samples`` random 4x32x32 uint8 codes in ``--classes`` classes (ImageNet labels
   and texts, so label texts differ in length) is written with the project's own writer
   (``mds.write_class_shards`` per class, then ``mds_index.swap_in_index``): the published schema
   (``uint8`` column, 4096 bytes), no VAE involved.
2. The reference: the published reader snippet of the Imagenet.int8 model card, verbatim (its own
   ``uint8`` Encoding registered, ``StreamingDataset(local=..., remote=..., split=None,
   shuffle=True, shuffle_algo="naive", num_canonical_nodes=1, batch_size=32)`` and
   ``DataLoader(batch_size=32, num_workers=3)``), iterated once over everything, in a fresh
   subprocess with its own TMPDIR. Timed from building the StreamingDataset to the last batch.
   Two variants: ``remote`` = the dataset with an empty ``local`` (exactly the card's usage: shards
   are copied into ``local`` as they are read), and ``remote=None`` with ``local`` = the dataset.
3. Ours: ``load_latents(dataset, verify="size")`` in this process, ``--repeats`` times before the
   reference runs and ``--repeats`` times after them (so that a change of load hits both; each call
   reads every shard from the files again into a new array; the page cache is warm for both
   readers), median and min of all (every call, the first included, is in the JSON); then
   ``--repeats`` times with ``verify="hash"``.
4. The memory floor: ``np.empty((N, 4, 32, 32), np.uint8).fill(1)``, median of ``--repeats``: what
   writing a fresh array of the output's size costs on this machine, whatever fills it.

The ratio is ours (median) over the faster reference variant. Both readers' label sums are
compared, so each is known to have read every sample.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# The published reader (seed 000, the Imagenet.int8 model card), verbatim, then one pass over it.
REFERENCE = textwrap.dedent(
    '''
    import sys, time
    t_import = time.perf_counter()
    from streaming.base.format.mds.encodings import Encoding, _encodings
    import numpy as np
    from typing import Any
    import torch
    from streaming import StreamingDataset

    class uint8(Encoding):
        def encode(self, obj: Any) -> bytes:
            return obj.tobytes()

        def decode(self, data: bytes) -> Any:
            x=  np.frombuffer(data, np.uint8).astype(np.float32)
            return (x / 255.0 - 0.5) * 24.0

    _encodings["uint8"] = uint8

    remote_train_dir = sys.argv[1] if sys.argv[1] != "None" else None
    local_train_dir = sys.argv[2]
    import_s = time.perf_counter() - t_import

    if __name__ == "__main__":
        t0 = time.perf_counter()
        train_dataset = StreamingDataset(
            local=local_train_dir,
            remote=remote_train_dir,
            split=None,
            shuffle=True,
            shuffle_algo="naive",
            num_canonical_nodes=1,
            batch_size = 32
        )

        train_dataloader = torch.utils.data.DataLoader(
            train_dataset,
            batch_size=32,
            num_workers=3,
        )
        samples, label_sum, first = 0, 0, None
        for batch in train_dataloader:
            samples += len(batch["label"])
            label_sum += sum(int(x) for x in batch["label"])
            assert batch["vae_output"].shape[1] == 4096, batch["vae_output"].shape
        seconds = time.perf_counter() - t0
        print("RESULT", samples, label_sum, seconds, import_s)
    '''
)


def make_dataset(root: Path, samples: int, classes: int, seed: int = 0) -> dict:
    """``samples`` random codes in ``classes`` classes, written with the project's writer."""
    from imagenet_int8_assets.core.dataset import mds, mds_index
    from imagenet_int8_assets.core.source.sources import imagenet_classes

    table = imagenet_classes()
    rng = np.random.default_rng(seed)
    per_class = [samples // classes + (1 if c < samples % classes else 0) for c in range(classes)]
    names = []
    for c, count in enumerate(per_class):
        label = c * (len(table) // classes)
        wnid, _, text = table[label]
        codes = rng.integers(0, 256, (count, 4, 32, 32), dtype=np.uint8)
        mds.write_class_shards(root, wnid, codes, label, text, {"seed": seed, "vae": {"family": "autoencoder-kl", "requested": "random codes"}})
        names.append(wnid)
    index, summary = mds_index.merged_index(root, names)
    mds_index.swap_in_index(root, index, mds_index.dataset_record(mds_index.read_class_build_info(root, names[0]), summary))
    return {"samples": summary["samples"], "shards": summary["shards"], "bytes": sum(s["raw_data"]["bytes"] for s in index["shards"])}


def run_reference(script: Path, remote: Path | None, local: Path, tmpdir: Path) -> dict:
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), str(remote) if remote else "None", str(local)],
        env=env, cwd=str(tmpdir), capture_output=True, text=True, timeout=3600,
    )
    wall = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"reference reader failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    _, samples, label_sum, seconds, import_s = line.split()
    return {
        "samples": int(samples), "label_sum": int(label_sum), "seconds": float(seconds),
        "samples_per_s": int(samples) / float(seconds), "import_s": float(import_s), "process_s": wall,
    }


def run_ours(root: Path, repeats: int, verify: str) -> dict:
    from imagenet_int8_assets.core.reading.latent_arrays import load_latents

    times, arrays = [], None
    for _ in range(repeats):
        arrays = None  # free the previous copy first: memory stays one dataset
        t0 = time.perf_counter()
        arrays = load_latents(root, verify=verify)
        times.append(time.perf_counter() - t0)
    n = len(arrays)
    median = statistics.median(times)
    return {
        "samples": n, "label_sum": int(arrays.labels.sum()), "verify": verify,
        "seconds": times, "median_s": median, "min_s": min(times),
        "samples_per_s": n / median, "MB_per_s": arrays.codes.nbytes / median / 1e6,
    }


def _combine(before: dict, after: dict) -> dict:
    """The repeats taken before and after the reference runs, as one measurement."""
    times = before["seconds"] + after["seconds"]
    median = statistics.median(times)
    return {**before, "seconds": times, "median_s": median, "min_s": min(times),
            "samples_per_s": before["samples"] / median, "MB_per_s": before["MB_per_s"] * before["median_s"] / median}


def memory_floor(samples: int, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.empty((samples, 4, 32, 32), np.uint8).fill(1)
        times.append(time.perf_counter() - t0)
    return {"seconds": times, "median_s": statistics.median(times), "samples_per_s": samples / statistics.median(times)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5,
                        help="load_latents calls before and again after the reference runs (median of all reported)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--workdir", help="keep the dataset here (default: a temporary folder, deleted)")
    args = parser.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(work / "tmp-main")  # streaming's shared memory of this process, if any
    (work / "tmp-main").mkdir(exist_ok=True)
    root = work / "dataset"
    load_start = os.getloadavg()
    try:
        if root.exists():
            shutil.rmtree(root)
        t0 = time.perf_counter()
        made = make_dataset(root, args.samples, args.classes)
        made["write_s"] = time.perf_counter() - t0
        print(f"dataset: {made['samples']:,} samples, {made['shards']} shards, {made['bytes'] / 1e6:.1f} MB "
              f"(written in {made['write_s']:.1f} s)", flush=True)
        script = work / "reference_reader.py"
        script.write_text(REFERENCE)

        before = run_ours(root, args.repeats, "size")  # also warms the page cache for the reference
        refs = {}
        for name, remote, local in (
            ("remote+local (card)", root, work / "local-card"),
            ("local only", None, root),
        ):
            refs[name] = run_reference(script, remote, local, work / f"tmp-{len(refs)}")
            print(f"reference {name}: {refs[name]['seconds']:.2f} s, {refs[name]['samples_per_s']:,.0f} samples/s", flush=True)
            if refs[name]["samples"] != before["samples"] or refs[name]["label_sum"] != before["label_sum"]:
                raise RuntimeError(f"the reference read {refs[name]['samples']} samples (label sum {refs[name]['label_sum']}), ours {before['samples']} ({before['label_sum']})")
        after = run_ours(root, args.repeats, "size")
        ours = _combine(before, after)
        print(f"load_latents(verify='size'): median {ours['median_s']:.3f} s (min {ours['min_s']:.3f}), "
              f"{ours['samples_per_s']:,.0f} samples/s", flush=True)
        ours_hash = run_ours(root, args.repeats, "hash")
        print(f"load_latents(verify='hash'): median {ours_hash['median_s']:.3f} s, {ours_hash['samples_per_s']:,.0f} samples/s", flush=True)
        floor = memory_floor(made["samples"], args.repeats)
        print(f"memory floor (a fresh array of that size, written once): median {floor['median_s']:.3f} s, "
              f"{floor['samples_per_s']:,.0f} samples/s", flush=True)
        best_ref = max(refs.values(), key=lambda r: r["samples_per_s"])
        ratio = ours["samples_per_s"] / best_ref["samples_per_s"]
        print(f"ratio ours/reference (faster variant): {ratio:,.0f}x (the memory floor: "
              f"{floor['samples_per_s'] / best_ref['samples_per_s']:,.0f}x)", flush=True)
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m benchmarks.loader " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
            "dataset": made, "reference": refs, "ours": ours, "ours_hash": ours_hash, "memory_floor": floor,
            "ratio": ratio, "floor_ratio": floor["samples_per_s"] / best_ref["samples_per_s"],
        }
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
