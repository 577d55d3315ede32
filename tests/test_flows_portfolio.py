"""A method portfolio in one lineage: candidates of several methods, each with its own state chain.

Served end to end on the REAL stack (``mergeflow serve`` against the session's Prefect, MLflow
and SeaweedFS S3), over the digits MLP suite of ``test_flows``: every checkpoint is folded by
every candidate into that candidate method's own last state, the best on validation becomes
the version, and the version records every candidate's state and validation scores, so the
next fold continues each chain; a fold after a rejected one continues every chain from the
last accepted version. Data-informed methods (statistics, a learned objective) run as
candidates in-process (``backfill_flow``). The records and their rendering have unit tests.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from helpers.cli import start_serve
from test_flows import MlpSuite, build_mlp_suite, lineage_spec, publish, wait_for_version

if TYPE_CHECKING:
    from fixtures_stack import RunningStack
    from helpers.cli import Result

PORTFOLIO = (
    {"method": "opcm"},
    {"method": "task_arithmetic", "params": {"scale": 0.3}},
    {"method": "weight_average"},
)
LABELS = ["opcm", "task_arithmetic-scale0.3", "weight_average"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> MlpSuite:
    return build_mlp_suite(tmp_path_factory.mktemp("mlp-portfolio-suite"))


def _state(uri: str) -> tuple[Any, dict[str, torch.Tensor]]:
    from mergeflow.storage import states
    from mergeflow.storage.schemes import open_store

    m, reader = states.load_state(open_store(uri))
    assert reader is not None
    return m.info, {k: reader.get(k) for k in reader.keys()}


def _refold(suite: MlpSuite, state_uri: str, ck: str, out: Path) -> dict[str, torch.Tensor]:
    """Fold checkpoint ``ck`` into the state at ``state_uri`` by hand (the engine, no pipeline)."""
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.schemes import open_checkpoint, open_store

    base = open_checkpoint(str(suite.base))
    c = open_checkpoint(str(suite.checkpoints[ck]), base=base.reader)
    states.fold_into(
        open_store(state_uri), LocalStore(out), base.reader, c, checkpoint_id=ck, device="cpu"
    )
    return _state(str(out))[1]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit


def _check_chains(v: Any, folded: list[str]) -> dict[str, Any]:
    """Every candidate kept its state (one per method), of its own method, holding ``folded``;
    the version is a candidate's fold (the best on validation when accepted: every candidate
    passes this test's gate) and names its method. Returns them by label."""
    by_label = {c.label: c for c in v.candidates}
    assert list(by_label) == LABELS
    for c in v.candidates:
        info, _ = _state(c.state_uri)
        assert info.method == c.method and [x.id for x in info.checkpoints] == folded
        assert set(c.validation) == {x for x in folded if x in ("t1", "t2", "t3")}
    won = next(c for c in v.candidates if c.state_uri == v.state_uri)
    assert v.method == won.method
    accs = [sum(c.validation.values()) / len(c.validation) for c in v.candidates]
    if v.status == "accepted":
        assert max(accs) == pytest.approx(v.metrics["val/avg"])
    for label, acc in zip(LABELS, accs, strict=True):
        assert v.metrics[f"candidate/{label}/val/avg"] == pytest.approx(acc)
    return by_label


