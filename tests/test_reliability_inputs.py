"""Hostile and broken checkpoints: refused quickly, with one clear reason, harmlessly.

Every case goes through what a fold runs before it commits (``identify``, ``validate``,
``screen``: headers, files, config; then the fold, which refuses a task vector too large for
the base from the norms it sums while reading) and must raise a ``CheckpointError`` naming
the checkpoint with the expected reason, leave nothing under the fold's prefix, within
:data:`TIME_LIMIT_S` and without
allocating more than :data:`ALLOC_LIMIT` (Python allocations, tracemalloc). Pickle and
remote-code cases also prove no code ran. The cases are the CLI's own list
(``tests/test_cli.py``) plus: duplicate tensor names, reversed and overlapping offsets,
absurd declared sizes (10^12 elements, a million tensors, 100 dimensions, a 5000-digit
integer, nesting 100 000 deep), shard indexes pointing outside the folder (absolute,
``..``, not safetensors, listed twice), FIFOs, devices and links out of the folder, another
architecture, the same shapes from another base, custom model code, malicious pickles,
broken LoRA adapters.

The services tests run the same cases through a real lineage (Prefect, MLflow, S3): from
a local folder and an S3 prefix each is recorded as a rejected version with its reason, the
merged state is untouched, and the lineage keeps folding the next good checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.models import finetune, tiny_state
from safetensors.torch import save_file

from mergeflow.errors import CheckpointError
from mergeflow.merging import engine
from mergeflow.storage import states
from mergeflow.storage.schemes import open_checkpoint
from mergeflow.tasks import layout
from mergeflow.tasks.fold import fold_checkpoint, validate_checkpoint
from mergeflow.tasks.guard import identify_checkpoint, screen_checkpoint
from mergeflow.tasks.lineage import ensure_init_state
from mergeflow.tasks.values import CheckpointRef, ParentState

TIME_LIMIT_S = 5.0
ALLOC_LIMIT = 256 * 2**20
MARKER_ENV = "MERGEFLOW_TEST_MARKER"


def _raw(path: Path, header: Any, data: bytes = b"") -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def _entry(offsets: list[int], shape: list[int], dtype: str = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


class Evil:
    """A pickle payload that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _folder(root: Path, name: str, files: dict[str, bytes | dict[str, torch.Tensor]]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for fname, content in files.items():
        if isinstance(content, dict):
            save_file(content, str(d / fname))
        else:
            (d / fname).write_bytes(content)
    return d


# name -> (build(root, marker) -> path, expected reason)
Builder = Callable[[Path, Path], Path]


def _cases() -> dict[str, tuple[Builder, str]]:
    good = finetune(tiny_state(0), 1)
    k = "layers.0.fc.weight"

    def million(root: Path, _: Path) -> Path:
        one = b'"t%d":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
        body = b",".join(one % i for i in range(1_000_001))
        return _raw(root / "million.safetensors", b"{" + body + b"}", b"\0" * 4)

    def fifo(root: Path, _: Path) -> Path:
        d = root / "fifo"
        d.mkdir()
        os.mkfifo(d / "model.safetensors")
        return d

    def fifo_file(root: Path, _: Path) -> Path:
        p = root / "pipe.safetensors"
        os.mkfifo(p)
        return p

    def device(root: Path, _: Path) -> Path:
        d = root / "device"
        d.mkdir()
        (d / "model.safetensors").symlink_to("/dev/zero")
        return d

    def outside(root: Path, _: Path) -> Path:
        secret = root.parent / "secret.safetensors"
        save_file(good, str(secret))
        d = root / "outside"
        d.mkdir()
        (d / "model.safetensors").symlink_to(secret)
        return d

    def index(wm: dict[str, str] | bytes) -> Builder:
        def build(root: Path, _: Path) -> Path:
            raw = wm if isinstance(wm, bytes) else json.dumps({"weight_map": wm}).encode()
            d = _folder(
                root, f"index-{uuid.uuid4().hex[:6]}", {"model.safetensors.index.json": raw}
            )
            save_file(good, str(d / "model-00001-of-00001.safetensors"))
            return d

        return build

    def remote_code(root: Path, marker: Path) -> Path:
        cfg = {
            "model_type": "toy",
            "auto_map": {"AutoModel": "modeling_evil.EvilModel"},
            "architectures": ["EvilModel"],
        }
        d = _folder(
            root, "remote", {"config.json": json.dumps(cfg).encode(), "model.safetensors": good}
        )
        (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        return d

    def other_arch(root: Path, _: Path) -> Path:
        cfg = json.dumps({"model_type": "gpt2"}).encode()
        return _folder(root, "otherarch", {"config.json": cfg, "model.safetensors": good})

    def other_base(root: Path, _: Path) -> Path:
        p = root / "otherbase.safetensors"
        save_file(finetune(tiny_state(7), 1), str(p))  # same shapes, another random base
        return p

    def evil_pickle(root: Path, marker: Path) -> Path:
        d = root / "evilpickle"
        d.mkdir()
        (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil(marker)}))
        return d

    def lora(
        cfg: dict[str, Any] | bytes, a: tuple[int, int] = (2, 8), b: tuple[int, int] = (12, 2)
    ) -> Builder:
        def build(root: Path, _: Path) -> Path:
            raw = cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode()
            return _folder(
                root,
                f"lora-{uuid.uuid4().hex[:6]}",
                {
                    "adapter_config.json": raw,
                    "adapter_model.safetensors": {
                        f"base_model.model.{k[:-7]}.lora_A.weight": torch.randn(*a),
                        f"base_model.model.{k[:-7]}.lora_B.weight": torch.randn(*b),
                    },
                },
            )

        return build

    def lora_replacement(root: Path, _: Path) -> Path:
        cfg = json.dumps({"r": 2, "lora_alpha": 8}).encode()
        bias = {"base_model.model.layers.0.fc.bias": torch.randn(1)}  # broadcasts if unchecked
        return _folder(
            root, "lora-bias", {"adapter_config.json": cfg, "adapter_model.safetensors": bias}
        )

    def raw(name: str, header: Any, data: bytes = b"") -> Builder:
        return lambda root, _: _raw(root / name, header, data)

    return {
        "duplicate-names": (
            raw(
                "dup.safetensors",
                b'{"a":'
                + json.dumps(_entry([0, 4], [1])).encode()
                + b',"a":'
                + json.dumps(_entry([4, 8], [1])).encode()
                + b"}",
                b"\0" * 8,
            ),
            "declares 'a' more than once",
        ),
        "reversed-offsets": (
            raw("rev.safetensors", {"a": _entry([8, 0], [2])}, b"\0" * 8),
            "bad data_offsets [8, 0]",
        ),
        "overlapping-offsets": (
            raw(
                "ovl.safetensors", {"a": _entry([0, 8], [2]), "b": _entry([4, 12], [2])}, b"\0" * 12
            ),
            "byte ranges overlap",
        ),
        "10^12-elements": (
            raw("huge.safetensors", {k: _entry([0, 4 * 10**12], [10**6, 10**6])}, b"\0" * 16),
            "ends at byte 4000000000000",
        ),
        "a-million-tensors": (million, "declares 1000001 tensors, more than the 262144"),
        "100-dimensions": (
            raw("dims.safetensors", {"a": _entry([0, 4], [1] * 100)}, b"\0" * 4),
            "is not a list of non-negative integers",
        ),
        "5000-digit-integer": (
            raw(
                "digits.safetensors",
                b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}',
                b"\0" * 4,
            ),
            "header is not valid JSON",
        ),
        "nested-100000-deep": (
            raw("deep.safetensors", b"[" * 100_000 + b"]" * 100_000),
            "header is not valid JSON",
        ),
        "index-absolute-path": (index({k: "/etc/passwd"}), "outside the checkpoint folder"),
        "index-dotdot": (index({k: "../secret.safetensors"}), "outside the checkpoint folder"),
        "index-backslash": (index({k: "..\\secret.safetensors"}), "outside the checkpoint folder"),
        "index-not-safetensors": (index({k: "config.json"}), "not a .safetensors file"),
        "index-duplicate-key": (
            index(
                b'{"weight_map": {"a": "model-00001-of-00001.safetensors", "a": "model-00001-of-00001.safetensors"}}'
            ),
            "lists 'a' more than once",
        ),
        "fifo-in-folder": (fifo, "model.safetensors is not a regular file"),
        "fifo-as-file": (fifo_file, "not a regular file or folder"),
        "link-to-device": (device, "model.safetensors is not a regular file"),
        "link-out-of-folder": (outside, "outside the checkpoint folder"),
        "other-architecture": (other_arch, "declares model_type 'gpt2' but the base is 'toy'"),
        "other-base-same-shapes": (other_base, "above max_task_vector_ratio 1"),
        "needs-remote-code": (remote_code, "needs custom model code (auto_map"),
        "pickle-refused": (evil_pickle, "only pickle weights found (pytorch_model.bin)"),
        "lora-rank-zero": (lora({"r": 0, "lora_alpha": 8}), "positive integer 'r'"),
        "lora-alpha-nan": (lora(b'{"r": 2, "lora_alpha": NaN}'), "finite number 'lora_alpha'"),
        "lora-pair-mismatch": (lora({"r": 2, "lora_alpha": 8}, a=(3, 8)), "are not a rank-r pair"),
        "lora-wrong-shape": (
            lora({"r": 2, "lora_alpha": 8}, a=(2, 7)),
            "has shape [12, 7] but the base has [12, 8]",
        ),
        "lora-replacement-shape": (lora_replacement, "replaces 'layers.0.fc.bias' with shape [1]"),
        "lora-pattern-junk": (
            lora({"r": 2, "lora_alpha": 8, "alpha_pattern": ["x"]}),
            "alpha_pattern must map",
        ),
    }


