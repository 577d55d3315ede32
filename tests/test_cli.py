"""The `mergeflow` CLI: merge output, resumable state commands, and every bad input refused cleanly."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli
from helpers.models import finetune, tiny_state
from safetensors.torch import load_file, save_file


def listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def test_merge_writes_base_names_and_dtype(model_files, tmp_path):
    base, cks = model_files(3)
    out = tmp_path / "out"
    r = run_cli(
        "merge", "--base", base, "--method", "opcm", "--param", "alpha=0.5", "--out", out, *cks
    )
    assert r.returncode == 0, r.stderr
    merged = load_file(str(out / "model.safetensors"))
    b = load_file(str(base))
    assert list(merged) == list(b) or set(merged) == set(b)
    assert all(merged[k].dtype == b[k].dtype and merged[k].shape == b[k].shape for k in b)
    info = json.loads((out / "mergeflow.json").read_text())
    assert info["step"] == 3 and info["projection"]["kind"] == "name-rules"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mergeflow.projection"])["kind"] == "name-rules"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_merge_shards_output_when_asked(cli, model_files, tmp_path):
    base, cks = model_files(2)
    out = tmp_path / "out"
    r = cli(
        "merge",
        "--base",
        base,
        "--method",
        "task_arithmetic",
        "--max-shard-size",
        "1KB",
        "--out",
        out,
        *cks,
    )
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    merged = {}
    for s in shards:
        merged.update(load_file(str(out / s)))
    assert set(merged) == set(load_file(str(base)))


@pytest.mark.slow  # six `python -m mergeflow` subprocesses (~10 s)
def test_state_resume_is_bit_identical(model_files, tmp_path):
    """Fold 3, save, reload in a new process, fold 3 more == fold all 6 in one go."""
    base, cks = model_files(6, heads=True)
    one = tmp_path / "one"
    assert run_cli("merge", "--base", base, "--method", "opcm", "--out", one, *cks).returncode == 0
    state = tmp_path / "state"
    assert (
        run_cli("state", "init", "--state", state, "--base", base, "--method", "opcm").returncode
        == 0
    )
    r = run_cli("state", "fold", "--state", state, *cks[:3])
    assert r.returncode == 0, r.stderr
    r = run_cli("state", "fold", "--state", state, *cks[3:])
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    r = run_cli("state", "export", "--state", state, "--out", two)
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    shown = json.loads(run_cli("state", "show", "--state", state).stdout)
    assert shown["step"] == 6 and [c["step"] for c in shown["checkpoints"]] == [1, 2, 3, 4, 5, 6]
    assert len(shown["heads"]) == 6  # task heads kept per checkpoint
    assert len(list((state / "tensors").iterdir())) == 1  # old state tensors removed


def test_state_fold_refuses_a_duplicate_and_keeps_the_state(cli, model_files, tmp_path):
    base, cks = model_files(2)
    state = tmp_path / "state"
    cli("state", "init", "--state", state, "--base", base, "--method", "magmax")
    assert cli("state", "fold", "--state", state, cks[0]).returncode == 0
    before = (state / "state.json").read_text()
    copy = tmp_path / "same-content.safetensors"
    copy.write_bytes(cks[0].read_bytes())
    r = cli("state", "fold", "--state", state, copy)
    assert r.returncode == 2 and "already folded as step 1" in r.stderr
    assert (state / "state.json").read_text() == before


def test_methods_and_help_explain_every_option(cli):
    r = cli("methods")
    assert r.returncode == 0
    for name in ("opcm", "task_arithmetic", "weight_average", "magmax", "ties", "batch_dare"):
        assert name in r.stdout
    assert "alpha=<float>  default 0.5" in r.stdout
    h = cli("merge", "--help").stdout
    for opt in (
        "--base",
        "--method",
        "--param",
        "--out",
        "--max-shard-size",
        "--device",
        "--dtype",
        "--allow-pickle",
        "--allow-missing",
        "--project-regex",
        "--compute-dtype",
        "--overwrite",
        "default",
    ):
        assert opt in h, opt


# ---- bad input: exit 2, one clear message naming the checkpoint, no traceback, nothing written ----


def _write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _bad(tmp_path: Path, name: str) -> Path:
    base = tiny_state(0)
    good = finetune(base, 1)
    p = tmp_path / name
    if name == "missing.safetensors":
        return p
    if name == "empty.safetensors":
        p.write_bytes(b"")
    elif name == "truncated.safetensors":
        save_file(good, str(p))
        p.write_bytes(p.read_bytes()[:-100])
    elif name == "tiny.safetensors":
        p.write_bytes(b"\x01\x02")
    elif name == "badjson.safetensors":
        _write_raw(p, b"{not json at all}   ")
    elif name == "notobject.safetensors":
        _write_raw(p, b"[1, 2, 3]")
    elif name == "nonutf8.safetensors":
        _write_raw(p, b"\xff\xfe\xfd{}")
    elif name == "hugeheader.safetensors":
        p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif name == "shape.safetensors":
        good["layers.0.fc.weight"] = torch.randn(12, 9)
        save_file(good, str(p))
    elif name == "lacks.safetensors":
        del good["layers.0.out.weight"]
        save_file(good, str(p))
    elif name == "nan.safetensors":
        good["layers.1.fc.weight"][3, 2] = float("nan")
        save_file(good, str(p))
    elif name == "inf.safetensors":
        good["layers.0.norm.weight"][0] = float("inf")
        save_file(good, str(p))
    elif name == "intdtype.safetensors":
        good["layers.0.fc.bias"] = torch.arange(12)
        save_file(good, str(p))
    elif name == "unrelated.safetensors":
        save_file({"something.else": torch.randn(3)}, str(p))
    elif name == "notensors.safetensors":
        save_file({}, str(p))
    elif name == "baddtype.safetensors":
        _write_raw(
            p,
            json.dumps({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode(),
            b"\0" * 4,
        )
    elif name == "badoffsets.safetensors":
        _write_raw(
            p,
            json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 400]}}).encode(),
            b"\0" * 16,
        )
    elif name == "wrongspan.safetensors":
        _write_raw(
            p,
            json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode(),
            b"\0" * 16,
        )
    elif name == "overlap.safetensors":
        h = {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
        _write_raw(p, json.dumps(h).encode(), b"\0" * 12)
    elif name == "negshape.safetensors":
        _write_raw(
            p, json.dumps({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}).encode()
        )
    elif name == "badmeta.safetensors":
        _write_raw(p, json.dumps({"__metadata__": {"a": 1}}).encode())
    elif name == "noweights":
        p.mkdir()
        (p / "config.json").write_text("{}")
    elif name == "pickleonly":
        p.mkdir()
        torch.save(good, p / "pytorch_model.bin")
    elif name == "model.bin":
        torch.save(good, p)
    elif name == "notes.txt":
        p.write_text("hello")
    elif name == "twofiles":
        p.mkdir()
        save_file(good, str(p / "a.safetensors"))
        save_file(good, str(p / "b.safetensors"))
    elif name == "missingshard":
        p.mkdir()
        (p / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {k: "model-00001-of-00002.safetensors" for k in good}})
        )
    elif name == "badindex":
        p.mkdir()
        (p / "model.safetensors.index.json").write_text("{oops")
    elif name == "adapter-no-weights":
        p.mkdir()
        (p / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    return p


BAD = {
    "missing.safetensors": "path does not exist",
    "empty.safetensors": "file is empty or truncated (0 bytes)",
    "tiny.safetensors": "file is empty or truncated (2 bytes)",
    "truncated.safetensors": "truncated",
    "badjson.safetensors": "header is not valid JSON",
    "notobject.safetensors": "header is not a JSON object",
    "nonutf8.safetensors": "header is not valid JSON",
    "hugeheader.safetensors": "more than the 100 MiB limit",
    "shape.safetensors": "tensor 'layers.0.fc.weight' has shape [12, 9] but the base has [12, 8]",
    "lacks.safetensors": "missing from the checkpoint ('layers.0.out.weight')",
    "nan.safetensors": "tensor 'layers.1.fc.weight' contains NaN or Inf values",
    "inf.safetensors": "tensor 'layers.0.norm.weight' contains NaN or Inf values",
    "intdtype.safetensors": "tensor 'layers.0.fc.bias' has dtype I64 but the base has floating-point F32",
    "unrelated.safetensors": "missing from the checkpoint",
    "notensors.safetensors": "missing from the checkpoint",
    "baddtype.safetensors": "unsupported dtype 'F99'",
    "badoffsets.safetensors": "data_offsets span 400 bytes but F32[4] needs 16",
    "wrongspan.safetensors": "data_offsets span 8 bytes but F32[4] needs 16",
    "overlap.safetensors": "byte ranges overlap",
    "negshape.safetensors": "is not a list of non-negative integers",
    "badmeta.safetensors": "__metadata__ must map strings to strings",
    "noweights": "folder has no weights",
    "pickleonly": "only pickle weights found (pytorch_model.bin); pickle weights are only loaded when allowed",
    "model.bin": "pickle weights are refused; pickle weights are only loaded when allowed",
    "notes.txt": "not a .safetensors file",
    "twofiles": "2 .safetensors files but no model.safetensors.index.json",
    "missingshard": "shard model-00001-of-00002.safetensors listed in model.safetensors.index.json is missing",
    "badindex": "model.safetensors.index.json is not valid JSON",
    "adapter-no-weights": "adapter_config.json but no adapter_model.safetensors",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_checkpoint_is_refused_and_nothing_is_written(cli, model_files, tmp_path, name):
    base, cks = model_files(2)
    bad = _bad(tmp_path, name)
    before = listing(tmp_path)
    out = tmp_path / "out"
    r = cli("merge", "--base", base, "--method", "opcm", "--out", out, cks[0], bad, cks[1])
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("mergeflow: error:")]
    assert len(lines) == 1, r.stderr
    assert f"checkpoint {bad}" in lines[0] and BAD[name] in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert listing(tmp_path) == before  # no OUT, no temp folders


@pytest.mark.parametrize("method", ["batch_task_arithmetic", "batch_ties", "batch_dare"])
@pytest.mark.parametrize("name", ["nan.safetensors", "inf.safetensors"])
def test_batch_merges_refuse_nan_and_inf_and_write_nothing(
    cli, model_files, tmp_path, name, method
):
    """The batch path checks finiteness with one read-only reduction per task vector; a
    method that drops or trims entries (TIES, DARE) must still never hide a NaN or Inf."""
    base, cks = model_files(2)
    bad = _bad(tmp_path, name)
    before = listing(tmp_path)
    r = cli("merge", "--base", base, "--method", method, "--out", tmp_path / "out", cks[0], bad)
    assert r.returncode == 2, r.stderr
    assert f"checkpoint {bad}: {BAD[name]}" in r.stderr and "Traceback" not in r.stderr
    assert listing(tmp_path) == before


def test_bad_base_is_refused_and_nothing_is_written(cli, tmp_path, model_files):
    _, cks = model_files(1)
    bad = _bad(tmp_path, "truncated.safetensors")
    before = listing(tmp_path)
    r = cli("merge", "--base", bad, "--method", "opcm", "--out", tmp_path / "out", cks[0])
    assert (
        r.returncode == 2
        and f"checkpoint {bad}: truncated" in r.stderr
        and "Traceback" not in r.stderr
    )
    assert listing(tmp_path) == before


def test_allow_missing_treats_absent_tensor_as_zero_task_vector(cli, model_files, tmp_path):
    base, cks = model_files(1)
    lacks = _bad(tmp_path, "lacks.safetensors")
    r = cli(
        "merge",
        "--base",
        base,
        "--method",
        "task_arithmetic",
        "--allow-missing",
        "--out",
        tmp_path / "o",
        lacks,
    )
    assert r.returncode == 0, r.stderr
    merged, b = load_file(str(tmp_path / "o" / "model.safetensors")), load_file(str(base))
    assert torch.equal(merged["layers.0.out.weight"], b["layers.0.out.weight"])


def test_allow_pickle_loads_with_weights_only(cli, model_files, tmp_path):
    base, cks = model_files(1)
    pk = _bad(tmp_path, "model.bin")
    r = cli(
        "merge",
        "--base",
        base,
        "--method",
        "task_arithmetic",
        "--allow-pickle",
        "--out",
        tmp_path / "o",
        pk,
    )
    assert r.returncode == 0, r.stderr

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    before = listing(tmp_path)
    r = cli(
        "merge",
        "--base",
        base,
        "--method",
        "task_arithmetic",
        "--allow-pickle",
        "--out",
        tmp_path / "o2",
        evil,
    )
    assert r.returncode == 2 and "cannot load pickle weights with weights_only=True" in r.stderr
    assert "pwned" not in r.stdout and listing(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (
            ["--method", "opcm", "--param", "alpha=1.0"],
            "invalid parameters for method 'opcm': alpha",
        ),
        (["--method", "opcm", "--param", "alpha"], "--param 'alpha' is not KEY=VALUE"),
        (["--method", "opcm", "--project-regex", "("], "projection regex '(' is invalid"),
        (["--method", "opcm", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_options_exit_2_with_one_message(cli, model_files, tmp_path, args, message):
    base, cks = model_files(1)
    before = listing(tmp_path)
    r = cli("merge", "--base", base, *args, "--out", tmp_path / "out", cks[0])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert listing(tmp_path) == before


def test_existing_output_is_not_replaced_without_overwrite(cli, model_files, tmp_path):
    base, cks = model_files(1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("merge", "--base", base, "--method", "opcm", "--out", out, cks[0])
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_state_commands_report_missing_state(cli, tmp_path):
    r = cli("state", "fold", "--state", tmp_path / "nostate", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "no merge state at" in r.stderr
    assert not (tmp_path / "nostate").exists()


@pytest.mark.parametrize("method", ["opcm", "batch_task_arithmetic"])
def test_merge_refuses_a_checkpoint_of_another_base_unless_turned_off(
    cli, model_files, tmp_path, method
):
    """The lineage's other-base screen (‖τ‖/‖θ₀‖ > 1) guards `merge` and `state fold` too."""
    base, cks = model_files(2)
    other = tmp_path / "other.safetensors"
    save_file(tiny_state(7), str(other))  # same names and shapes, trained from another base
    out = tmp_path / "out"
    r = cli("merge", "--base", base, "--method", method, "--out", out, cks[0], other)
    assert r.returncode == 2 and "above max_task_vector_ratio 1" in r.stderr, r.stderr
    assert f"checkpoint {other}" in r.stderr and not out.exists()
    r = cli("merge", "--base", base, "--method", method, "--max-task-vector-ratio", "none",
            "--out", out, cks[0], other)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("merge", "--base", base, "--method", method, "--max-task-vector-ratio", "0",
            "--out", tmp_path / "o2", cks[0])  # fmt: skip
    assert r.returncode == 2 and "must be positive" in r.stderr


def test_state_fold_refuses_a_checkpoint_of_another_base_and_keeps_the_state(
    cli, model_files, tmp_path
):
    base, cks = model_files(1)
    other = tmp_path / "other.safetensors"
    save_file(tiny_state(7), str(other))
    state = tmp_path / "state"
    cli("state", "init", "--state", state, "--base", base, "--method", "opcm")
    assert cli("state", "fold", "--state", state, cks[0]).returncode == 0
    before = (state / "state.json").read_text()
    r = cli("state", "fold", "--state", state, other)
    assert r.returncode == 2 and "most likely not fine-tuned from this base" in r.stderr
    assert (state / "state.json").read_text() == before
    r = cli("state", "fold", "--state", state, "--max-task-vector-ratio", "5", other)
    assert r.returncode == 0, r.stderr