@pytest.mark.services
@pytest.mark.slow
def test_a_portfolio_lineage_keeps_a_state_chain_per_method_end_to_end(
    stack: RunningStack, suite: MlpSuite, cli: Callable[..., Result], tmp_path: Path
) -> None:
    from mergeflow.evaluation.spec import GateSpec
    from mergeflow.flows.maintenance import gc_flow
    from mergeflow.lineage import save_lineage
    from mergeflow.storage.registry import Registry

    tag = uuid.uuid4().hex[:6]
    prefix = f"s3://{stack.bucket}/portfolio-{tag}"
    spec = save_lineage(
        lineage_spec(
            f"folio-{tag}",
            suite,
            prefix,
            method="opcm",
            params={"alpha": 0.5},
            candidates=PORTFOLIO,
            # good folds pass with a margin; the noise checkpoint drops old tasks to chance
            gate=GateSpec(min_acc=0.3, max_drop=0.4),
        )
    )
    model = spec.registered_model
    log = start_serve(stack.stack, f"serve-folio-{tag}", [spec])
    try:
        versions = {}
        for ck in ("t1", "t2", "noise", "t3"):  # one at a time: publication order is fold order
            publish(prefix, suite, ck)
            versions[ck] = wait_for_version(model, ck, log)
    finally:
        stack.stack.stop_process(f"serve-folio-{tag}")
    v1, v2, noisy, v3 = (versions[c] for c in ("t1", "t2", "noise", "t3"))
    assert [v.status for v in (v1, v2, v3)] == ["accepted"] * 3, [v.reason for v in (v1, v2, v3)]
    c1 = _check_chains(v1, ["t1"])
    c2 = _check_chains(v2, ["t1", "t2"])
    assert v2.parent_version == v1.version

    # each candidate folded t2 into its OWN state of version 1, not into the winner's
    ta = "task_arithmetic-scale0.3"
    _same(_state(c2[ta].state_uri)[1], _refold(suite, c1[ta].state_uri, "t2", tmp_path / "ta2"))
    assert _state(c2[ta].state_uri)[0].scale == pytest.approx(0.3)

    # the gate rejects every candidate of the noise fold; it is registered with its states ...
    assert noisy.status == "rejected" and "ACC" in noisy.reason and noisy.model_uri
    assert noisy.parent_version == v2.version
    _check_chains(noisy, ["t1", "t2", "noise"])
    assert Registry().champion(model).version != noisy.version

    # ... and the next fold continues every chain from the last ACCEPTED version (t2's)
    assert v3.parent_version == v2.version and v3.step == 3
    c3 = _check_chains(v3, ["t1", "t2", "t3"])
    for label in LABELS:
        _same(
            _state(c3[label].state_uri)[1],
            _refold(suite, c2[label].state_uri, "t3", tmp_path / f"{label}3"),
        )

    # what MLflow shows: the winning method, every candidate's state URI and scores
    mv = Registry().client.get_model_version(model, v3.version)
    assert mv.tags["mergeflow.method"] == v3.method
    tagged = json.loads(mv.tags["mergeflow.candidates"])
    assert [(c["label"], c["state_uri"]) for c in tagged] == [
        (label, c3[label].state_uri) for label in LABELS
    ]
    assert all(set(c["validation"]) == {"t1", "t2", "t3"} for c in tagged)
    assert "(registered)" in (mv.description or "") and "| candidate | method |" in mv.description
    run = Registry().client.get_run(mv.run_id)
    assert run.data.params[f"candidate.{ta}.method"] == "task_arithmetic"
    assert run.data.params[f"candidate.{ta}.param.scale"] == "0.3"

    r = cli("lineage", "show", spec.name)
    assert r.returncode == 0, r.stderr
    won3 = next(c for c in v3.candidates if c.state_uri == v3.state_uri)
    assert f"version {v3.version} (t3): {won3.label} ({won3.method}) won; opcm* " in r.stdout

    # gc keeps every chain's states (they are referenced by the versions' candidates)
    assert gc_flow(spec.name, dry_run=True) == []