def _cli_cases() -> dict[str, tuple[Builder, str]]:
    """The CLI's list of malformed inputs (tests/test_cli.py), as the pipeline sees them."""
    from test_cli import BAD, _bad

    out: dict[str, tuple[Builder, str]] = {}
    for name, reason in BAD.items():
        if name == "missing.safetensors":
            continue  # nothing to publish
        out[f"cli-{name}"] = ((lambda root, _, n=name: _bad(root, n)), reason)
    return out


CASES = {**_cli_cases(), **_cases()}


def make_base(root: Path) -> Path:
    """The base of every case: the tiny model with a config.json (model_type ``toy``)."""
    return _folder(
        root, "base", {"config.json": b'{"model_type": "toy"}', "model.safetensors": tiny_state(0)}
    )


def _spec(base: Path, root: Path, **kw: Any) -> Any:
    from mergeflow.lineage import LineageSpec

    return LineageSpec(
        name="hostile", base=str(base), sources=(str(root),), store=str(root / "lineage"), **kw
    )


def screen(spec: Any, uri: str) -> str:
    """What a fold runs before it commits, without Prefect (the tasks' functions); returns the
    committed state's URI. A refused checkpoint must leave nothing under the fold's prefix."""
    ck = identify_checkpoint.fn(CheckpointRef(id=uri.rsplit("/", 1)[-1], uri=uri))
    assert ck.digest
    ck = validate_checkpoint.fn(spec, ck)
    screen_checkpoint.fn(spec, ck)
    parent = ParentState(version=None, state_uri=ensure_init_state(spec), step=0)
    prefix = layout.new_prefix(spec, 1)
    try:
        return fold_checkpoint.fn(spec, parent, ck, "main", parent.params, prefix).state_uri
    except CheckpointError:
        assert not layout.store(prefix).list(), "a refused fold left files under its prefix"
        raise


