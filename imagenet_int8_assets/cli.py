"""``imagenet-int8``: build the whole dataset through Dagster from the command line.

Argument parsing only: what ``build``, ``demo`` and ``publish`` do is ``build.driver``; ``presets``
prints the VAE presets.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from imagenet_int8_assets.build.driver import _disk_full_message, _publish_summary, _settings_env, _summary, build


def presets_table() -> str:
    """The VAE presets and their declared properties, as a text table."""
    from imagenet_int8_assets.core.latents.vae import PRESETS

    rows = [p.describe() for p in PRESETS.values()]
    columns = ["name", "channels", "downsample", "posterior", "scaling", "shift", "range", "weights"]
    cells = [[("-" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    lines += ["", "Input range of every preset: [-1, 1]. Stored latents are raw (scaling/shift are recorded only)."]
    lines += [f"{row['name']}: {row['description']}" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagenet-int8", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="list the VAE presets and their properties")
    for name, help_text in (
        ("build", "materialize the whole graph for every class (settings from IMAGENET_INT8_* or flags)"),
        ("demo", "build the bundled sample dataset (falls back to random SDXL weights when offline)"),
        ("publish", "build what is missing, then publish the dataset to a Hugging Face Hub repository (hub_upload)"),
    ):
        p = sub.add_parser(name, help=help_text)
        if name in ("build", "publish"):
            p.add_argument("--source", help="dataset root (IMAGENET_INT8_SOURCE)")
        if name == "publish":
            p.add_argument("--repo", help="Hub dataset repository owner/name (IMAGENET_INT8_HUB_REPO); token from HF_TOKEN")
            p.add_argument("--revision", help="branch to publish to (IMAGENET_INT8_HUB_REVISION, default main)")
            p.add_argument("--public", action="store_true", help="create the repository public (default private)")
            p.add_argument("--message", help="commit message (IMAGENET_INT8_HUB_COMMIT_MESSAGE)")
            p.add_argument("--license", help="license id in the card (IMAGENET_INT8_HUB_LICENSE)")
            p.add_argument("--no-parquet", action="store_true", help="do not export parquet (IMAGENET_INT8_PARQUET_EXPORT=false)")
            p.add_argument("--files-per-commit", type=int, help="most files per commit (IMAGENET_INT8_HUB_FILES_PER_COMMIT)")
            p.add_argument(
                "--allow-random-weights", action="store_true",
                help="publish even though the VAE had random weights (IMAGENET_INT8_PUBLISH_RANDOM_WEIGHTS)",
            )
        p.add_argument("--output", help="output root (IMAGENET_INT8_OUTPUT)")
        p.add_argument("--vae", help="VAE preset, Hub id or folder (IMAGENET_INT8_VAE)")
        p.add_argument("--device", help="auto, cpu or cuda (IMAGENET_INT8_DEVICE)")
        p.add_argument("--batch-size", type=int, help="images per forward pass (IMAGENET_INT8_BATCH_SIZE)")
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="encode precision (IMAGENET_INT8_PRECISION)")
        p.add_argument("--workers", type=int, help="processes for scan and crops (IMAGENET_INT8_WORKERS)")
        p.add_argument(
            "--max-partitions-per-run", type=int, help="classes per batched run (IMAGENET_INT8_MAX_PARTITIONS_PER_RUN)"
        )
        p.add_argument(
            "--runs-at-once", type=int,
            help="class runs executed at once, each in its own process (default: the number of devices + 1)",
        )
        p.add_argument(
            "--force", action="store_true",
            help="rebuild every class and the dataset, and record the current settings for the output",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="show Dagster INFO logs")
    args = parser.parse_args(argv)
    if args.command == "presets":
        print(presets_table())
        return 0

    from imagenet_int8_assets.core.source.sources import SourceError
    from imagenet_int8_assets.core.latents.vae import RANDOM_PRESETS
    from imagenet_int8_assets.build.instance import dagster_home_path
    from imagenet_int8_assets.resources import (
        PARTITIONS_PER_RUN_VAR,
        SAMPLE_SOURCE,
        ImagenetInt8Settings,
        SettingsError,
        max_partitions_per_run,
    )

    overrides: dict = {
        "source": getattr(args, "source", None),
        "output": args.output,
        "vae": args.vae,
        "device": args.device,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "workers": args.workers,
    }
    if args.command == "publish":
        overrides.update(
            hub_repo=args.repo,
            hub_revision=args.revision,
            hub_private=False if args.public else None,
            hub_commit_message=args.message,
            hub_license=args.license,
            parquet_export=False if args.no_parquet else None,
            hub_files_per_commit=args.files_per_commit,
            publish_random_weights=True if args.allow_random_weights else None,
        )
    if args.command == "demo":
        fallback = os.environ.get("IMAGENET_INT8_DEMO_VAE_FALLBACK", "").strip() or "sdxl-random"
        if fallback not in RANDOM_PRESETS:
            print(
                f"imagenet-int8: IMAGENET_INT8_DEMO_VAE_FALLBACK={fallback!r} must be one of "
                + ", ".join(RANDOM_PRESETS),
                file=sys.stderr,
            )
            return 2
        overrides.update(source=SAMPLE_SOURCE, vae_fallback=fallback)
        if not os.environ.get("IMAGENET_INT8_REPORT_PER_CLASS"):
            overrides["report_per_class"] = 1  # keeps the report quick with a full SDXL decoder on a CPU
    settings = None
    try:  # every setting is checked before any work starts (exit code 2, one line)
        settings = ImagenetInt8Settings.from_env(**overrides)
        if args.max_partitions_per_run is not None and args.max_partitions_per_run <= 0:
            raise SettingsError(
                f"--max-partitions-per-run={args.max_partitions_per_run}: use a positive number of classes."
            )
        if args.max_partitions_per_run is not None:  # the flag is the variable (the UI line printed at the end carries it)
            os.environ[PARTITIONS_PER_RUN_VAR] = str(args.max_partitions_per_run)
        max_partitions_per_run()
        if args.runs_at_once is not None and args.runs_at_once <= 0:
            raise SettingsError(f"--runs-at-once={args.runs_at_once}: use a positive number of runs.")
        if args.command == "publish" and not settings.hub_repo:
            raise SettingsError(
                "imagenet-int8 publish needs a Hub dataset repository: --repo owner/name or IMAGENET_INT8_HUB_REPO "
                "(and HF_TOKEN set to a token with write access)."
            )
        settings.preflight(dagster_home_path(settings.output_path / "dagster_home"))
        if not args.force:
            settings.require_recorded_settings()
        # Flags become the environment: loading the definitions module (which builds its default
        # Definitions from IMAGENET_INT8_*) then sees this build's source and output, not others.
        os.environ.update(_settings_env(settings))
        code = build(
            settings, args.max_partitions_per_run, args.verbose, args.force, args.command == "publish", args.runs_at_once
        )
    except (SettingsError, SourceError) as exc:
        print(f"imagenet-int8: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = _disk_full_message(exc, settings.output_path if settings is not None else Path.cwd())
        if message is None:
            raise
        print(f"imagenet-int8: {message}", file=sys.stderr)
        return 1
    if code == 0:
        print(_summary(settings))
        if args.command == "publish":
            print(_publish_summary())
    return code


def run() -> None:
    """The ``imagenet-int8`` command: :func:`main`, then a prompt exit with its code.

    Once ``main`` has returned, every result is on disk and every line printed; the exit handlers
    run and the output is flushed, then the process ends with ``os._exit``, skipping the C++
    static destructors. pyarrow (pandas' parquet reader) can abort in those with "terminate called
    without an active exception" (apache/arrow#34314, open): measured here, 3 in 40 builds that
    had done everything right ended with SIGABRT. An exception still ends the normal way.
    """
    import atexit

    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