@pytest.mark.services
@pytest.mark.slow
def test_data_informed_methods_fold_as_candidates(stack: RunningStack, suite: MlpSuite) -> None:
    """RegMean and Fisher read statistics, AdaMerging learns from calibration data: each as a
    candidate gets what its method needs; a checkpoint a candidate cannot fold is rejected with
    the candidate's name, and the next one continues every chain from the last accepted version."""
    from mergeflow.errors import StateError
    from mergeflow.evaluation.spec import EvaluationSuite, GateSpec, TaskSpec
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.lineage import CandidateSpec, save_lineage
    from mergeflow.storage.registry import Registry

    tag = uuid.uuid4().hex[:6]
    tasks = tuple(
        TaskSpec(
            name=t,
            checkpoint=t,
            data=(
                {s: suite.data[t].replace("{split}", s) for s in ("validation", "test")}
                if t == "t2"  # no calibration split
                else suite.data[t]
            ),
        )
        for t in ("t1", "t2", "t3")
    )
    spec = save_lineage(
        lineage_spec(
            f"folio-data-{tag}",
            suite,
            str(suite.root / f"lin-{tag}"),
            sources=(str(suite.root / "checkpoints"),),
            evaluation=EvaluationSuite(tasks=tasks),
            gate=GateSpec(),
            schedule="0 0 1 1 *",
            candidates=(
                {"name": "ta"},
                {"name": "rm", "method": "regmean"},
                {"name": "fi", "method": "fisher"},
                {"name": "ada", "method": "adamerging", "params": {"steps": 5, "batch_size": 16}},
            ),
        )
    )
    outs = backfill_flow(spec.name, [str(suite.checkpoints[c]) for c in ("t1", "t2", "t3")])
    assert [o.status for o in outs] == ["accepted", "rejected", "accepted"], outs
    assert "candidate rm (regmean):" in outs[1].reason and "has no calibration" in outs[1].reason
    v1, v2, v3 = Registry().versions(spec.registered_model)
    assert v2.candidates == [] and v3.parent_version == v1.version
    chains = {c.label: c for c in v3.candidates}
    assert [chains[x].method for x in ("ta", "rm", "fi", "ada")] == [
        "task_arithmetic",
        "regmean",
        "fisher",
        "adamerging",
    ]
    for c in v3.candidates:
        info, tensors = _state(c.state_uri)
        assert [x.id for x in info.checkpoints] == ["t1", "t3"] and info.method == c.method
        assert c.validation and all(0.0 <= s <= 1.0 for s in c.validation.values())
    assert "layers.0.weight:A" in _state(chains["rm"].state_uri)[1]  # RegMean's slots
    assert v3.metrics["stats_seconds"] >= 0.0

    # a method added to the portfolio later has no state chain: folds are refused, nothing moves
    more = spec.candidates + (CandidateSpec(method="magmax"),)
    save_lineage(spec.model_copy(update={"candidates": more}), replace=True)
    with pytest.raises(StateError, match="kept no state for candidate method.s. magmax"):
        backfill_flow(spec.name, [str(suite.checkpoints["t4"])])
    assert Registry().versions(spec.registered_model) == [v1, v2, v3]


@pytest.mark.services
def test_a_bad_portfolio_is_refused_at_the_spec_and_changes_nothing(
    stack: RunningStack, suite: MlpSuite, cli: Callable[..., Result], tmp_path: Path
) -> None:
    import yaml

    from mergeflow.lineage import find_lineage
    from mergeflow.storage.schemes import open_store

    tag = uuid.uuid4().hex[:6]
    spec = lineage_spec(f"folio-bad-{tag}", suite, str(tmp_path / "lin"), candidates=PORTFOLIO)
    good = tmp_path / "good.yaml"
    good.write_text(spec.to_yaml())
    bad = {
        "[{method: nope}]": "candidate nope: unknown method 'nope'",
        "[{method: batch_dare}]": "candidate batch_dare: method 'batch_dare' is a batch method",
        "[{method: weight_average, params: {scale: 2}}]": (
            "candidate weight_average-scale2: invalid parameters for method 'weight_average'"
        ),
        "[{method: opcm}, {method: opcm}]": "candidate names must be unique",
    }

    def attempt(candidates: str, *flags: str) -> None:
        doc = {**yaml.safe_load(good.read_text()), "candidates": yaml.safe_load(candidates)}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(doc))
        r = cli("lineage", "create", path, *flags)
        assert r.returncode == 2 and bad[candidates] in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""

    for candidates in bad:  # a new lineage: nothing is created
        attempt(candidates)
        assert find_lineage(spec.name) is None and not (tmp_path / "lin").exists()
    r = cli("lineage", "create", good)
    assert r.returncode == 0, r.stderr
    stored = open_store(spec.store).read_bytes("lineage.yaml")
    for candidates in bad:  # an existing one: --replace leaves it as it was
        attempt(candidates, "--replace")
        assert find_lineage(spec.name) == spec
        assert open_store(spec.store).read_bytes("lineage.yaml") == stored