def ratio_of(base: Path, checkpoint: Path) -> float:
    """‖τ‖/‖θ₀‖ over the merged tensors, summed in float64 from the files (the reference)."""
    b, c = open_checkpoint(str(base)).reader, open_checkpoint(str(checkpoint)).reader
    keys = engine.merged_keys(b)
    tau = sum(float((c.get(k).double() - b.get(k).double()).square().sum()) for k in keys)
    return (tau / sum(float(b.get(k).double().square().sum()) for k in keys)) ** 0.5


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_checkpoint_is_refused_quickly_with_its_reason(case: str, tmp_path: Path) -> None:
    build, reason = CASES[case]
    marker = tmp_path / "code-ran"
    base = make_base(tmp_path)
    pub = tmp_path / "pub"
    pub.mkdir()
    path = build(pub, marker)
    spec = _spec(base, pub)
    ensure_init_state(spec)  # the step-0 state (it imports transformers once) is not timed
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as err:
            screen(spec, str(path))
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {path}") and reason in msg, msg
    assert elapsed < TIME_LIMIT_S, f"{case}: {elapsed:.1f} s"
    assert peak < ALLOC_LIMIT, f"{case}: {peak / 2**20:.0f} MiB allocated"
    assert not marker.exists(), f"{case}: the checkpoint's code ran"


