"""hub_upload: publish the built dataset to a Hugging Face Hub dataset repository.

Not part of a plain build: the asset is in the graph only when a repository is configured
(IMAGENET_INT8_HUB_REPO; see ``definitions.build_definitions``), so "Materialize all" never runs it
without one. ``imagenet-int8 publish --repo`` runs it from the command line.
The token comes from HF_TOKEN as a Dagster ``EnvVar`` (its value is resolved in the run process and
never stored in the run's config, the event log or any file); without HF_TOKEN, huggingface_hub's
own login (``hf auth login``) is used. Credentials inside ``HF_ENDPOINT`` (a Hub behind basic auth)
are sent, never shown: every URL this step logs, records or puts in an error goes through
``core.common.urls.redact_url``, and each request gives up after IMAGENET_INT8_HUB_TIMEOUT seconds of silence.
"""


import os
from pathlib import Path, PurePosixPath

from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    EnvVar,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from imagenet_int8_assets.assets.metadata import PUBLISH_GROUP
from imagenet_int8_assets.assets.quantization import quantization_stats
from imagenet_int8_assets.assets.report import reconstruction_report
from imagenet_int8_assets.assets.shards import mds_dataset
from imagenet_int8_assets.core.hub import hub_upload as hub
from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.common.layout import mds_root, report_dir, stats_path
from imagenet_int8_assets.core.common.urls import redact_url, redact_urls
from imagenet_int8_assets.resources import ENV, ImagenetInt8Settings

TOKEN_VAR = "HF_TOKEN"


class HubToken(ConfigurableResource):
    """The Hub token (write access to the repository); None = huggingface_hub's stored login."""

    token: str | None = None


def hub_token_resource() -> HubToken:
    """HF_TOKEN as a Dagster EnvVar when it is set (resolved when a run needs it), else no token."""
    return HubToken(token=EnvVar(TOKEN_VAR)) if os.environ.get(TOKEN_VAR) else HubToken()


def hub_folder(output: Path) -> Path:
    """Where the card and the parquet export are prepared (``<output>/hub``)."""
    return output / "hub"


HOW_TO_ENABLE = (
    f"set {ENV['hub_repo']}=owner/name (and {TOKEN_VAR} to a token with write access), then materialize "
    "hub_upload, or run `imagenet-int8 publish --repo owner/name`"
)


def _hub_failure(exc: Exception, settings: ImagenetInt8Settings, endpoint: str) -> Failure:
    """A one-line Failure for an error of the upload, saying what to do.

    It never contains the token, nor the credentials of ``endpoint``: every URL in it, also those
    quoted by huggingface_hub's exception text, is redacted. The caller raises it ``from None``, so the
    original exception (and the URL it may carry) is not recorded either.
    """
    from huggingface_hub.errors import HfHubHTTPError
    from requests import RequestException

    status = getattr(getattr(exc, "response", None), "status_code", None)
    repo = settings.hub_repo
    shown = redact_url(endpoint)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, hub.HubTimeout):
        what = (
            f"{exc}; re-run `imagenet-int8 publish` (or hub_upload: what was sent is not sent again) or raise "
            f"{ENV['hub_timeout']} (now {settings.hub_timeout} s)"
        )
    elif status in (401, 403):
        what = (
            f"the Hub at {shown} refused the credentials for {repo} (HTTP {status}): set {TOKEN_VAR} "
            f"to a token with write access to {repo} (https://huggingface.co/settings/tokens), then re-run"
        )
    elif isinstance(exc, HfHubHTTPError):
        what = (
            f"the Hub at {shown} answered HTTP {status} while publishing {repo}: {first_line}. "
            "Re-run hub_upload: what was sent is not sent again"
        )
    elif isinstance(exc, (RequestException, OSError)):
        what = (
            f"could not reach the Hub at {shown} while publishing {repo} ({type(exc).__name__}: {first_line}). "
            "Check the network (and HF_ENDPOINT), then re-run hub_upload: what was sent is not sent again"
        )
    else:
        what = (
            f"publishing {repo} to the Hub at {shown} failed unexpectedly ({type(exc).__name__}: {first_line}). "
            "Re-run hub_upload (what was sent is not sent again); if it fails the same way, report this message"
        )
    return Failure(description=redact_urls(" ".join(what.split())), allow_retries=False)


def _require_quality(settings: ImagenetInt8Settings) -> None:
    """With IMAGENET_INT8_REPORT_BLOCKING, refuse to publish what fails reconstruction_quality, also
    when hub_upload runs in another run than the check (Dagster's blocking stops a run's own steps)."""
    from imagenet_int8_assets.core.quality.reconstruction_report import quality_problems, read_summary

    if not settings.report_blocking:
        return
    try:
        summary = read_summary(report_dir(settings.output_path))
    except FileNotFoundError:
        raise Failure(description="no reconstruction report: materialize reconstruction_report before hub_upload") from None
    problems = quality_problems(summary, settings.report_max_psnr_gap, settings.report_max_clip_fraction)
    if problems:
        raise Failure(
            description=(
                "not publishing: the blocking check reconstruction_quality fails ("
                + "; ".join(problems)
                + "). Fix the cause or change IMAGENET_INT8_REPORT_MAX_PSNR_GAP / _MAX_CLIP_FRACTION / _BLOCKING."
            ),
            allow_retries=False,
        )


def _default_message(record: dict) -> str:
    return (
        f"imagenet-int8: {record['samples']} samples in {len(record['per_class'])} classes, "
        f"VAE {record['vae']['requested']}"
    )


