"""Checkpoint formats: HF folders (single and sharded), AutoModel round trip, module-type projection, LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.models import tiny_bert
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = tiny_bert()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture
def bert_dirs(tmp_path: Path) -> tuple[Path, list[Path]]:
    base = tiny_bert()
    bdir = tmp_path / "base"
    base.save_pretrained(bdir)
    cks = []
    for i in range(2):
        d = tmp_path / f"ft{i}"
        perturbed(base, i).save_pretrained(d, max_shard_size="8KB" if i == 1 else "5GB")
        cks.append(d)
    assert (cks[1] / "model.safetensors.index.json").exists()
    return bdir, cks


def test_merged_hf_model_loads_with_automodel_and_projects_linear_modules(cli, bert_dirs, tmp_path):
    bdir, cks = bert_dirs
    out = tmp_path / "merged"
    r = cli(
        "merge", "--base", bdir, "--method", "opcm", "--max-shard-size", "10KB", "--out", out, *cks
    )
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    model = transformers.AutoModel.from_pretrained(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in set(index["weight_map"].values()):
        stored.update(load_file(str(out / shard)))
    sd = model.state_dict()
    for k, v in stored.items():
        assert torch.equal(sd[k], v), k
    info = json.loads((out / "mergeflow.json").read_text())
    assert (
        info["projection"]["kind"] == "module-types"
        and "BertModel" in info["projection"]["description"]
    )
    linear = {
        f"{n}.weight" for n, m in tiny_bert().named_modules() if isinstance(m, torch.nn.Linear)
    }
    state = tmp_path / "state"
    cli("state", "init", "--state", state, "--base", bdir, "--method", "opcm")
    projected = set(
        json.loads((state / "state.json").read_text())["info"]["projection"]["projected"]
    )
    assert projected == linear and not any("embeddings" in k for k in projected)


def test_regex_override_is_recorded(cli, bert_dirs, tmp_path):
    bdir, cks = bert_dirs
    out = tmp_path / "merged"
    assert (
        cli(
            "merge",
            "--base",
            bdir,
            "--method",
            "opcm",
            "--project-regex",
            r"attention\.self\.query",
            "--out",
            out,
            *cks,
        ).returncode
        == 0
    )
    info = json.loads((out / "mergeflow.json").read_text())
    assert info["projection"]["kind"] == "regex" and info["projection"]["count"] == 2


@pytest.mark.parametrize(
    "method, rslora", [("opcm", False), ("opcm", True), ("dop", False), ("nufilt", False)]
)
def test_lora_adapter_folds_like_its_densified_model(cli, bert_dirs, tmp_path, method, rslora):
    bdir, cks = bert_dirs
    base = transformers.AutoModel.from_pretrained(bdir)
    lcfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], use_rslora=rslora
    )
    pm = peft.get_peft_model(base, lcfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    adir = tmp_path / "adapter"
    pm.save_pretrained(adir)
    assert (adir / "adapter_config.json").exists() and (adir / "adapter_model.safetensors").exists()
    dense = pm.merge_and_unload()
    ddir = tmp_path / "dense"
    dense.save_pretrained(ddir)
    a, d = tmp_path / "out_a", tmp_path / "out_d"
    r = cli("merge", "--base", bdir, "--method", method, "--out", a, cks[0], adir)
    assert r.returncode == 0, r.stderr
    assert (
        cli("merge", "--base", bdir, "--method", method, "--out", d, cks[0], ddir).returncode == 0
    )
    ta, td = load_file(str(a / "model.safetensors")), load_file(str(d / "model.safetensors"))
    for k in td:
        err = float((ta[k] - td[k]).norm() / max(float(td[k].norm()), 1e-12))
        assert err < 1e-5, (k, err)


def test_lora_adapter_targeting_unknown_module_is_refused(cli, bert_dirs, tmp_path):
    from safetensors.torch import save_file

    bdir, _ = bert_dirs
    adir = tmp_path / "adapter"
    adir.mkdir()
    (adir / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4})
    )
    save_file(
        {
            "base_model.model.nowhere.lora_A.weight": torch.zeros(2, 16),
            "base_model.model.nowhere.lora_B.weight": torch.zeros(16, 2),
        },
        str(adir / "adapter_model.safetensors"),
    )
    r = cli("merge", "--base", bdir, "--method", "opcm", "--out", tmp_path / "o", adir)
    assert (
        r.returncode == 2
        and f"checkpoint {adir}: adapter targets nowhere.weight, which the base does not have"
        in r.stderr
    )
    assert not (tmp_path / "o").exists()


def test_a_killed_writers_spool_is_swept_by_the_next_writer(tmp_path):
    """A SIGKILLed fold leaves its spool folder; the next writer removes it, and only it."""
    import os
    import subprocess
    import sys

    from mergeflow.storage.objects import LocalStore, StoreSink
    from mergeflow.storage.shard_writer import ShardedWriter

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    spool = tmp_path / "tmp"
    stale = spool / f"mergeflow-spool-{dead.pid}-abc"
    live = spool / f"mergeflow-spool-{os.getpid()}-def"
    other = spool / "mergeflow-spool-notours"
    for d in (stale, live, other):
        d.mkdir(parents=True)
        (d / "shard-00000.data").write_bytes(b"x" * 10)
    w = ShardedWriter(StoreSink(LocalStore(tmp_path / "m")), spool_dir=str(spool))
    assert not stale.exists() and live.exists() and other.exists()
    w.add("t", torch.ones(3))
    w.commit({})
    assert sorted(p.name for p in spool.iterdir()) == sorted([live.name, other.name])


def test_sharded_writer_round_trip_bf16(tmp_path):
    from mergeflow.storage.objects import LocalStore, StoreSink
    from mergeflow.storage.schemes import open_checkpoint
    from mergeflow.storage.shard_writer import ShardedWriter

    tensors = {f"t{i}": torch.randn(64, 8).to(torch.bfloat16) for i in range(5)} | {
        "ids": torch.arange(7)
    }
    w = ShardedWriter(StoreSink(LocalStore(tmp_path / "m")), max_shard_size=2048)
    for k, v in tensors.items():
        w.add(k, v)
    names = w.commit({"note": "x"})
    assert len(names) == 3
    ck = open_checkpoint(str(tmp_path / "m"))
    assert ck.reader.keys() == list(tensors)
    for k, v in tensors.items():
        assert torch.equal(ck.reader.get(k), v)


class _SlowSink:
    """A sink that records when each shard arrives and can hold or fail a hand-off."""

    def __init__(self, root, fail: str | None = None) -> None:
        import threading

        from mergeflow.storage.objects import LocalStore, StoreSink

        self.inner = StoreSink(LocalStore(root))
        self.fail = fail
        self.arrived: list[str] = []
        self.release = threading.Event()
        self.release.set()

    def put(self, local_path, name: str) -> None:
        self.release.wait(10)
        if name == self.fail:
            raise OSError(f"disk full while storing {name}")
        self.inner.put(local_path, name)
        self.arrived.append(name)


def test_a_background_writer_stores_each_shard_while_the_next_is_written(tmp_path):
    """``background``: shard i is in the sink before shard i+1 is finished, one hand-off at a
    time; names without a count, the index last, every shard with the given metadata."""
    import time

    from safetensors import safe_open

    from mergeflow.storage.schemes import open_checkpoint
    from mergeflow.storage.shard_writer import ShardedWriter

    tensors = {f"t{i}": torch.randn(64, 8) for i in range(5)}  # 2048 B each: one per shard
    sink = _SlowSink(tmp_path / "m")
    w = ShardedWriter(sink, max_shard_size=2048, background=True, metadata={"step": "3"})
    seen = []
    for k, v in tensors.items():
        w.add(k, v)
        deadline = time.monotonic() + 10
        while len(sink.arrived) < len(seen) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(list(sink.arrived))
    # adding tensor i opens shard i + 1 and hands shard i off: it arrives before the commit
    assert seen == [[f"model-0000{j}.safetensors" for j in range(1, i + 1)] for i in range(5)]
    names = w.commit()
    assert names == [f"model-0000{i}.safetensors" for i in range(1, 6)]
    assert sink.arrived == [*names, "model.safetensors.index.json"]
    ck = open_checkpoint(str(tmp_path / "m"))
    for k, v in tensors.items():
        assert torch.equal(ck.reader.get(k), v)
    for n in names:
        with safe_open(str(tmp_path / "m" / n), "pt") as f:
            assert f.metadata() == {"format": "pt", "step": "3"}
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 5 * 2048, "step": "3"}

    one = ShardedWriter(_SlowSink(tmp_path / "one"), background=True)
    one.add("a", torch.ones(3))
    assert one.commit() == ["model.safetensors"]  # one shard: the usual name, no index
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]


def test_a_failed_background_hand_off_is_raised_and_the_spool_dropped(tmp_path):
    """The sink's error surfaces at the next add or at the commit; abort waits for the
    hand-off in flight and leaves no spool; other metadata at the commit is refused."""
    import time

    from mergeflow.storage.shard_writer import ShardedWriter

    spool = tmp_path / "spool"
    spool.mkdir()
    sink = _SlowSink(tmp_path / "m", fail="model-00001.safetensors")
    w = ShardedWriter(sink, max_shard_size=2048, spool_dir=str(spool), background=True)
    w.add("a", torch.randn(64, 8))
    w.add("b", torch.randn(64, 8))  # hands shard 1 off, which fails
    with pytest.raises(OSError, match="disk full while storing model-00001.safetensors"):
        w.commit()
    assert list(spool.iterdir()) == [] and sink.arrived == []

    sink = _SlowSink(tmp_path / "m2")
    sink.release.clear()  # the first hand-off is held: the writer goes on meanwhile
    w = ShardedWriter(sink, max_shard_size=2048, spool_dir=str(spool), background=True)
    t0 = time.monotonic()
    w.add("a", torch.randn(64, 8))
    w.add("b", torch.randn(64, 8))
    assert time.monotonic() - t0 < 5 and sink.arrived == []
    sink.release.set()
    w.abort()
    assert list(spool.iterdir()) == [] and sink.arrived == ["model-00001.safetensors"]

    w = ShardedWriter(_SlowSink(tmp_path / "m3"), 2048, spool_dir=str(spool), background=True)
    w.add("a", torch.randn(64, 8))
    w.add("b", torch.randn(64, 8))
    with pytest.raises(ValueError, match="writes the metadata it was made with"):
        w.commit({"other": "1"})
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize("in_place", [True, False])
def test_shards_are_valid_safetensors_with_the_header_inserted_in_place_or_copied(
    tmp_path, monkeypatch, in_place
):
    """The header goes in front of the spooled data in place where the filesystem can insert
    a range (no copy), else the data is copied after it; the safetensors library reads both."""
    from safetensors import safe_open

    from mergeflow.storage import shard_writer
    from mergeflow.storage.objects import LocalStore, StoreSink
    from mergeflow.storage.shard_writer import ShardedWriter

    calls: list[bool] = []
    real = shard_writer._insert_range

    def insert(fd: int, length: int) -> bool:
        calls.append(ok := in_place and real(fd, length))
        return ok

    monkeypatch.setattr(shard_writer, "_insert_range", insert)
    tensors = {
        "a": torch.randn(300, 7),
        "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.arange(3),
    }
    (tmp_path / "spool").mkdir()
    w = ShardedWriter(StoreSink(LocalStore(tmp_path / "m")), spool_dir=str(tmp_path / "spool"))
    for k, v in tensors.items():
        w.add(k, v)
    w.commit({"note": "x"})
    assert calls and not any(calls[1:])
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert list(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_local_read_into_past_the_end_is_a_truncation_error(tmp_path):
    """A file that shrank after its header was read: the error names the file and the range,
    and the source still reads what is there."""
    from mergeflow.errors import CheckpointError
    from mergeflow.storage.safetensors_file import LocalFile

    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 10)
    src = LocalFile(path)
    buf = bytearray(8)
    with pytest.raises(
        CheckpointError, match=rf"^checkpoint {path}: truncated: wanted 8 bytes at offset 6, got 4$"
    ):
        src.read_into(6, memoryview(buf))
    src.read_into(0, memoryview(buf))
    assert bytes(buf) == b"x" * 8
    src.close()
