"""Export and publish what a lineage made: an HF folder with its model card, on disk and on the Hub.

A lineage folds the tiny digits ViT suite (``mergeflow.examples.digits``, 3 tasks) on the
session stack, in-process, with its base on the Hub stand-in (``hf://org/digits-base``, a
card with a license) so the card can name ``base_model`` and the license. One checkpoint is
rejected at validation and the last one dropped, so the card lists both. ``publish`` goes
through the real ``huggingface_hub`` client to the stand-in's write API (LFS protocol:
``HF_HUB_DISABLE_XET=1``), and what it published loads with ``transformers.AutoModel``.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import yaml
from helpers.hub_standin import HubStandIn
from huggingface_hub import constants as hf_constants

if TYPE_CHECKING:
    from fixtures_stack import RunningStack
    from helpers.cli import Result

TOKEN = "hf_publish_test_token"
BASE_CARD = "---\nlicense: apache-2.0\ntags: [vision]\n---\n# digits base\n"


@dataclass(frozen=True)
class Made:
    name: str
    hub: HubStandIn
    versions: dict[str, Any]
    """Checkpoint id -> its version (after the drop)."""
    root: Path


@pytest.fixture(scope="module")
def made(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    from mergeflow.evaluation.spec import GateSpec
    from mergeflow.examples.digits import build_digits_suite
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.flows.replay import replay_flow
    from mergeflow.lineage import LineageSpec, save_lineage
    from mergeflow.storage.registry import Registry

    root = tmp_path_factory.mktemp("publish")
    suite = build_digits_suite(root / "suite", n_tasks=3, pretrain_epochs=2, finetune_epochs=1)
    bad = root / "suite" / "checkpoints" / "00-bad"
    shutil.copytree(suite.checkpoints[0], bad)
    from safetensors.torch import load_file, save_file

    ts = load_file(str(bad / "model.safetensors"))
    key = next(k for k, v in ts.items() if v.dim() == 2 and not k.startswith("classifier"))
    ts[key] = ts[key][:, :-1].contiguous()
    save_file(ts, str(bad / "model.safetensors"))

    with pytest.MonkeyPatch.context() as mp, HubStandIn(root / "hub") as hub:
        mp.setenv("HF_ENDPOINT", hub.endpoint)
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.setenv("HF_TOKEN", TOKEN)
        mp.setenv("HF_HUB_DISABLE_XET", "1")  # the stand-in speaks LFS, not Xet
        mp.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # read once at import
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        hub.write_token = TOKEN
        hub.create_repo("org/digits-base")
        hub.upload_folder("org/digits-base", suite.base)
        hub.commit("org/digits-base", {"README.md": BASE_CARD.encode()}, "card")

        name = f"pub-{uuid.uuid4().hex[:6]}"
        spec = save_lineage(
            LineageSpec(
                name=name,
                base="hf://org/digits-base",
                method="opcm",
                sources=(str(root / "suite" / "checkpoints"),),
                evaluation=suite.evaluation_suite(),
                gate=GateSpec(),
                store=str(root / "lineage"),
                device="cpu",
                schedule="0 0 1 1 *",
            )
        )
        uris = [str(suite.checkpoints[0]), str(bad), *map(str, suite.checkpoints[1:])]
        outs = backfill_flow(name, uris)
        assert [o.status for o in outs] == ["accepted", "rejected", "accepted", "accepted"]
        assert replay_flow(name, "03-invert", "label noise found in the invert task") == []
        versions = {v.checkpoint_id: v for v in Registry().versions(spec.registered_model)}
        assert versions["03-invert"].status == "dropped"
        assert "champion" in versions["02-flip_lr"].aliases
        yield Made(name, hub, versions, root)


def _card(folder: Path) -> tuple[dict[str, Any], str]:
    text = (folder / "README.md").read_text()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _loads_as_merged(model: Any, merged: dict[str, torch.Tensor]) -> None:
    """Every merged tensor (``vit.*``: the base has no head) is the loaded ViTModel's."""
    loaded = model.state_dict()
    assert merged and all(name.startswith("vit.") for name in merged)
    for name, tensor in merged.items():
        key = name.removeprefix("vit.")
        assert torch.equal(loaded[key], tensor.to(loaded[key].dtype)), name


