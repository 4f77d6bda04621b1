"""Settings as a user launches them: per run (launchpad, `--config-json`) on top of the environment,
value by value; and a code location whose settings conflict with the output's record, shown but
refusing every launch from the moment it loads. Real `dagster asset materialize` subprocesses, a real
code server answering Dagster's own GraphQL schema."""

from __future__ import annotations

import json
import subprocess

import dagster as dg
import pytest

from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.support.builds import BIN, cli_env

SAMPLE_CLASSES = {"n01440764", "n02102040", "n02979186", "n03000684"}


def _materialize(env: dict, cwd, select: str, config: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "imagenet_int8_assets", "--select", select]
    if config is not None:
        command += ["--config-json", json.dumps({"resources": {"settings": {"config": config}}})]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_settings_given_per_run_override_the_environment_value_by_value(tmp_path):
    """`{"report_per_class": 1}` for one run keeps the environment's output, VAE and source: the run
    writes into IMAGENET_INT8_OUTPUT (it used to fall back to ./imagenet_int8_data, generate the sample
    in the working directory and register its classes); a per-run value that conflicts with the
    output's record is refused like the CLI's."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = cli_env(tmp_path, DAGSTER_HOME=str(home))  # output tmp_path/out, tiny-random, the sample source
    proc = _materialize(env, work, "raw_manifest", {"report_per_class": 1})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    assert (out / "manifest" / "manifest.parquet").is_file() and (out / "sample_source").is_dir()
    assert not any(work.iterdir()), f"the run wrote into the working directory: {list(work.iterdir())}"
    recorded = json.loads((out / "settings.json").read_text())
    assert recorded["vae"] == "tiny-random", recorded  # the environment's VAE, not the default
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert set(instance.get_dynamic_partitions("classes")) == SAMPLE_CLASSES

    manifest = (out / "manifest" / "manifest.parquet").read_bytes()
    refused = _materialize(env, work, "raw_manifest", {"seed": 7})
    assert refused.returncode != 0
    assert "IMAGENET_INT8_SEED: the output holds 0, this launch has 7" in refused.stdout + refused.stderr
    assert (out / "manifest" / "manifest.parquet").read_bytes() == manifest
    assert json.loads((out / "settings.json").read_text()) == recorded


def test_a_range_given_as_the_value_the_recorded_default_stands_for_is_the_same_setting(tmp_path):
    """An output recorded with IMAGENET_INT8_QUANT_RANGE=0 (the VAE's default: 12 for SDXL) accepts a
    launch with 12, which means the same (it was refused), and keeps its code versions; 11 differs."""
    out = tmp_path / "out"
    ImagenetInt8Settings(output=str(out), vae="tiny-random").record_settings()
    env = {"IMAGENET_INT8_OUTPUT": str(out)}
    same = ImagenetInt8Settings.from_env({**env, "IMAGENET_INT8_QUANT_RANGE": "12"})
    assert same.settings_conflicts() == []
    assert same.code_version("mds_shards") == ImagenetInt8Settings.from_env(env).code_version("mds_shards")
    other = ImagenetInt8Settings.from_env({**env, "IMAGENET_INT8_QUANT_RANGE": "11"})
    assert other.settings_conflicts() == ["IMAGENET_INT8_QUANT_RANGE: the output holds 0.0, this launch has 11.0"]


ASSETS_QUERY = """
query { assetNodes { assetKey { path } isMaterializable description opVersion } }
"""
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) { __typename ... on Error { message } }
}
"""
REPOSITORY_QUERY = "query { repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
SENSOR_QUERY = """
query Sensors($selector: RepositorySelector!) {
  sensorsOrError(repositorySelector: $selector) { ... on Sensors { results { name description } } }
}
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_code_location_whose_settings_conflict_shows_the_graph_and_refuses_every_launch(tmp_path, monkeypatch):
    """`dagster dev` restarted with IMAGENET_INT8_SEED=3 on an output built with seed 0: when the code
    location loads, every asset says why in its description and is not materializable (the UI offers
    no Materialize, "Materialize all" included), its code versions are the recorded ones (nothing
    looks changed), a launch creates no run, and `dagster asset materialize` prints the reason."""
    from dagster._core.test_utils import instance_for_test
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    from imagenet_int8_assets.definitions import build_definitions, location_definitions

    out = tmp_path / "out"
    recorded = ImagenetInt8Settings(output=str(out), vae="tiny-random")
    recorded.record_settings()  # what the first build records
    monkeypatch.setenv("IMAGENET_INT8_OUTPUT", str(out))
    monkeypatch.setenv("IMAGENET_INT8_SEED", "3")
    expected = "IMAGENET_INT8_SEED: the output holds 0, this launch has 3"

    refusing = location_definitions().resolve_asset_graph()
    normal = build_definitions(ImagenetInt8Settings.from_env({"IMAGENET_INT8_OUTPUT": str(out)})).resolve_asset_graph()
    assert {k for k in refusing.get_all_asset_keys()} == {k for k in normal.get_all_asset_keys()}
    for key in normal.get_all_asset_keys():
        assert refusing.get(key).code_version == normal.get(key).code_version, key

    from imagenet_int8_assets import definitions

    with instance_for_test() as instance:
        with define_out_of_process_context(definitions.__file__, "defs", instance) as context:
            nodes = execute_dagster_graphql(context, ASSETS_QUERY).data["assetNodes"]
            assert nodes and not any(n["isMaterializable"] for n in nodes)
            assert all(expected in n["description"] for n in nodes), [n["description"][:200] for n in nodes]
            repository = execute_dagster_graphql(context, REPOSITORY_QUERY).data["repositoriesOrError"]["nodes"][0]
            selector = {"repositoryLocationName": repository["location"]["name"], "repositoryName": repository["name"]}
            params = {
                "selector": {
                    **selector,
                    "pipelineName": "__ASSET_JOB",
                    "assetSelection": [{"path": ["raw_manifest"]}],
                    "assetCheckSelection": [],
                },
                "mode": "default",
                "runConfigData": {},
                "executionMetadata": {"tags": []},
            }
            launched = execute_dagster_graphql(context, LAUNCH, {"params": params}).data["launchPipelineExecution"]
            assert launched["__typename"] == "InvalidSubsetError", launched  # refused up front, no run
            assert "executable" in launched["message"], launched
            sensors = execute_dagster_graphql(context, SENSOR_QUERY, {"selector": selector}).data
            described = {s["name"]: s["description"] for s in sensors["sensorsOrError"]["results"]}
            assert expected in described["class_folders"], described
        assert instance.get_runs() == [], "a launch of the refusing code location created a run"

    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(tmp_path, DAGSTER_HOME=str(home), IMAGENET_INT8_SEED="3")
    proc = _materialize(env, tmp_path, "raw_manifest")
    assert proc.returncode != 0
    assert f"imagenet-int8: IMAGENET_INT8_OUTPUT={str(out)!r} holds a dataset built with other settings" in proc.stderr
    assert expected in proc.stderr and "imagenet-int8 build --force" in proc.stderr
    assert not (out / "manifest").exists()
