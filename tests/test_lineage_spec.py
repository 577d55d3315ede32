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


PORTFOLIO = """
name: folio
base: /m
method: opcm
params: {alpha: 0.4}
sources: [/src]
store: /st
candidates:
  - {method: opcm}
  - {params: {alpha: 0.7}}
  - {method: task_arithmetic, params: {scale: 0.3}}
  - {method: weight_average}
  - {name: rm, method: regmean}
"""


def test_a_portfolio_names_other_methods_each_with_its_own_state_chain() -> None:
    spec = LineageSpec.from_yaml_text(PORTFOLIO)
    assert [(c.label, c.method, c.params) for c in spec.candidate_folds()] == [
        ("opcm", "opcm", {"alpha": 0.4}),  # the lineage's method: over the lineage's params
        ("alpha0.7", "opcm", {"alpha": 0.7}),
        ("task_arithmetic-scale0.3", "task_arithmetic", {"scale": 0.3}),  # its own params alone
        ("weight_average", "weight_average", {}),
        ("rm", "regmean", {}),
    ]
    assert spec.chain_methods() == ["opcm", "task_arithmetic", "weight_average", "regmean"]
    assert spec.chain_params("opcm") == {"alpha": 0.4}
    assert spec.chain_params("task_arithmetic") == {"scale": 0.3}
    assert LineageSpec.from_yaml_text(spec.to_yaml()) == spec
    single = LineageSpec.from_yaml_text("name: a\nbase: /m\nsources: [/src]\nstore: /st\n")
    assert single.chain_methods() == ["opcm"]


@pytest.mark.parametrize(
    ("candidates", "message"),
    [
        (
            "[{method: opcm}, {method: nope}]",
            "candidate nope: unknown method 'nope'; known methods: opcm, ",
        ),
        (
            "[{method: batch_ties}]",
            "candidate batch_ties: method 'batch_ties' is a batch method (a one-shot merge) "
            "and cannot fold continually; continual methods: opcm, ",
        ),
        (
            "[{name: fw, method: fw_merging}]",
            "candidate fw: method 'fw_merging' is a pool method (it merges a whole pool at once) "
            "and cannot fold continually",
        ),
        (
            "[{method: task_arithmetic, params: {alpha: 0.3}}]",
            "candidate task_arithmetic-alpha0.3: invalid parameters for method 'task_arithmetic': "
            "alpha: Extra inputs are not permitted",
        ),
        (
            "[{method: opcm, params: {alpha: 1.5}}]",
            "candidate opcm-alpha1.5: invalid parameters for method 'opcm': alpha",
        ),
        (
            "[{method: weight_average}, {method: weight_average}]",
            "candidate names must be unique, got ['weight_average', 'weight_average'] "
            "(weight_average more than once; give one a `name`)",
        ),
    ],
)
def test_a_bad_candidate_is_named_in_one_line(candidates: str, message: str) -> None:
    text = PORTFOLIO.split("candidates:")[0] + f"candidates: {candidates}\n"
    with pytest.raises(ConfigError) as err:
        LineageSpec.from_yaml_text(text, "x.yaml")
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("x.yaml: spec: Value error, candidate")
    assert message in str(err.value)


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