@pytest.mark.services
@pytest.mark.slow
def test_export_writes_a_loadable_model_with_its_card(
    made: Made, cli: Callable[..., Result], tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModel

    out = tmp_path / "merged"
    r = cli("export", f"models:/{made.name}@champion", out)
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "mergeflow.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    meta, body = _card(out)
    assert meta == {
        "base_model": "org/digits-base",
        "base_model_relation": "merge",
        "library_name": "transformers",
        "license": "apache-2.0",
        "tags": ["merge", "mergeflow", "opcm"],
    }
    champion = made.versions["02-flip_lr"]
    folded = body.split("## Folded checkpoints, in order")[1].split("##")[0]
    rows = [
        line for line in folded.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")
    ]
    assert [row.split("|")[2].strip(" `") for row in rows] == ["01-rot90", "02-flip_lr"]
    for ck in ("01-rot90", "02-flip_lr"):
        v = made.versions[ck]
        assert f"`{v.checkpoint_digest}`" in folded and f"`{v.checkpoint_uri}`" in folded
    excluded = body.split("## Dropped and rejected checkpoints")[1].split("##")[0]
    assert "| `03-invert` | dropped | label noise found in the invert task |" in excluded
    bad_row = next(line for line in excluded.splitlines() if "`00-bad`" in line)
    assert "| rejected |" in bad_row and "shape" in bad_row
    evaluation = body.split("## Evaluation")[1].split("##")[0]
    for task in ("rot90", "flip_lr"):
        expected = f"| {task} | {champion.metrics[f'val/{task}']:.4f} | {champion.metrics[f'test/{task}']:.4f} |"
        assert expected in evaluation
    assert "invert" not in evaluation
    assert f"`models:/{made.name}/{champion.version}`" in body

    _loads_as_merged(AutoModel.from_pretrained(out), _weights(out))

    # the same card in the version's MLflow artifacts (run and LoggedModel)
    client = MlflowClient()
    text = (out / "README.md").read_text()
    run_card = client.download_artifacts(champion.run_id, "README.md", str(tmp_path / "run"))
    assert Path(run_card).read_text() == text
    location = client.get_logged_model(champion.model_id).artifact_location
    (tmp_path / "logged").mkdir()
    logged = download_artifacts(f"{location}/README.md", dst_path=str(tmp_path / "logged"))
    assert Path(logged).read_text() == text

    # bad input: nothing written, clear messages
    before = sorted(p.name for p in out.iterdir())
    r = cli("export", f"models:/{made.name}@champion", out)
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    for uri, message in (
        (f"models:/{made.name}@nosuch", "has no alias 'nosuch'"),
        (
            f"models:/{made.name}/{made.versions['00-bad'].version}",
            "has no merged weights (rejected",
        ),
        (f"models:/{made.name}/99", "has no version 99"),
    ):
        r = cli("export", uri, tmp_path / "nothing")
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not (tmp_path / "nothing").exists()


@pytest.mark.services
@pytest.mark.slow
def test_publish_uploads_one_commit_that_loads(
    made: Made, cli: Callable[..., Result], tmp_path: Path
) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from transformers import AutoModel

    r = cli("publish", made.name, "--to", "s3://bucket/model")
    assert r.returncode == 2 and "publish to a Hub model repo as hf://org/repo" in r.stderr
    made.hub.write_token = "another-token"
    r = cli("publish", made.name, "--to", "hf://org/refused")
    made.hub.write_token = TOKEN
    assert r.returncode == 2 and "HTTP 401" in r.stderr
    assert "org/refused" not in made.hub.repos

    made.hub.clear_requests()
    r = cli("publish", made.name, "--to", "hf://org/digits-merged")
    assert r.returncode == 0, r.stderr
    repo = made.hub.repos["org/digits-merged"]
    assert [c.title for c in repo.commits][1:] == [
        f"mergeflow: {made.name} version {made.versions['02-flip_lr'].version} (opcm, 2 folds)"
    ]  # one commit after the repo's initial one
    assert {"README.md", "config.json", "model.safetensors", "mergeflow.json"} <= set(
        repo.commits[-1].tree
    )
    puts = [q for q in made.hub.requests if q.method == "PUT" and q.path.startswith("/lfs-upload/")]
    commits = [q for q in made.hub.requests if q.method == "POST" and "/commit/" in q.path]
    assert len(puts) == 1 and [q.authorization for q in commits] == [f"Bearer {TOKEN}"]

    api = HfApi(endpoint=made.hub.endpoint)
    files = [f.rfilename for f in api.model_info("org/digits-merged").siblings or []]
    paths = [
        hf_hub_download("org/digits-merged", f, endpoint=made.hub.endpoint, cache_dir=tmp_path)
        for f in files
    ]
    local = Path(paths[0]).parent  # one snapshot folder, as from_pretrained("org/...") reads it
    meta, _ = _card(local)
    assert meta["base_model"] == "org/digits-base" and meta["base_model_relation"] == "merge"
    assert json.loads((local / "mergeflow.json").read_text())["step"] == 2
    _loads_as_merged(AutoModel.from_pretrained(local), _weights(local))


def test_card_metadata_follows_the_hub_conventions() -> None:
    from mergeflow.storage.card import CardCheckpoint, ModelCard, front_matter, render_card

    card = ModelCard(
        registered_model="m",
        version="3",
        lineage="m",
        base_uri="s3://bucket/base",
        method="ties",
        params={"density": 0.2},
        step=1,
        scale=0.5,
        checkpoints=(CardCheckpoint(step=1, id="a|b", digest="sha256:00", uri="s3://x/a|b"),),
    )
    text = render_card(card)
    # a base off the Hub: no base_model, so no base_model_relation (the Hub requires both)
    assert front_matter(text) == {"tags": ["merge", "mergeflow", "ties"]}
    assert "of `s3://bucket/base`" in text and "| density | `0.2` |" in text
    assert "| 1 | `a\\|b` | `s3://x/a\\|b` | `sha256:00` | inherited |" in text
    assert "No evaluation suite scored this version." in text and "None." in text
    hub = render_card(card.model_copy(update={"base_model": "org/base", "license": "mit"}))
    assert front_matter(hub) == {
        "base_model": "org/base",
        "base_model_relation": "merge",
        "license": "mit",
        "tags": ["merge", "mergeflow", "ties"],
    }
    assert front_matter("no metadata") == {} and front_matter("---\n[1, 2]\n---\n") == {}
