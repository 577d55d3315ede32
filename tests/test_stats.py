"""`mergeflow stats` and :mod:`mergeflow.evaluation.statistics` against hand-computed references."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mergeflow.cli.main import main
from mergeflow.errors import ConfigError
from mergeflow.evaluation.models import instantiate
from mergeflow.evaluation.statistics import compute_stats, stats_for_checkpoint
from mergeflow.examples.suite import save_tensors
from mergeflow.merging.stats import STATS_FORMAT, check_stats
from mergeflow.storage.checkpoints import open_file
from mergeflow.storage.objects import LocalStore

MLP = {"mergeflow_architecture": "mlp", "in_features": 5, "hidden": [4], "num_labels": 3}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return instantiate(MLP)


def mlp_data(n: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def batches(x: torch.Tensor, y: torch.Tensor | None, size: int = 3) -> list[Any]:
    return [
        ([x[i : i + size]], {}, None if y is None else y[i : i + size])
        for i in range(0, len(x), size)
    ]


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# --- Grams and Fisher against hand-written references --------------------------------------


def test_grams_of_an_mlp_match_a_float64_reference() -> None:
    model = mlp()
    x, _ = mlp_data()
    stats, examples, tokens = compute_stats(model, batches(x, None), fisher=False)
    assert set(stats) == {"layers.0.weight:gram", "classifier.weight:gram"}
    assert (examples, tokens) == (7, 7)
    x64 = x.double()
    w0, b0 = model.layers[0].weight.double(), model.layers[0].bias.double()
    h = torch.relu(x64 @ w0.T + b0)
    for key, inputs in (("layers.0.weight:gram", x64), ("classifier.weight:gram", h)):
        ref = inputs.T @ inputs / len(inputs)
        assert stats[key].dtype == torch.float32 and stats[key].is_contiguous()
        torch.testing.assert_close(stats[key].double(), ref, atol=1e-6, rtol=0)


def reference_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0, int(y[i])]
        for (k, _), g in zip(
            params.items(), torch.autograd.grad(logp, list(params.values())), strict=True
        ):
            out[k] += g.double() ** 2
    return {f"{k}:fisher": v / len(x) for k, v in out.items()}


def test_fisher_matches_per_example_autograd_and_label_choice_matters() -> None:
    model = mlp()
    x, y = mlp_data()
    stats, examples, _ = compute_stats(model, batches(x, y), grams=False, fisher_labels="empirical")
    ref = reference_fisher(model, x, y)
    assert set(stats) == set(ref) and examples == 7
    for k in ref:
        torch.testing.assert_close(stats[k].double(), ref[k], atol=1e-6, rtol=1e-5)

    with torch.no_grad():
        pred = model(x).argmax(-1)
    wrong = (pred + 1) % 3  # labels that disagree with every prediction
    emp, _, _ = compute_stats(model, batches(x, wrong), grams=False, fisher_labels="empirical")
    predicted, _, _ = compute_stats(
        model, batches(x, wrong), grams=False, fisher_labels="predicted"
    )
    by_pred = reference_fisher(model, x, pred)
    for k in by_pred:
        torch.testing.assert_close(predicted[k].double(), by_pred[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(emp[k], predicted[k], atol=1e-6) for k in emp)
    # auto: the labels when the data has them, else the predictions
    auto_labelled, _, _ = compute_stats(model, batches(x, wrong), grams=False)
    auto_unlabelled, _, _ = compute_stats(model, batches(x, None), grams=False)
    assert all(torch.equal(auto_labelled[k], emp[k]) for k in emp)
    assert all(torch.equal(auto_unlabelled[k], predicted[k]) for k in emp)


def test_grams_with_fisher_on_equal_grams_alone() -> None:
    model = mlp()
    x, y = mlp_data()
    both, _, _ = compute_stats(model, batches(x, y))
    grams, _, _ = compute_stats(model, batches(x, y), fisher=False)
    assert {k for k in both if k.endswith(":gram")} == set(grams)
    for k in grams:
        torch.testing.assert_close(both[k], grams[k], atol=1e-6, rtol=1e-6)


def test_bad_inputs_to_compute_stats_are_config_errors() -> None:
    model = mlp()
    x, _ = mlp_data()
    with pytest.raises(ConfigError, match="no calibration examples"):
        compute_stats(model, [])
    with pytest.raises(ConfigError, match="'empirical' needs labels"):
        compute_stats(model, batches(x, None), fisher_labels="empirical")
    with pytest.raises(ConfigError, match="out of range"):
        compute_stats(model, batches(x, torch.full((7,), 5)), grams=False)
    bad = x.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ConfigError, match="layers.0.weight:gram"):
        compute_stats(model, batches(bad, None), fisher=False)
    with pytest.raises(ConfigError, match="not finite"):
        compute_stats(model, batches(bad, None), grams=False)

    class SequenceModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(5, 11)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)  # [B, T, V]

    seq = torch.randn(2, 4, 5)
    with pytest.raises(
        ConfigError, match="Fisher of sequence outputs is not supported.*--no-fisher"
    ):
        compute_stats(SequenceModel(), [([seq], {}, None)])
    stats, examples, tokens = compute_stats(SequenceModel(), [([seq], {}, None)], fisher=False)
    assert set(stats) == {"proj.weight:gram"} and (examples, tokens) == (2, 8)


# --- padding: a tiny HF BERT ------------------------------------------------------------------


def tiny_bert() -> tuple[nn.Module, dict[str, Any]]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        vocab_size=30,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    return model, cfg.to_dict() | {"architectures": ["BertForSequenceClassification"]}


def test_padding_tokens_are_left_out_of_the_grams() -> None:
    model, config = tiny_bert()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, size=(4, 6))
    mask = np.ones((4, 6), dtype=np.int64)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    labels = np.array([0, 1, 2, 0])
    data = [("calib.npz", npz(input_ids=ids, attention_mask=mask, labels=labels))]
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    stats, meta = stats_for_checkpoint(config, tensors, data, batch_size=3, fisher=False)
    assert meta["tokens"] == str(int(mask.sum())) == "20" and meta["examples"] == "4"
    assert meta["data"] == "calib.npz"

    name = "bert.encoder.layer.0.attention.self.query"
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach())
    )
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    handle.remove()
    x = seen[0].double()  # [4, 6, 8]
    rows = x[torch.as_tensor(mask) != 0]
    ref = rows.T @ rows / len(rows)
    torch.testing.assert_close(stats[f"{name}.weight:gram"].double(), ref, atol=1e-6, rtol=0)
    every_row = x.reshape(-1, 8)
    assert not torch.allclose(ref, every_row.T @ every_row / len(every_row), atol=1e-3)
    # 2-D inputs (pooler, classifier): every row counts
    assert "classifier.weight:gram" in stats and "bert.pooler.dense.weight:gram" in stats

    with_fisher, _ = stats_for_checkpoint(config, tensors, data, fisher_labels="empirical")
    assert (
        "classifier.weight:fisher" in with_fisher
        and "bert.embeddings.word_embeddings.weight:fisher" in with_fisher
    )
    torch.testing.assert_close(
        with_fisher[f"{name}.weight:gram"], stats[f"{name}.weight:gram"], atol=1e-6, rtol=1e-5
    )


# --- the CLI ------------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    save_tensors(folder, MLP, mlp().state_dict())
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name)


def test_cli_writes_a_stats_file_the_merge_side_accepts(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    x, y = mlp_data(10)
    data = tmp_path / "calib.npz"
    data.write_bytes(npz(x=x.numpy(), labels=y.numpy()))
    out_dir = tmp_path / "stats"
    out = out_dir / "mergeflow_stats.safetensors"
    rc, stdout, err = run(
        capsys,
        "stats",
        checkpoint,
        "--data",
        data,
        "--out",
        out,
        "--batch-size",
        3,
        "--max-examples",
        7,
        "--device",
        "cpu",
    )
    assert rc == 0, err
    assert "example" in err  # the progress bar
    assert stdout.count("\n") == 1 and "2 grams, 4 fishers, 7 examples, 7 tokens" in stdout
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == STATS_FORMAT and meta["examples"] == "7"
    assert meta["data"] == str(data)
    reader = open_file(LocalStore(out_dir), out.name, str(out))
    base = open_file(LocalStore(checkpoint), "model.safetensors", str(checkpoint))
    stats = check_stats(reader, reader.metadata, base)
    assert stats.names("gram") == ["classifier.weight", "layers.0.weight"]
    assert len(stats.names("fisher")) == 4 and len(keys) == 6
    assert stats.examples == 7 and stats.tokens == 7
    model = mlp()
    ref = reference_fisher(model, x[:7], y[:7])
    torch.testing.assert_close(
        stats.get("layers.0.weight", "fisher").double(),
        ref["layers.0.weight:fisher"],
        atol=1e-6,
        rtol=1e-5,
    )
    assert leftovers(out_dir) == []

    rc, _, err = run(
        capsys,
        "stats",
        checkpoint,
        "--data",
        data,
        "--out",
        out,
        "--no-fisher",
        "--no-progress",
        "--overwrite",
    )
    assert rc == 0 and err == ""
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == {"layers.0.weight:gram", "classifier.weight:gram"}
        assert f.metadata()["examples"] == "10"
    assert leftovers(out_dir) == []


BAD = {
    "wide": ("calibration data", "does not fit the model"),
    "no-inputs": ("has no inputs",),
    "empirical": ("has no labels", "'empirical'"),
    "exists": ("already exists", "--overwrite"),
    "no-config": ("has no config.json", "builds the model from it"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(
    case: str, capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    x, y = mlp_data()
    data = tmp_path / "calib.npz"
    data.write_bytes(npz(x=x.numpy(), labels=y.numpy()))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "stats.safetensors"
    ck = checkpoint
    extra: list[str] = []
    if case == "wide":
        data.write_bytes(npz(x=np.zeros((4, 6), np.float32), labels=np.zeros(4, np.int64)))
    elif case == "no-inputs":
        data.write_bytes(npz(labels=np.zeros(4, np.int64)))
    elif case == "empirical":
        data.write_bytes(npz(x=x.numpy()))
        extra = ["--fisher-labels", "empirical"]
    elif case == "exists":
        out.write_bytes(b"old")
    elif case == "no-config":
        ck = tmp_path / "bare"
        ck.mkdir()
        save_file(mlp().state_dict(), str(ck / "model.safetensors"))
    rc, stdout, err = run(
        capsys, "stats", ck, "--data", data, "--out", out, "--no-progress", *extra
    )
    assert rc == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeflow: error: "), err
    assert all(part in lines[0] for part in BAD[case]), lines[0]
    if case == "exists":
        assert out.read_bytes() == b"old"
        assert sorted(p.name for p in out_dir.iterdir()) == ["stats.safetensors"]
    else:
        assert list(out_dir.iterdir()) == []
