"""The lineage spec: YAML validation, defaults, derived names (no servers needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.errors import ConfigError
from mergeflow.lineage import LineageSpec

SPEC = """
name: vision-opcm
base: s3://models/vit-base
method: opcm
params: {alpha: 0.5}
sources:
  - s3://published/vision
  - hf://?base_model=org/vit-base
evaluation:
  tasks:
    - {name: rot90, checkpoint: 01-rot90, data: "s3://data/rot90/{split}.npz"}
gate: {min_acc: 0.5, max_drop: 0.05, task_floors: {rot90: 0.4}}
candidates:
  - {params: {alpha: 0.3}}
  - {name: wide, params: {alpha: 0.7}}
store: s3://mergeflow/lineages/vision-opcm/
schedule: "*/5 * * * *"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lineage.yaml"
    p.write_text(text)
    return p


def test_full_spec_loads_with_derived_names(tmp_path: Path) -> None:
    spec = LineageSpec.from_yaml(_write(tmp_path, SPEC))
    assert spec.registered_model == "vision-opcm"
    assert spec.store == "s3://mergeflow/lineages/vision-opcm"  # trailing slash dropped
    assert spec.spec_uri == "s3://mergeflow/lineages/vision-opcm/lineage.yaml"
    assert spec.concurrency_name == "mergeflow-fold-vision-opcm"
    assert spec.schedule == "*/5 * * * *"
    assert spec.device == "auto"
    assert spec.gate.task_floors == {"rot90": 0.4}
    assert (
        spec.evaluation is not None
        and spec.evaluation.tasks[0].data_uri("test") == "s3://data/rot90/test.npz"
    )
    assert spec.candidate_params() == [("alpha0.3", {"alpha": 0.3}), ("wide", {"alpha": 0.7})]


def test_yaml_round_trip_is_identical(tmp_path: Path) -> None:
    spec = LineageSpec.from_yaml(_write(tmp_path, SPEC))
    assert LineageSpec.from_yaml_text(spec.to_yaml()) == spec


def test_no_candidates_means_one_fold_with_the_lineage_params(tmp_path: Path) -> None:
    spec = LineageSpec.from_yaml_text(
        "name: a\nbase: /m\nsources: [/src]\nstore: /st\nparams: {alpha: 0.4}\n"
    )
    assert spec.candidate_params() == [("main", {"alpha": 0.4})]
    assert spec.schedule == 60 and spec.registered_model == "a"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("name: Bad_Name", "must be a slug"),
        ("method: batch_ties", "batch method"),
        ("method: nope", "unknown method"),
        ("params: {alpha: 2}", "invalid parameters"),
        ("sources: []", "sources"),
        ("device: tpu", "device"),
        ("schedule: 2", "at least 5 seconds"),
        ("schedule: every minute", "neither a number of seconds nor a cron"),
        ("surprise: 1", "Extra inputs"),
        (
            "candidates: [{method: task_arithmetic, params: {scale: 0.3}}]",
            "candidates vary the parameters",
        ),
        ("candidates: [{params: {alpha: 0.3}}, {params: {alpha: 0.3}}]", "unique"),
        ("gate: {max_drop: -1}", "gate.max_drop"),
    ],
)
def test_invalid_specs_give_one_clear_error(patch: str, message: str) -> None:
    base = {
        "name": "name: ok",
        "method": "method: opcm",
        "sources": "sources: [/src]",
        "store": "store: /st",
        "base": "base: /m",
    }
    key = patch.split(":", 1)[0]
    lines = [v for k, v in base.items() if k != key] + [patch]
    with pytest.raises(ConfigError, match=message):
        LineageSpec.from_yaml_text("\n".join(lines), "x.yaml")


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read lineage spec"):
        LineageSpec.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        LineageSpec.from_yaml(_write(tmp_path, "name: [unclosed"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        LineageSpec.from_yaml(_write(tmp_path, "- a\n- b\n"))


def test_spec_is_frozen() -> None:
    spec = LineageSpec.from_yaml_text("name: a\nbase: /m\nsources: [/src]\nstore: /st\n")
    with pytest.raises(Exception, match="frozen"):
        spec.name = "b"  # type: ignore[misc]
