"""The production profile on one box: Prefect and MLflow on PostgreSQL, S3 artifacts.

Uses ``postgres_stack`` (see ``tests/fixtures_stack.py``): fresh databases per session on
the local PostgreSQL (127.0.0.1:5432, trust auth), dropped at the end. Sections:

1. the servers themselves (this file's first tests);
2. the pipeline on PostgreSQL (added by the pipeline work below the marker).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers.cli import start_serve

if TYPE_CHECKING:
    from fixtures_stack import RunningStack

pytestmark = [pytest.mark.postgres, pytest.mark.services, pytest.mark.slow]


# ------------------------------------------------------------------- 1. the servers
def test_mlflow_run_with_s3_artifact_is_stored_in_postgres(
    postgres_stack: RunningStack, tmp_path: Path
) -> None:
    import mlflow

    assert postgres_stack.settings.profile == "production"
    mlflow.set_experiment("mergeflow-pg-test")
    with mlflow.start_run(run_name="pg") as run:
        mlflow.log_param("method", "opcm")
        mlflow.log_metric("accuracy", 0.5)
        note = tmp_path / "note.txt"
        note.write_text("stored on S3")
        mlflow.log_artifact(str(note), artifact_path="notes")
    run_id = run.info.run_id

    # The run lives in PostgreSQL ...
    rows = postgres_stack.sql("mlflow", "SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
    assert rows == [("FINISHED",)]
    # ... and its artifact on the object store, behind the server's artifact proxy.
    s3 = postgres_stack.s3_client()
    listing = s3.list_objects_v2(Bucket=postgres_stack.bucket, Prefix="mlartifacts/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/notes/note.txt") for k in keys), keys
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="notes/note.txt", dst_path=str(tmp_path / "dl")
    )
    assert Path(local).read_text() == "stored on S3"


def test_prefect_flow_run_is_stored_in_postgres(postgres_stack: RunningStack) -> None:
    from prefect import flow, get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    @flow(name="mergeflow-pg-hello", persist_result=False)
    def hello(x: int) -> int:
        return x + 1

    state = hello(1, return_state=True)
    assert state.is_completed() and state.result() == 2
    flow_run_id = state.state_details.flow_run_id

    with get_client(sync_client=True) as client:
        assert str(client.api_url).startswith(postgres_stack.prefect_api_url)
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["mergeflow-pg-hello"]))
        )
        assert flow_run_id in [r.id for r in runs]
    rows = postgres_stack.sql(
        "prefect",
        "SELECT state_type FROM flow_run WHERE id = %s",
        (str(flow_run_id),),
    )
    assert rows == [("COMPLETED",)]


# ------------------------------------------------------- 2. the pipeline on PostgreSQL
# (pipeline tests go here; use the `postgres_stack` fixture)


def test_pipeline_folds_published_checkpoints_on_postgres(
    postgres_stack: RunningStack, tmp_path: Path
) -> None:
    """watch (schedule) -> event -> fold -> register, with Prefect and MLflow on PostgreSQL."""
    import time
    import uuid

    from test_flows import build_mlp_suite, flow_runs, lineage_spec, publish, wait_for_version

    from mergeflow.lineage import save_lineage

    suite = build_mlp_suite(tmp_path / "suite")
    tag = uuid.uuid4().hex[:6]
    prefix = f"s3://{postgres_stack.bucket}/pg-{tag}"
    spec = save_lineage(lineage_spec(f"pg-{tag}", suite, prefix))
    name = f"serve-pg-{tag}"
    log = start_serve(postgres_stack.stack, name, [spec])
    try:
        publish(prefix, suite, "t1")
        publish(prefix, suite, "t2")
        v1 = wait_for_version(spec.registered_model, "t1", log)
        v2 = wait_for_version(spec.registered_model, "t2", log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # let the fold runs finish before stopping serve
            folds = flow_runs("mergeflow-fold", lineage=spec.name)
            if folds and all(r.state_type and r.state_type.value == "COMPLETED" for r in folds):
                break
            time.sleep(1.0)
    finally:
        postgres_stack.stack.stop_process(name)
    assert (v1.status, v2.status) == ("accepted", "accepted")
    assert v2.parent_version == v1.version and v2.step == 2
    rows = postgres_stack.sql(
        "mlflow",
        "SELECT version FROM model_versions WHERE name = %s ORDER BY version",
        (spec.registered_model,),
    )
    assert [str(r[0]) for r in rows] == [v1.version, v2.version]
    folds = flow_runs("mergeflow-fold", lineage=spec.name)
    assert folds and all(r.created_by and r.created_by.type == "AUTOMATION" for r in folds)
    ids = [str(r.id) for r in folds]
    done = postgres_stack.sql(
        "prefect", "SELECT state_type FROM flow_run WHERE id::text = ANY(%s)", (ids,)
    )
    assert done and {r[0] for r in done} == {"COMPLETED"}