@asset(
    name="hub_upload",
    group_name=PUBLISH_GROUP,
    deps=[mds_dataset, quantization_stats, reconstruction_report],
    kinds={"huggingface"},
    description=(
        "Publishes the dataset to the Hugging Face Hub dataset repository IMAGENET_INT8_HUB_REPO: the "
        "index and the shard folders it names, build.json, the report and statistics, a generated "
        "dataset card (README.md) and, unless IMAGENET_INT8_PARQUET_EXPORT=false, a parquet export "
        "(data/*.parquet). Incremental and resumable: only files whose content is not already there "
        "go up; nothing changed means no commit. In the graph only when a repository is configured."
    ),
)
def hub_upload(context: AssetExecutionContext, settings: ImagenetInt8Settings, hub_token: HubToken) -> MaterializeResult:
    if not settings.hub_repo:  # set empty for one run (the launchpad): nothing to publish to
        raise Failure(description=f"hub_upload: no Hub repository configured. To publish, {HOW_TO_ENABLE}.", allow_retries=False)
    settings.require_recorded_settings_or_fail()
    from huggingface_hub import HfApi

    from imagenet_int8_assets.core.hub.dataset_card import (
        card_inputs,
        random_weights_warning,
        render_card,
        validate_card,
    )
    from imagenet_int8_assets.core.common.files import atomic_write_bytes

    output = settings.output_path
    root = mds_root(output)
    record = mds_index.published_record(root)
    if record is None:
        raise Failure(description=f"no built dataset at {root}: materialize mds_dataset (or run `imagenet-int8 build`) first")
    _require_quality(settings)
    warning = random_weights_warning(record)
    if warning and not settings.publish_random_weights:
        raise Failure(
            description=(
                f"refusing to publish {root} to {settings.hub_repo}: {warning} Build it with real weights, or set "
                f"{ENV['publish_random_weights']}=true (`imagenet-int8 publish --allow-random-weights`) to publish it anyway."
            ),
            allow_retries=False,
        )
    folder = hub_folder(output)
    parquet = export_parquet(context, settings, record, folder) if settings.parquet_export else {}
    card_text = render_card(
        card_inputs(output), repo_id=settings.hub_repo, license=settings.hub_license or None, parquet=bool(parquet)
    )
    problems = validate_card(card_text)
    if problems:
        raise Failure(description="the generated dataset card is not valid: " + "; ".join(problems))
    card = folder / hub.CARD
    atomic_write_bytes(card, card_text.encode())
    try:
        layout = hub.repository_layout(
            root, card=card, report=report_dir(output), stats=stats_path(output), parquet=parquet
        )
    except hub.PublishError as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
    api = HfApi(token=hub_token.token)
    context.log.info(
        f"publishing {len(layout)} files to {redact_url(api.endpoint)} {settings.hub_repo}@{settings.hub_revision}"
    )
    try:
        result = hub.upload_dataset(
            api,
            settings.hub_repo,
            layout,
            revision=settings.hub_revision,
            private=settings.hub_private,
            message=settings.hub_commit_message or _default_message(record),
            files_per_commit=settings.hub_files_per_commit,
            hash_cache=folder / hub.HASH_CACHE,
            log=lambda line: context.log.info(redact_urls(line)),
            timeout=settings.hub_timeout,
        )
    except hub.PublishError as exc:
        raise Failure(description=redact_urls(str(exc)), allow_retries=False) from None
    except Exception as exc:  # noqa: BLE001 - whatever it is, its text and chain may quote a URL with the credentials
        raise _hub_failure(exc, settings, api.endpoint) from None
    if warning:
        context.log.warning(f"published with random weights (forced): {warning}")
    return MaterializeResult(
        metadata={
            "repository": MetadataValue.url(redact_url(result.url)),
            "repo_id": result.repo_id,
            "revision": result.revision,
            "private": result.private if result.private is not None else "unknown",
            "created": result.created,
            "commits": MetadataValue.json(result.commits),
            "files_sent": result.files_sent,
            "bytes_sent": result.bytes_sent,
            "files_resumed": result.files_resumed,
            "bytes_resumed": result.bytes_resumed,
            "files_skipped": result.files_skipped,
            "bytes_skipped": result.bytes_skipped,
            "files_deleted": len(result.deleted),
            "files_in_repository": len(layout),
            "files_per_folder": MetadataValue.json(dict(sorted(hub.folder_counts(layout).items()))),
            "parquet_files": len(parquet),
            "samples": record["samples"],
            "summary": redact_urls(result.summary()),
        }
    )


def export_parquet(context: AssetExecutionContext, settings: ImagenetInt8Settings, record: dict, folder: Path) -> dict[str, Path]:
    """The parquet export of every class of the published dataset: name under ``data/`` -> file.

    One file per class version, kept as ``<output>/hub/parquet/<class-dir>/<version>.parquet`` (so
    only classes with a new version are exported again) and published as ``data/<class-dir>.parquet``.
    """
    from imagenet_int8_assets.core.reading.parquet_export import write_parquet_file
    from imagenet_int8_assets.core.common.layout import class_dir_name

    root = mds_root(settings.output_path)
    files, written = {}, 0
    for class_name, version in sorted(record["versions"].items()):
        class_dir = class_dir_name(class_name)
        target = folder / "parquet" / class_dir / f"{PurePosixPath(version).name}.parquet"
        if not target.is_file():
            try:
                # inside the output by design: the unchecked writer for a place the product owns
                write_parquet_file(root / version, target, output=settings.output_path)
            except ValueError as exc:  # latents re-encoded since the published shards were written
                raise Failure(description=f"parquet export: {exc}", allow_retries=False) from None
            written += 1
        for stale in target.parent.glob("*.parquet"):
            if stale != target:
                stale.unlink()
        files[f"{class_dir}.parquet"] = target
    context.log.info(f"parquet export: {written} class file(s) written, {len(files) - written} unchanged")
    return files
