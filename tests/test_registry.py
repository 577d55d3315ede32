"""The MLflow registry adapter against a real MLflow server with S3 (SeaweedFS) artifacts.

Uses the session ``stack`` from ``fixtures_stack`` (MLflow on SQLite, artifacts proxied to
``s3://mergeflow/mlartifacts``). Each test module run uses fresh registered-model names,
so it shares the stack with other modules safely.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mergeflow.cli.tables import format_chain
from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.storage.registry import (
    CHAMPION_ALIAS,
    NEWEST_ALIAS,
    FoldRecord,
    MlflowSource,
    Registry,
    VersionRecord,
    parse_mlflow_uri,
    plots,
    resolve_model_uri,
    tags,
)
from mergeflow.storage.schemes import open_source

if TYPE_CHECKING:
    from fixtures_stack import RunningStack


CONTRACT_TAGS = {
    "mergeflow.lineage",
    "mergeflow.step",
    "mergeflow.status",
    "mergeflow.reason",
    "mergeflow.method",
    "mergeflow.metrics",
    "mergeflow.checkpoint.id",
    "mergeflow.checkpoint.uri",
    "mergeflow.checkpoint.digest",
    "mergeflow.parent.version",
    "mergeflow.state.uri",
    "mergeflow.model.uri",
    "mergeflow.model.id",
}
PNGS = {"plots/accuracy_per_step.png", "plots/lineage.png", "plots/accuracy_heatmap.png"}


def fold(
    lineage: str,
    model: str,
    step: int,
    ckpt: str,
    status: str,
    parent: str | None,
    acc: float,
    **extra: Any,
) -> FoldRecord:
    matrix = [[0.9, 0.88][:step], [None, acc][:step]]
    values: dict[str, Any] = dict(
        lineage=lineage,
        registered_model=model,
        step=step,
        checkpoint_id=ckpt,
        checkpoint_uri=f"s3://mergeflow/incoming/{ckpt}",
        checkpoint_digest=f"sha256:{uuid.uuid4().hex}",
        parent_version=parent,
        method="opcm",
        params={"alpha": 0.5, "svd": {"dtype": "float64"}},
        base_uri="s3://mergeflow/base",
        state_uri=f"s3://mergeflow/lineages/{lineage}/states/{step}-{ckpt}",
        model_uri=f"s3://mergeflow/lineages/{lineage}/models/{step}-{ckpt}",
        status=status,
        reason="" if status == "accepted" else "test/avg 0.400 < champion 0.900 - 0.05",
        metrics={
            "test/avg": acc,
            "test/rot90": 0.9,
            "test/flip": acc,
            "test/bwt": -0.02,
            "val/flip": acc,
            "val/avg": acc,
            "fold_seconds": 1.5,
        },
        accuracy_matrix=matrix,
        task_names=["rot90", "flip"],
        eval_datasets=[
            {
                "name": "flip",
                "uri": "s3://mergeflow/data/flip/test.npz",
                "split": "test",
                "digest": "sha256:ab12",
            }
        ],
    )
    values.update(extra)
    return FoldRecord(**values)


@pytest.fixture(scope="module")
def chain(stack: RunningStack) -> dict[str, Any]:
    """Three folds (accepted, rejected, accepted) of one lineage, with the state after each."""
    reg = Registry()
    lineage = f"lin-{uuid.uuid4().hex[:8]}"
    model = f"{lineage}-model"
    recs = [
        fold(lineage, model, 1, "01-rot90", "accepted", None, 0.9),
        fold(lineage, model, 2, "02-noise", "rejected", "1", 0.4),
        fold(lineage, model, 2, "03-flip", "accepted", "1", 0.85),
    ]
    out: list[VersionRecord] = []
    snapshots: list[list[VersionRecord]] = []
    for rec in recs:
        out.append(reg.register_fold(rec))
        snapshots.append(reg.versions(model))
    return {
        "reg": reg,
        "model": model,
        "lineage": lineage,
        "recs": recs,
        "out": out,
        "snaps": snapshots,
    }


pytestmark = pytest.mark.services


def test_versions_tags_parent_chain_and_aliases(chain: dict[str, Any]) -> None:
    reg, model, recs = chain["reg"], chain["model"], chain["recs"]
    versions = reg.versions(model)
    assert [v.version for v in versions] == ["1", "2", "3"]
    assert [v.status for v in versions] == ["accepted", "rejected", "accepted"]
    assert [v.checkpoint_id for v in versions] == ["01-rot90", "02-noise", "03-flip"]
    assert [v.parent_version for v in versions] == [None, "1", "1"]
    assert versions[2].metrics["test/avg"] == pytest.approx(0.85)
    assert versions[1].reason.startswith("test/avg 0.400")
    assert [v.aliases for v in versions] == [[], [], [CHAMPION_ALIAS, NEWEST_ALIAS]]
    # After each fold: champion stays on the last accepted version, newest moves every time.
    aliases_after = [{a: v.version for v in snap for a in v.aliases} for snap in chain["snaps"]]
    assert aliases_after == [
        {CHAMPION_ALIAS: "1", NEWEST_ALIAS: "1"},
        {CHAMPION_ALIAS: "1", NEWEST_ALIAS: "2"},
        {CHAMPION_ALIAS: "3", NEWEST_ALIAS: "3"},
    ]
    assert reg.champion(model) == versions[2]
    assert reg.newest(model) == versions[2]
    assert reg.last_accepted(model) == versions[2]
    assert reg.find(model, recs[1].checkpoint_digest) == versions[1]
    assert reg.find(model, "sha256:never-seen") is None
    seen = reg.seen_checkpoints(model)
    assert {r.checkpoint_id for r in recs} | {r.checkpoint_digest for r in recs} <= seen

    mv = reg.client.get_model_version(model, "2")
    assert (
        set(tags.VERSION_TAGS)
        == CONTRACT_TAGS
        == {k for k in mv.tags if k.startswith("mergeflow.")}
    )
    assert mv.tags["mergeflow.status"] == "rejected"
    assert mv.tags["mergeflow.parent.version"] == "1"
    assert mv.tags["mergeflow.step"] == "2"
    assert mv.tags["mergeflow.model.uri"] == recs[1].model_uri
    assert mv.tags["mergeflow.state.uri"] == recs[1].state_uri
    assert mv.tags["mergeflow.method"] == "opcm"
    assert mv.tags["mergeflow.model.id"] == versions[1].model_id
    assert json.loads(mv.tags["mergeflow.metrics"])["test/avg"] == pytest.approx(0.4)
    assert "**REJECTED**" in mv.description and "step 2" in mv.description
    assert "| test/avg | 0.4000 |" in mv.description and "version 1" in mv.description
    rows = [r for r in mv.description.splitlines() if r.startswith("| test/") or "| val/" in r]
    assert [r.split()[1] for r in rows][:4] == ["test/avg", "test/bwt", "test/flip", "test/rot90"]

    table = format_chain(versions)
    assert table.splitlines()[0].split() == [
        "version",
        "step",
        "status",
        "checkpoint",
        "parent",
        "test/avg",
        "test/bwt",
        "aliases",
        "reason",
    ]
    assert "champion,newest" in table.splitlines()[3] and "test/avg 0.400" in table


def test_run_logged_model_and_artifacts_on_s3(chain: dict[str, Any], stack: RunningStack) -> None:
    reg, model = chain["reg"], chain["model"]
    client = reg.client
    v3 = chain["out"][2]
    assert v3.run_id and v3.model_id
    mv = client.get_model_version(model, "3")
    assert mv.source == f"models:/{v3.model_id}"  # the UI's "Source Model" link

    run = client.get_run(v3.run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.info.experiment_id
        == client.get_experiment_by_name(f"mergeflow/{chain['lineage']}").experiment_id
    )
    assert run.data.params["method"] == "opcm"
    assert run.data.params["param.alpha"] == "0.5"
    assert run.data.params["param.svd.dtype"] == "float64"
    assert run.data.params["base"] == "s3://mergeflow/base"
    assert run.data.params["checkpoint"] == "s3://mergeflow/incoming/03-flip"
    assert run.data.metrics["test/avg"] == pytest.approx(0.85)
    assert run.data.metrics["test/bwt"] == pytest.approx(-0.02)
    assert run.data.metrics["val/avg"] == pytest.approx(0.85)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["flip"]
    assert [o.model_id for o in run.outputs.model_outputs] == [v3.model_id]
    run_files = {f.path for f in client.list_artifacts(v3.run_id, "plots")}
    assert run_files == PNGS

    lm = client.get_logged_model(v3.model_id)
    assert str(lm.status) == "READY" and lm.source_run_id == v3.run_id
    assert lm.tags["mlflow.model.isExternal"] == "true"
    assert lm.tags["mergeflow.model.uri"] == chain["recs"][2].model_uri
    assert lm.tags["mergeflow.model.id"] == v3.model_id
    assert {"name": model, "version": 3} in json.loads(lm.tags["mlflow.modelVersions"])
    assert lm.params["param.alpha"] == "0.5"
    linked = {m.key: m for m in lm.metrics}
    assert linked["test/avg"].value == pytest.approx(0.85)
    assert linked["test/flip"].dataset_name == "flip"
    assert not linked["test/avg"].dataset_name and not linked["val/flip"].dataset_name
    model_files = {f.path for f in client.list_logged_model_artifacts(v3.model_id)}
    assert {"MLmodel", "mergeflow.json", "description.md", "plots"} <= model_files

    # The small artifacts sit on the object store, under the server's artifacts destination.
    s3 = stack.s3_client()
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=stack.bucket, Prefix="mlartifacts/"
        )
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith(f"{v3.run_id}/artifacts/plots/lineage.png") for k in keys)
    lineage_key = next(k for k in keys if v3.model_id in k and k.endswith("plots/lineage.png"))
    body = s3.get_object(Bucket=stack.bucket, Key=lineage_key)["Body"].read()
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    local = client.download_artifacts(v3.run_id, "mergeflow.json", str(stack.home))
    record = json.loads(Path(local).read_text())
    assert record["version"] == "3" and record["checkpoint_id"] == "03-flip"


def test_resolve_model_uri(chain: dict[str, Any]) -> None:
    model, recs = chain["model"], chain["recs"]
    assert resolve_model_uri(f"mlflow://models/{model}/1") == recs[0].model_uri
    assert resolve_model_uri(f"mlflow://models/{model}/2") == recs[1].model_uri
    champion = chain["reg"].champion(model)
    assert resolve_model_uri(f"mlflow://models/{model}@champion") == champion.model_uri
    assert resolve_model_uri(f"mlflow://models/{model}@newest") == recs[2].model_uri
    assert resolve_model_uri(f"mlflow://models/{model}@latest") == recs[2].model_uri
    assert resolve_model_uri(f"mlflow://models/{model}/latest") == recs[2].model_uri
    assert resolve_model_uri(f"models:/{model}/1") == recs[0].model_uri


def test_mlflow_source_lists_upstream_versions(stack: RunningStack, chain: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    upstream = f"upstream-{uuid.uuid4().hex[:8]}"
    exp = client.create_experiment(f"{upstream}-training")
    client.create_registered_model(upstream)
    ids = []
    for i in range(3):
        run = client.create_run(exp)
        lm = client.create_logged_model(exp, name=f"ft-{i}", source_run_id=run.info.run_id)
        folder = Path(stack.home) / f"{upstream}-{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"i": i}))
        client.log_model_artifacts(lm.model_id, str(folder))
        client.finalize_logged_model(lm.model_id, "READY")
        client.create_model_version(
            upstream, f"models:/{lm.model_id}", run.info.run_id, model_id=lm.model_id
        )
        ids.append(lm.model_id)

    source = open_source(f"mlflow://models/{upstream}")
    assert isinstance(source, MlflowSource) and source.uri == f"mlflow://models/{upstream}"
    listed = source.list()
    assert [c.id for c in listed] == [f"{upstream}-v1", f"{upstream}-v2", f"{upstream}-v3"]
    assert [c.uri for c in listed] == [f"mlflow://models/{upstream}/{i}" for i in (1, 2, 3)]
    assert len({c.digest for c in listed}) == 3 and source.list() == listed
    assert [c.published_at for c in listed] == sorted(c.published_at for c in listed)

    # An upstream version without mergeflow tags resolves to its LoggedModel's files on S3.
    weights = resolve_model_uri(f"mlflow://models/{upstream}/2")
    assert weights.startswith(f"s3://{stack.bucket}/mlartifacts/") and ids[1] in weights
    key = weights.removeprefix(f"s3://{stack.bucket}/") + "/config.json"
    body = stack.s3_client().get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    assert json.loads(body) == {"i": 1}

    # A mergeflow lineage watched as upstream: its rejected versions are not offered.
    downstream = MlflowSource(chain["model"]).list()
    assert "02-noise" not in {c.id for c in downstream}
    assert f"{chain['model']}-v2" not in {c.id for c in downstream}
    assert f"{chain['model']}-v1" in {c.id for c in downstream}


def test_bad_input_gives_clear_errors(chain: dict[str, Any]) -> None:
    reg, model = chain["reg"], chain["model"]
    assert reg.versions("no-such-model") == []
    assert reg.champion("no-such-model") is None and reg.seen_checkpoints("no-such-model") == set()
    with pytest.raises(CheckpointError, match="registered model 'no-such-model' does not exist"):
        resolve_model_uri("mlflow://models/no-such-model/1")
    with pytest.raises(CheckpointError, match="has no version 99"):
        resolve_model_uri(f"mlflow://models/{model}/99")
    with pytest.raises(CheckpointError, match="has no alias 'nope'"):
        resolve_model_uri(f"mlflow://models/{model}@nope")
    with pytest.raises(CheckpointError, match="name a version or an alias"):
        resolve_model_uri(f"mlflow://models/{model}")
    with pytest.raises(CheckpointError, match="not an MLflow model URI"):
        resolve_model_uri("s3://bucket/x")
    with pytest.raises(CheckpointError, match="does not exist"):
        MlflowSource("no-such-model").list()
    with pytest.raises(ConfigError, match="not one version"):
        MlflowSource.from_uri(f"mlflow://models/{model}/1")
    other = fold("another-lineage", model, 1, "x", "accepted", None, 0.5)
    with pytest.raises(ConfigError, match="already records lineage"):
        reg.register_fold(other)
    with pytest.raises(ConfigError, match="needs model_uri"):
        reg.register_fold(fold(chain["lineage"], model, 9, "y", "accepted", "1", 0.5, model_uri=""))


def test_parse_mlflow_uri() -> None:
    assert parse_mlflow_uri("mlflow://models/a/3") == ("a", "3", None)
    assert parse_mlflow_uri("mlflow://models/a@champion") == ("a", None, "champion")
    assert parse_mlflow_uri("mlflow://models/a") == ("a", None, None)
    assert parse_mlflow_uri("mlflow://models/org/team-model/7") == ("org/team-model", "7", None)
    assert parse_mlflow_uri("models:/a/latest") == ("a", "latest", None)


def test_plots_write_pngs(tmp_path: Path) -> None:
    nodes = [
        plots.PlotNode("1", 1, "accepted", "a", None, 0.9),
        plots.PlotNode("2", 2, "rejected", "b", "1", None),
        plots.PlotNode("3", 2, "accepted", "c" * 40, "1", 0.8, ("champion",)),
    ]
    files = [
        plots.plot_accuracy_per_step(nodes, tmp_path / "a.png", accuracy_matrix=[[0.9, None]]),
        plots.plot_lineage(nodes * 12, tmp_path / "l.png"),  # more than MAX_NODES
        plots.plot_lineage([], tmp_path / "empty.png"),
        plots.plot_accuracy_heatmap([[0.9, 0.8], [None, 0.7]], ["t0"], tmp_path / "h.png"),
        plots.plot_accuracy_per_step([], tmp_path / "none.png"),
    ]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_accuracy_plot_leaves_out_superseded_and_dropped_versions() -> None:
    """After a drop the replaced versions are history, not rejections: they were drawn as
    grey "rejected" marks beside the replayed chain."""
    nodes = [
        plots.PlotNode("1", 1, "accepted", "a", None, 0.9),
        plots.PlotNode("2", 2, "rejected", "b", "1", 0.4),
        plots.PlotNode("3", 2, "dropped", "c", "1", 0.85),
        plots.PlotNode("4", 3, "superseded", "d", "3", 0.8),
        plots.PlotNode("5", 2, "accepted", "d", "1", 0.82),
        plots.PlotNode("6", 3, "rejected", "e", "5", None),
    ]
    assert [n.version for n in plots.scored(nodes, "accepted")] == ["1", "5"]
    assert [n.version for n in plots.scored(nodes, "rejected")] == ["2"]


def test_register_is_idempotent_and_cleans_orphan_runs(chain: dict[str, Any]) -> None:
    """Runs last: it adds versions 4 and 5 to the shared chain."""
    reg, model, lineage = chain["reg"], chain["model"], chain["lineage"]
    v3 = reg.versions(model)[2]
    assert reg.register_fold(chain["recs"][2]) == v3
    assert len(reg.versions(model)) == 3
    exp = reg.client.get_experiment_by_name(f"mergeflow/{lineage}")
    assert len(reg.client.search_runs([exp.experiment_id])) == 3  # the repeat logged nothing

    # A crashed attempt: its run exists but no version was created. The retry drops it.
    rec = fold(lineage, model, 3, "04-crash", "accepted", "3", 0.87)
    orphan = reg.client.create_run(
        exp.experiment_id, tags={"mergeflow.checkpoint.digest": rec.checkpoint_digest}
    )
    v4 = reg.register_fold(rec)
    assert v4.version == "4" and v4.aliases == [CHAMPION_ALIAS, NEWEST_ALIAS]
    assert reg.client.get_run(orphan.info.run_id).info.lifecycle_stage == "deleted"
    live = reg.client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mergeflow.checkpoint.digest` = '{rec.checkpoint_digest}'",
    )
    assert [r.info.run_id for r in live] == [v4.run_id]

    # A validation failure: recorded (never retried), no weights, never champion.
    bad = fold(lineage, model, 4, "05-broken", "accepted", "4", 0.0, metrics={})
    rej = reg.record_rejection(bad.model_copy(update={"reason": "missing tensor fc.weight"}))
    assert (rej.status, rej.model_uri, rej.aliases) == ("rejected", "", [NEWEST_ALIAS])
    assert reg.champion(model).version == "4"
    assert {"05-broken", bad.checkpoint_digest} <= reg.seen_checkpoints(model)
    assert reg.record_rejection(bad) == reg.versions(model)[4]
    with pytest.raises(CheckpointError, match="no weights.*missing tensor"):
        resolve_model_uri(f"mlflow://models/{model}/{rej.version}")
    with pytest.raises(CheckpointError, match="no weights"):
        resolve_model_uri(f"mlflow://models/{model}@latest")
    assert resolve_model_uri(f"mlflow://models/{model}@champion") == rec.model_uri