def test_allowed_pickle_still_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    base = make_base(tmp_path)
    pub = tmp_path / "pub"
    pub.mkdir()
    path = CASES["pickle-refused"][0](pub, marker)
    with pytest.raises(CheckpointError, match="cannot load pickle weights with weights_only=True"):
        screen(_spec(base, pub, allow_pickle=True), str(path))
    assert not marker.exists()


def test_a_real_fine_tune_passes_and_its_ratio_is_small(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    pub = tmp_path / "pub"
    ck = _folder(
        pub,
        "ok",
        {"config.json": b'{"model_type": "toy"}', "model.safetensors": finetune(tiny_state(0), 1)},
    )
    assert 0 < ratio_of(base, ck) < 0.2
    assert states.has_state(layout.store(screen(_spec(base, pub), str(ck))))
    other = CASES["other-base-same-shapes"][0](pub, tmp_path / "m")
    ratio = ratio_of(base, other)
    assert ratio > 1.0
    # the fold's own float32 sums give the float64 ratio, and the refusal says it
    with pytest.raises(CheckpointError, match=f"is {ratio:.3g}x the base's norm"):
        screen(_spec(base, pub, max_task_vector_ratio=0.99 * ratio), str(other))
    screen(_spec(base, pub, max_task_vector_ratio=1.01 * ratio), str(other))
    # the check is configurable: null disables it (and its base norms)
    screen(_spec(base, pub, max_task_vector_ratio=None), str(other))


def test_a_dask_fold_refuses_another_base_before_it_commits(tmp_path: Path) -> None:
    """The Dask path sums ‖θ₀‖² per group and refuses in ``commit_groups``: no state is
    committed (the flow then discards the prefix's uncommitted parts) and the parent is as it was."""
    from mergeflow.lineage import DaskSpec
    from mergeflow.tasks.dask import commit_groups, fold_group, plan_groups

    base = make_base(tmp_path)
    pub = tmp_path / "pub"
    pub.mkdir()
    other = CASES["other-base-same-shapes"][0](pub, tmp_path / "m")
    ratio = ratio_of(base, other)
    spec = _spec(base, pub, max_task_vector_ratio=1.0, dask=DaskSpec(groups=2))
    parent = ParentState(version=None, state_uri=ensure_init_state(spec), step=0)
    before = states.read_manifest(layout.store(parent.state_uri))
    ck = validate_checkpoint.fn(spec, identify_checkpoint.fn(CheckpointRef(id="o", uri=str(other))))
    prefix = layout.new_prefix(spec, 1)
    plan = plan_groups.fn(spec, parent, ck, parent.params, prefix)
    results = [fold_group.fn(spec, ck, plan, i) for i in range(len(plan.groups))]
    assert len(results) == 2
    with pytest.raises(CheckpointError, match=f"is {ratio:.3g}x the base's norm.*ratio 1:"):
        commit_groups.fn(spec, ck, plan, results, "main", prefix)
    assert not states.has_state(layout.store(layout.state_uri_of(prefix)))
    assert states.read_manifest(layout.store(parent.state_uri)) == before


# ----------------------------------------------------------------------------- services
CI_CASES = (
    "cli-badjson.safetensors",
    "cli-truncated.safetensors",
    "duplicate-names",
    "index-dotdot",
    "other-base-same-shapes",
    "needs-remote-code",
    "cli-nan.safetensors",
)


def _upload(local: Path, store: Any) -> None:
    """Copy the regular files under ``local`` to an S3 store (links and FIFOs have no S3 form)."""
    for p in sorted(local.rglob("*")):
        if p.is_file() and not p.is_symlink():
            store.put_file(p, p.relative_to(local).as_posix())


def _publish_good(pub: Path, name: str, seed: int) -> Path:
    d = _folder(
        pub,
        name,
        {
            "config.json": b'{"model_type": "toy"}',
            "model.safetensors": finetune(tiny_state(0), seed),
        },
    )
    later = time.time() + 5 + seed
    os.utime(d / "model.safetensors", (later, later))
    return d


def hostile_through_a_lineage(
    source: str, cases: tuple[str, ...], stack: Any, tmp_path: Path
) -> dict[str, Any]:
    """Publish ``cases`` then a good checkpoint to a watched source; fold; check the lineage."""
    from mergeflow.flows.fold import fold_flow
    from mergeflow.lineage import LineageSpec, save_lineage
    from mergeflow.storage import states
    from mergeflow.storage.registry import Registry
    from mergeflow.storage.schemes import open_source, open_store

    marker = tmp_path / "code-ran"
    base = make_base(tmp_path)
    local = tmp_path / "pub"
    local.mkdir()
    built = {case: CASES[case][0](local, marker).name for case in cases}
    tag = uuid.uuid4().hex[:6]
    uri = str(local)
    if source == "s3":
        uri = f"s3://{stack.bucket}/hostile-{tag}"
        _upload(local, open_store(uri))
        time.sleep(1.1)  # S3 LastModified has one-second resolution: the good one comes later
    spec = save_lineage(
        LineageSpec(
            name=f"hostile-{source}-{tag}",
            base=str(base),
            method="task_arithmetic",
            sources=(uri,),
            store=str(tmp_path / "lineage"),
            device="cpu",
        )
    )
    for i, name in enumerate(("zz-good-1", "zz-good-2")):
        good = _publish_good(tmp_path / "good", name, i + 1)
        if source == "s3":
            _upload(good.parent, open_store(uri))
        else:
            os.replace(good, local / name)
        if i == 0:
            offered = {c.id for c in open_source(uri).list()}
            t0 = time.monotonic()
            fold_flow(spec.name, checkpoint_id=name)
            elapsed = time.monotonic() - t0
        else:
            fold_flow(spec.name, checkpoint_id=name)
    versions = {v.checkpoint_id: v for v in Registry().versions(spec.registered_model)}
    rejected = 0
    for case, ck_id in built.items():
        if ck_id not in offered:
            assert ck_id not in versions  # never offered (a FIFO, a top-level .bin): harmless
            continue
        v = versions[ck_id]
        assert v.status == "rejected" and CASES[case][1] in v.reason, (case, v.reason)
        assert v.model_uri == "" and "champion" not in v.aliases
        rejected += 1
    g1, g2 = versions["zz-good-1"], versions["zz-good-2"]
    assert g1.status == "accepted" and g1.parent_version is None and g1.step == 1
    assert g2.status == "accepted" and g2.parent_version == g1.version and g2.step == 2
    info = states.read_manifest(open_store(g2.state_uri)).info
    assert [c.id for c in info.checkpoints] == ["zz-good-1", "zz-good-2"]  # state untouched
    assert not marker.exists()
    return {"rejected": rejected, "not_offered": len(built) - rejected, "seconds": elapsed}


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.parametrize("source", ["local", "s3"])
def test_hostile_checkpoints_become_rejected_versions_and_the_lineage_goes_on(
    source: str, stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGEFLOW_SOURCE_SETTLE_SECONDS", "0")
    r = hostile_through_a_lineage(source, CI_CASES, stack, tmp_path)
    assert r["rejected"] == len(CI_CASES)
    print(f"RELIABILITY hostile via {source}: {r['rejected']} rejected in {r['seconds']:.1f} s")


@pytest.mark.reliability
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("source", ["local", "s3"])
def test_every_hostile_case_through_a_lineage(
    source: str, stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGEFLOW_SOURCE_SETTLE_SECONDS", "0")
    cases = tuple(
        c
        for c in sorted(CASES)
        if not (
            source == "s3"
            and c in ("fifo-in-folder", "fifo-as-file", "link-to-device", "link-out-of-folder")
        )
    )
    r = hostile_through_a_lineage(source, cases, stack, tmp_path)
    print(
        f"RELIABILITY hostile via {source}: {len(cases)} cases, {r['rejected']} offered and "
        f"recorded as rejected versions, {r['not_offered']} never offered (harmless), "
        f"{r['seconds']:.1f} s"
    )


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Hub stand-in (tests/helpers/hub_standin.py) behind the real huggingface_hub client."""
    from helpers.hub_standin import HubStandIn
    from huggingface_hub import constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStandIn(tmp_path / "hub") as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        yield standin


def _lineage(tmp_path: Path, source: str, tag: str) -> Any:
    from mergeflow.lineage import LineageSpec, save_lineage

    return save_lineage(
        LineageSpec(
            name=f"hostile-{tag}-{uuid.uuid4().hex[:6]}",
            base=str(make_base(tmp_path)),
            method="task_arithmetic",
            sources=(source,),
            store=str(tmp_path / "lineage"),
            device="cpu",
        )
    )


def _bytes_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.services
@pytest.mark.slow
def test_hostile_commits_on_the_hub_become_rejected_versions(
    stack: Any, hub: Any, tmp_path: Path
) -> None:
    from mergeflow.flows.fold import fold_flow
    from mergeflow.storage.registry import Registry
    from mergeflow.storage.schemes import open_source

    marker = tmp_path / "code-ran"
    pub = tmp_path / "pub"
    pub.mkdir()
    hub.create_repo("org/ft")
    commits = {}
    for case in ("duplicate-names", "needs-remote-code", "other-base-same-shapes"):
        built = CASES[case][0](pub, marker)
        files = _bytes_of(built) if built.is_dir() else {"model.safetensors": built.read_bytes()}
        commits[
            hub.commit(
                "org/ft",
                files,
                case,
                delete=("model.safetensors", "config.json", "modeling_evil.py"),
            )
        ] = case
    # other weights than the remote-code case's: the Hub digest covers weight files only
    good = _folder(tmp_path / "good", "g", {"model.safetensors": finetune(tiny_state(0), 2)})
    last = hub.commit("org/ft", _bytes_of(good), "good", delete=("config.json", "modeling_evil.py"))
    spec = _lineage(tmp_path, "hf://org/ft", "hub")
    listed = open_source("hf://org/ft").list()
    assert len(listed) == 4
    fold_flow(spec.name, checkpoint_id=listed[-1].id)
    versions = Registry().versions(spec.registered_model)
    by_sha = {v.checkpoint_id.rsplit("@", 1)[1]: v for v in versions}
    for sha, case in commits.items():
        v = by_sha[sha]
        assert v.status == "rejected" and CASES[case][1] in v.reason, (case, v.reason)
    assert by_sha[last].status == "accepted" and by_sha[last].parent_version is None
    assert not marker.exists()


@pytest.mark.services
@pytest.mark.slow
def test_hostile_upstream_mlflow_versions_become_rejected_versions(
    stack: Any, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from mergeflow.flows.fold import fold_flow
    from mergeflow.storage.registry import Registry
    from mergeflow.storage.schemes import open_source, open_store

    pub = tmp_path / "pub"
    pub.mkdir()
    upstream = f"upstream-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    client.create_registered_model(upstream)
    cases = ("duplicate-names", "index-dotdot", "needs-remote-code")
    root = f"s3://{stack.bucket}/upstream-{uuid.uuid4().hex[:6]}"
    for case in cases:  # MLflow takes remote sources only: the weights sit on S3
        built = CASES[case][0](pub, tmp_path / "m")
        store = open_store(f"{root}/{built.name}")
        if built.is_dir():
            _upload(built, store)
            client.create_model_version(upstream, source=store.uri)
        else:
            open_store(root).put_file(built, built.name)
            client.create_model_version(upstream, source=f"{root}/{built.name}")
    good = _folder(tmp_path / "good", "g", {"model.safetensors": finetune(tiny_state(0), 2)})
    _upload(good, open_store(f"{root}/good"))
    client.create_model_version(upstream, source=f"{root}/good")
    spec = _lineage(tmp_path, f"mlflow://models/{upstream}", "mlflow")
    listed = open_source(spec.sources[0]).list()
    fold_flow(spec.name, checkpoint_id=listed[-1].id)
    versions = {v.checkpoint_id: v for v in Registry().versions(spec.registered_model)}
    for i, case in enumerate(cases, 1):
        v = versions[f"{upstream}-v{i}"]
        assert v.status == "rejected" and CASES[case][1] in v.reason, (case, v.reason)
    g = versions[f"{upstream}-v{len(cases) + 1}"]
    assert g.status == "accepted" and g.parent_version is None