# ----------------------------------------------------------------------------- unit
def test_a_version_records_every_candidate_and_reads_them_back() -> None:
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    from mergeflow.cli.tables import format_candidates
    from mergeflow.storage.registry import CandidateRecord, FoldRecord
    from mergeflow.storage.registry.records import run_params, version_from_mlflow, version_tags
    from mergeflow.storage.registry.render import describe

    cands = [
        CandidateRecord(label="opcm", method="opcm", state_uri="s3://b/s/1-a/state"),
        CandidateRecord(
            label="ta",
            method="task_arithmetic",
            params={"scale": 0.3},
            state_uri="s3://b/s/1-b/state",
            validation={"t1": 0.9, "t2": 0.7},
        ),
        CandidateRecord(label="ta5", method="task_arithmetic", params={"scale": 0.5}),
    ]
    rec = FoldRecord(
        lineage="l",
        registered_model="l",
        step=1,
        checkpoint_id="t1",
        checkpoint_uri="s3://b/t1",
        checkpoint_digest="sha256:x",
        parent_version=None,
        method="task_arithmetic",
        params={"scale": 0.3},
        base_uri="s3://b/base",
        state_uri="s3://b/s/1-b/state",
        model_uri="s3://b/s/1-b/model",
        status="accepted",
        candidates=cands,
    )
    tags = version_tags(rec, "m-1")
    assert tags["mergeflow.method"] == "task_arithmetic"
    mv = ModelVersion("l", "1", 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])
    v = version_from_mlflow(mv, {})
    assert v.candidates == cands
    assert v.chains() == {"opcm": "s3://b/s/1-a/state", "task_arithmetic": "s3://b/s/1-b/state"}
    plain = FoldRecord(**{**rec.model_dump(), "candidates": []})
    assert "mergeflow.candidates" not in version_tags(plain, "m-1")  # only with candidates
    plain_v = version_from_mlflow(
        ModelVersion(
            "l", "1", 0, tags=[ModelVersionTag(k, x) for k, x in version_tags(plain, "m").items()]
        ),
        {},
    )
    assert plain_v.chains() == {"task_arithmetic": "s3://b/s/1-b/state"}
    params = run_params(rec)
    assert params["candidate.ta.method"] == "task_arithmetic"
    assert params["candidate.ta5.param.scale"] == "0.5"
    text = describe(rec)
    assert (
        "| **ta** (registered) | `task_arithmetic` (scale=0.3) | 0.8000 | `s3://b/s/1-b/state` |"
        in text
    )
    assert "| ta5 | `task_arithmetic` (scale=0.5) | - | `discarded` |" in text
    assert format_candidates([v]) == (
        "\ncandidates (val/avg; * = state kept for the next fold):\n"
        "version 1 (t1): ta (task_arithmetic) won; opcm* -, ta* 0.8000, ta5 -\n"
    )
    assert format_candidates([plain_v]) == ""
    big = [
        c.model_copy(update={"validation": {f"task{i}": 0.5 for i in range(400)}}) for c in cands
    ]
    long = version_tags(rec.model_copy(update={"candidates": big}), "m")["mergeflow.candidates"]
    assert len(long) <= 8000 and [c["state_uri"] for c in json.loads(long)] == [
        c.state_uri for c in cands
    ]
