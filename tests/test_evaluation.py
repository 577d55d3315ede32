"""Evaluators, continual metrics, the gate and candidate selection, against hand-worked numbers."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.numpy import save as save_np

from mergeflow.errors import CheckpointError, ConfigError, StateError
from mergeflow.evaluation import (
    AccuracyMatrix,
    ClassificationEvaluator,
    EvaluationSuite,
    GateChoice,
    GateSpec,
    PerplexityEvaluator,
    TaskSpec,
    build_evaluator,
    chain_heads,
    choose,
    continual_metrics,
    decide,
    load_tokenizer,
    matrix_from_rows,
    plot_accuracy_matrix,
    select_candidate,
)
from mergeflow.merging.tensors import DictReader

# --- a tiny model whose logits are computed by hand --------------------------------------
# mlp, identity activation: logits = head_W @ (M @ x) + head_b, with M the merged "backbone".
MLP_CONFIG = {
    "mergeflow_architecture": "mlp",
    "in_features": 2,
    "hidden": [2],
    "num_labels": 2,
    "activation": "identity",
}
X = np.array([[2, 1], [1, 3], [0, -1], [-2, -1]], dtype=np.float32)
LABELS_A = np.array([0, 1, 1, 1])
LABELS_B = np.array([2, 1, 0, 0])
HEADS = {
    "ck-a": {"classifier.weight": torch.eye(2), "classifier.bias": torch.zeros(2)},
    # 3 labels although the config says 2: a head may change shape
    "ck-b": {
        "classifier.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        "classifier.bias": torch.zeros(3),
    },
}


def backbone(m: list[list[float]]) -> DictReader:
    return DictReader(
        {"layers.0.weight": torch.tensor(m), "layers.0.bias": torch.zeros(2)}, "merged"
    )


IDENTITY = [[1.0, 0.0], [0.0, 1.0]]
SWAP = [[0.0, 1.0], [1.0, 0.0]]


def write_split(
    folder: Path, name: str, labels: np.ndarray, fmt: str = "npz", x: np.ndarray = X
) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("validation", "test"):
        path = folder / f"{name}-{split}.{fmt}"
        if fmt == "npz":
            np.savez(path, x=x, labels=labels)
        elif fmt == "safetensors":
            path.write_bytes(save_np({"x": x, "y": labels.astype(np.int64)}))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"x": [list(r) for r in x], "labels": labels}), path)
    return str(folder / f"{name}-{{split}}.{fmt}")


@pytest.fixture
def mlp_tasks(tmp_path: Path) -> list[TaskSpec]:
    return [
        TaskSpec(name="a", checkpoint="ck-a", data=write_split(tmp_path, "a", LABELS_A, "npz")),
        TaskSpec(
            name="b", checkpoint="ck-b", data=write_split(tmp_path, "b", LABELS_B, "safetensors")
        ),
    ]


# --- classification ----------------------------------------------------------------------
def test_accuracy_by_hand(mlp_tasks: list[TaskSpec]) -> None:
    ev = ClassificationEvaluator(
        MLP_CONFIG, batch_size=3
    )  # 3 does not divide 4: batching is exercised
    # identity backbone: head a -> argmax x = [0, 1, 0, 1] vs [0, 1, 1, 1] = 3/4
    # head b logits [x0, x1, x0+x1] -> [2, 2, 0, 1] vs [2, 1, 0, 0] = 2/4
    assert ev.evaluate(backbone(IDENTITY), HEADS, mlp_tasks, "test") == {"a": 0.75, "b": 0.5}
    # swapped backbone: head a -> argmax of (x1, x0) = [1, 0, 1, 0] vs [0, 1, 1, 1] = 1/4
    # head b -> [x1, x0, x0+x1] -> [2, 2, 1, 0] vs [2, 1, 0, 0] = 2/4
    assert ev.evaluate(backbone(SWAP), HEADS, mlp_tasks, "validation") == {"a": 0.25, "b": 0.5}


def test_parquet_data_and_max_examples(tmp_path: Path) -> None:
    task = TaskSpec(
        name="p", checkpoint="ck-a", data=write_split(tmp_path, "p", LABELS_A, "parquet")
    )
    ev = ClassificationEvaluator(MLP_CONFIG)
    assert ev.evaluate(backbone(IDENTITY), HEADS, [task], "test") == {"p": 0.75}
    capped = ClassificationEvaluator(MLP_CONFIG, max_examples=2)  # first two rows are both right
    assert capped.evaluate(backbone(IDENTITY), HEADS, [task], "test") == {"p": 1.0}


def test_hf_model_from_config_json(tmp_path: Path) -> None:
    """An HF architecture built from config.json, scored with its head, vs the same model run directly."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        architectures=["BertForSequenceClassification"],
    )
    model = BertForSequenceClassification(cfg).eval()
    sd = model.state_dict()
    ids = torch.randint(1, 50, (20, 6))
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)
    labels = pred.clone()
    labels[:5] = (labels[:5] + 1) % 3  # exactly 15/20 right
    for split in ("validation", "test"):
        np.savez(tmp_path / f"{split}.npz", input_ids=ids.numpy(), labels=labels.numpy())
    task = TaskSpec(name="t", checkpoint="c", data=str(tmp_path / "{split}.npz"))
    base = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    head = {k: v for k, v in sd.items() if k.startswith("classifier.")}
    suite = EvaluationSuite(tasks=(task,))
    ev = build_evaluator(suite, model_config=cfg.to_dict())
    assert ev.evaluate(DictReader(base), {"c": head}, suite.tasks, "test") == {"t": 0.75}


# --- perplexity ---------------------------------------------------------------------------
TEXT = "the cat sat on the mat . the dog sat on the log . a cat and a dog sat on a mat and a log ."


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *sorted(set(TEXT.split()))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_perplexity_vs_direct_computation(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    for split in ("validation", "test"):
        (tmp_path / f"{split}.txt").write_text(TEXT)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        architectures=["GPT2LMHeadModel"],
    )
    model = GPT2LMHeadModel(cfg).eval()
    sd = {
        k: v for k, v in model.state_dict().items() if k != "lm_head.weight"
    }  # tied to wte, as HF saves it
    ids = tok.encode(TEXT).ids
    block = 8
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), block):
            chunk = ids[i : i + block]
            if len(chunk) < 2:
                continue
            logits = model(input_ids=torch.tensor([chunk])).logits[0].double()
            for k in range(1, len(chunk)):
                nll -= float(torch.log_softmax(logits[k - 1], -1)[chunk[k]])
                n += 1
    expected = math.exp(nll / n)
    task = TaskSpec(
        name="lm",
        data=str(tmp_path / "{split}.txt"),
        metric="perplexity",
        options={"block_size": block},
    )
    suite = EvaluationSuite(tasks=(task,), tokenizer=str(tmp_path / "tokenizer.json"))
    ev = build_evaluator(suite, model_config=cfg.to_dict())
    got = ev.evaluate(DictReader(sd), {}, suite.tasks, "test")["lm"]
    assert got == pytest.approx(expected, rel=1e-5)
    assert len(ids) % block != 0  # the short last block is part of the computation
    assert suite.higher_is_better is False


# --- user evaluator -----------------------------------------------------------------------
USER_MODULE = """
import math
def score(model, heads, tasks, split, context):
    total = float(sum(model.get(k).sum() for k in model.keys()))
    return {t.name: total + (1.0 if split == "test" else 0.0) + context.batch_size for t in tasks}
def no_context(model, heads, tasks, split):
    return {t.name: 0.5 for t in tasks}
def not_a_mapping(model, heads, tasks, split):
    return [1.0]
def missing(model, heads, tasks, split):
    return {}
def nan(model, heads, tasks, split):
    return {t.name: math.nan for t in tasks}
NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mf_user_eval.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mf_user_eval"


def test_user_evaluator(user_module: str) -> None:
    tasks = (
        TaskSpec(name="u", data="x/{split}", metric=f"{user_module}:score"),
        TaskSpec(name="v", data="x/{split}", metric=f"{user_module}:no_context"),
    )
    suite = EvaluationSuite(tasks=tasks, batch_size=10)
    ev = build_evaluator(suite, model_config=None)
    model = DictReader({"w": torch.tensor([1.0, 2.0])})
    assert ev.evaluate(model, {}, suite.tasks, "test") == {"u": 14.0, "v": 0.5}
    assert ev.evaluate(model, {}, suite.tasks, "validation") == {"u": 13.0, "v": 0.5}


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("nope_module_xyz:f", "cannot import module 'nope_module_xyz'"),
        ("{m}:absent", "has no attribute 'absent'"),
        ("{m}:NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
        ("{m}:not_a_mapping", "returned list, expected a mapping"),
        ("{m}:missing", "returned no score for task 'u'"),
        ("{m}:nan", "returned nan for task 'u'; expected a finite number"),
    ],
)
def test_user_evaluator_errors(user_module: str, fn: str, message: str) -> None:
    task = TaskSpec(name="u", data="x/{split}", metric=fn.format(m=user_module))
    ev = build_evaluator(EvaluationSuite(tasks=(task,)), model_config=None)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ev.evaluate(DictReader({"w": torch.zeros(1)}), {}, [task], "test")


# --- continual metrics --------------------------------------------------------------------
ROWS = [
    ("c1", {"A": 0.9}),
    ("c2", {"A": 0.8, "B": 0.7}),
    ("c3", {"A": 0.6, "B": 0.5, "C": 0.95}),
]


def test_acc_bwt_hand_worked() -> None:
    m = matrix_from_rows(ROWS)
    assert m.tasks == ("A", "B", "C") and m.entered == {"A": 1, "B": 2, "C": 3}
    assert m.acc(1) == pytest.approx(0.9)
    assert m.acc(2) == pytest.approx((0.8 + 0.7) / 2)
    assert m.acc(3) == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert m.bwt(1) is None  # undefined at t = 1
    assert m.bwt(2) == pytest.approx(0.8 - 0.9)
    assert m.bwt(3) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.7)) / 2)
    assert m.acc_curve() == pytest.approx([0.9, 0.75, 2.05 / 3])
    metrics = continual_metrics(m)
    assert metrics == pytest.approx(
        {"test/A": 0.6, "test/B": 0.5, "test/C": 0.95, "test/avg": 2.05 / 3, "test/bwt": -0.25}
    )
    assert "validation/bwt" not in continual_metrics(matrix_from_rows(ROWS[:1]), "validation")
    assert AccuracyMatrix.model_validate_json(m.model_dump_json()) == m


def test_matrix_rejects_holes_and_nan() -> None:
    m = matrix_from_rows(ROWS[:2])
    with pytest.raises(
        StateError, match=r"step 3 \(c3\) has no score for tasks \['B'\] that entered earlier"
    ):
        m.append("c3", {"A": 0.5, "C": 0.9})
    with pytest.raises(StateError, match=r"task 'C' scored nan, not a finite number"):
        m.append("c3", {"A": 0.5, "B": 0.5, "C": float("nan")})
    with pytest.raises(ValueError, match="step 3 is outside 1..2"):
        m.acc(3)


def test_heatmap_png(tmp_path: Path) -> None:
    data = plot_accuracy_matrix(matrix_from_rows(ROWS), tmp_path / "m.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "m.png").read_bytes() == data


# --- gate -----------------------------------------------------------------------------------
SCORES = {"a": 0.5, "b": 0.6}  # ACC 0.55


def test_gate_accepts_and_each_reason() -> None:
    assert decide(SCORES, None, GateSpec()).model_dump() == {
        "accepted": True,
        "reasons": [],
        "acc": pytest.approx(0.55),
        "champion_acc": None,
    }
    assert decide({}, None, GateSpec()).reasons == ["no task scores to gate on"]
    assert decide({"a": float("nan")}, None, GateSpec()).reasons == [
        "task a scored nan, not a finite number"
    ]
    assert decide(SCORES, None, GateSpec(min_acc=0.6)).reasons == [
        "ACC 0.5500 over 2 tasks is below the minimum 0.6000"
    ]
    champion = {"a": 0.8, "b": 0.8}
    d = decide(SCORES, champion, GateSpec(max_drop=0.1))
    assert not d.accepted and d.champion_acc == pytest.approx(0.8)
    assert d.reasons == [
        "ACC over the champion's tasks (a, b) fell 0.2500 from the champion's 0.8000 to 0.5500, more than max_drop 0.1000"
    ]
    assert decide(SCORES, champion, GateSpec(max_drop=0.3)).accepted
    assert decide(SCORES, None, GateSpec(max_drop=0.0)).accepted  # no champion yet
    assert decide(SCORES, None, GateSpec(task_floors={"a": 0.55, "later": 0.9})).reasons == [
        "task a scored 0.5000, below its floor 0.5500"
    ]
    every = decide(SCORES, champion, GateSpec(min_acc=0.6, max_drop=0.1, task_floors={"a": 0.55}))
    assert len(every.reasons) == 3 and not every.accepted


# A hand-made step: the champion covered old1 and old2; the candidate adds task new.
CHAMP = {"old1": 0.90, "old2": 0.80}
CAND = {"old1": 0.86, "old2": 0.62, "new": 0.60}  # old2 fell 0.18; new keeps 0.60/0.75 = 0.8
OWN = {"old1": 0.95, "old2": 0.85, "new": 0.75}


def test_gate_compares_like_with_like() -> None:
    # The candidate's mean over all 3 tasks (0.6933) is not compared with the champion's mean
    # over its 2 tasks (0.85): max_drop compares the mean over old1 and old2 only (0.74 vs 0.85).
    d = decide(CAND, CHAMP, GateSpec(max_drop=0.1))
    assert d.reasons == [
        "ACC over the champion's tasks (old1, old2) fell 0.1100 from the champion's 0.8500 to 0.7400, more than max_drop 0.1000"
    ]
    assert decide(CAND, CHAMP, GateSpec(max_drop=0.12)).accepted
    # an easy new task no longer hides forgetting: the all-task mean rose, the old tasks fell
    easy = {**CAND, "new": 1.0}
    assert sum(easy.values()) / 3 > sum(CHAMP.values()) / 2 - 0.1
    assert not decide(easy, CHAMP, GateSpec(max_drop=0.1)).accepted
    # and a hard new task no longer gets a fold rejected that kept the old tasks
    hard = {"old1": 0.90, "old2": 0.80, "new": 0.10}
    assert decide(hard, CHAMP, GateSpec(max_drop=0.01, max_forgetting=0.01)).accepted


def test_gate_forgetting_per_task() -> None:
    d = decide(CAND, CHAMP, GateSpec(max_forgetting=0.05))
    assert d.reasons == [
        "task old2 fell 0.1800 from the champion's 0.8000 to 0.6200, more than max_forgetting 0.0500"
    ]  # old1 fell 0.04: within
    both = decide(CAND, CHAMP, GateSpec(max_forgetting=0.03))
    assert [r.split(" fell")[0] for r in both.reasons] == ["task old1", "task old2"]
    assert decide(CAND, CHAMP, GateSpec(max_forgetting=0.18)).accepted
    assert decide(CAND, None, GateSpec(max_forgetting=0.0)).accepted  # no champion yet
    # a task that improved is not forgetting
    assert decide({"old1": 0.99, "old2": 0.8}, CHAMP, GateSpec(max_forgetting=0.0)).accepted


def test_gate_plasticity_checks_only_the_new_task() -> None:
    d = decide(CAND, CHAMP, GateSpec(min_retention=0.85), own_scores=OWN)
    assert d.reasons == [
        "new task new keeps 0.8000 of its checkpoint's score (0.6000 vs its own 0.7500), below min_retention 0.8500"
    ]  # old2 keeps 0.62/0.85 = 0.73 but is an old task: forgetting guards it, not retention
    assert decide(CAND, CHAMP, GateSpec(min_retention=0.8), own_scores=OWN).accepted
    # without a champion every task is new
    first = decide({"new": 0.6}, None, GateSpec(min_retention=0.9), own_scores=OWN)
    assert first.reasons[0].startswith("new task new keeps 0.8000")
    # a task without an own score (headless) and a gate given no own scores are not checked
    assert decide({"lm": 0.1}, None, GateSpec(min_retention=0.9), own_scores=OWN).accepted
    assert decide(CAND, CHAMP, GateSpec(min_retention=0.99)).accepted
    # own score 0: the ratio is undefined, so nothing is checked
    assert decide({"z": 0.5}, None, GateSpec(min_retention=0.9), own_scores={"z": 0.0}).accepted


def test_gate_every_check_at_once_names_tasks_numbers_and_thresholds() -> None:
    gate = GateSpec(
        min_acc=0.7, max_forgetting=0.1, max_drop=0.1, min_retention=0.9, task_floors={"new": 0.65}
    )
    d = decide(CAND, CHAMP, gate, own_scores=OWN)
    assert not d.accepted
    assert d.reasons == [
        "ACC 0.6933 over 3 tasks is below the minimum 0.7000",
        "task old2 fell 0.1800 from the champion's 0.8000 to 0.6200, more than max_forgetting 0.1000",
        "ACC over the champion's tasks (old1, old2) fell 0.1100 from the champion's 0.8500 to 0.7400, more than max_drop 0.1000",
        "new task new keeps 0.8000 of its checkpoint's score (0.6000 vs its own 0.7500), below min_retention 0.9000",
        "task new scored 0.6000, below its floor 0.6500",
    ]


# Perplexity (lower is better): the same step with the numbers mirrored.
PPL_CHAMP = {"old1": 10.0, "old2": 12.0}
PPL_CAND = {"old1": 10.5, "old2": 15.0, "new": 20.0}  # old2 rose 3; new keeps 16/20 = 0.8
PPL_OWN = {"new": 16.0}


def test_gate_lower_is_better() -> None:
    ppl = {"lm": 12.0}
    assert decide(ppl, None, GateSpec(min_acc=10.0), higher_is_better=False).reasons == [
        "ACC 12.0000 over 1 tasks is above the maximum 10.0000"
    ]
    assert decide(ppl, {"lm": 11.0}, GateSpec(max_drop=0.5), higher_is_better=False).reasons == [
        "ACC over the champion's tasks (lm) rose 1.0000 from the champion's 11.0000 to 12.0000, more than max_drop 0.5000"
    ]
    assert decide(
        ppl, None, GateSpec(task_floors={"lm": 11.5}), higher_is_better=False
    ).reasons == ["task lm scored 12.0000, above its ceiling 11.5000"]
    assert decide(ppl, None, GateSpec(min_acc=13.0), higher_is_better=False).accepted
    gate = GateSpec(max_forgetting=1.0, min_retention=0.85)
    d = decide(PPL_CAND, PPL_CHAMP, gate, higher_is_better=False, own_scores=PPL_OWN)
    assert d.reasons == [
        "task old2 rose 3.0000 from the champion's 12.0000 to 15.0000, more than max_forgetting 1.0000",
        "new task new keeps 0.8000 of its checkpoint's score (20.0000 vs its own 16.0000), below min_retention 0.8500",
    ]
    better = {"old1": 9.0, "old2": 12.5, "new": 17.0}  # old1 improved (lower), new keeps 0.94
    assert decide(better, PPL_CHAMP, gate, higher_is_better=False, own_scores=PPL_OWN).accepted


def test_normalized_and_forgetting_metrics() -> None:
    from mergeflow.evaluation import forgetting, gate_metrics, normalized

    assert normalized(CAND, OWN) == {
        "old1": pytest.approx(0.86 / 0.95),
        "old2": pytest.approx(0.62 / 0.85),
        "new": pytest.approx(0.8),
    }
    assert normalized(PPL_CAND, PPL_OWN, higher_is_better=False) == {"new": pytest.approx(0.8)}
    assert forgetting(CAND, CHAMP) == {"old1": pytest.approx(0.04), "old2": pytest.approx(0.18)}
    assert forgetting(PPL_CAND, PPL_CHAMP, higher_is_better=False) == {
        "old1": pytest.approx(0.5),
        "old2": pytest.approx(3.0),
    }
    m = gate_metrics("val", CAND, OWN, CHAMP)
    assert m == {
        "val/norm/old1": pytest.approx(0.86 / 0.95),
        "val/norm/old2": pytest.approx(0.62 / 0.85),
        "val/norm/new": pytest.approx(0.8),
        "val/norm_avg": pytest.approx((0.86 / 0.95 + 0.62 / 0.85 + 0.8) / 3),
        "val/forgetting/old1": pytest.approx(0.04),
        "val/forgetting/old2": pytest.approx(0.18),
        "val/forgetting_avg": pytest.approx(0.11),
    }
    assert gate_metrics("test", {"lm": 3.0}, {}) == {}  # headless: no normalized score


def test_each_method_of_a_portfolio_keeps_its_best_candidate_as_its_chain_head() -> None:
    gate = GateSpec(min_acc=0.55)
    scores = [
        {"a": 0.6, "b": 0.6},  # opcm 0.60, passes
        {"a": 0.9, "b": 0.8},  # task_arithmetic 0.85, passes: the overall choice
        {"a": 0.7, "b": 0.7},  # opcm 0.70, passes: opcm's head
        {"a": 0.5, "b": 0.5},  # weight_average 0.50, fails: still the head of its own chain
    ]
    methods = ["opcm", "task_arithmetic", "opcm", "weight_average"]
    assert choose(scores, gate).index == 1
    assert chain_heads(scores, methods, gate) == {
        "opcm": 2,
        "task_arithmetic": 1,
        "weight_average": 3,
    }
    # a passing candidate heads its chain before a failing one with a higher ACC
    floor = GateSpec(task_floors={"b": 0.65})
    assert chain_heads(scores[:3], methods[:3], floor) == {"opcm": 2, "task_arithmetic": 1}
    assert chain_heads([{"a": 0.95, "b": 0.6}, {"a": 0.7, "b": 0.7}], ["x", "x"], floor) == {"x": 1}
    # lower is better (perplexity), and no scores at all (no suite): the first of each method
    assert chain_heads(
        [{"p": 9.0}, {"p": 7.0}], ["x", "x"], GateSpec(), higher_is_better=False
    ) == {"x": 1}
    assert chain_heads([{}, {}, {}], ["x", "y", "x"], GateSpec()) == {"x": 0, "y": 1}


def test_select_candidate() -> None:
    gate = GateSpec(min_acc=0.55, task_floors={"b": 0.4})
    candidates = [
        {"a": 0.95, "b": 0.35},  # best ACC (0.65) but fails the floor on b
        {"a": 0.6, "b": 0.6},  # 0.60, passes
        {"a": 0.7, "b": 0.5},  # 0.60, passes, tied: the first listed wins
        {"a": 0.5, "b": 0.5},  # 0.50, fails min_acc
    ]
    assert select_candidate(candidates, gate) == 1
    assert select_candidate(candidates[2:], gate) == 0
    assert select_candidate(candidates, GateSpec(), None) == 0
    assert select_candidate([candidates[0], candidates[3]], gate) is None
    assert (
        select_candidate(candidates, GateSpec(max_drop=0.1), {"a": 0.9, "b": 0.9}) is None
    )  # all drop > 0.1
    floor_and_drop = GateSpec(max_drop=0.1, task_floors={"b": 0.4})
    assert (
        select_candidate(candidates, floor_and_drop, {"a": 0.7, "b": 0.6}) == 1
    )  # 0.50 drops 0.15
    assert (
        select_candidate(
            [{"lm": 12.0}, {"lm": 9.0}, {"lm": 9.0}], GateSpec(), higher_is_better=False
        )
        == 1
    )


def test_choose_keeps_the_best_passing_candidate_or_explains_the_best_failing_one() -> None:
    gate = GateSpec(min_acc=0.6)
    tables = [{"a": 0.5, "b": 0.6}, {"a": 0.7, "b": 0.7}, {"a": 0.9, "b": 0.9}]
    assert choose(tables, gate) == GateChoice(index=2, accepted=True, reasons=[])
    # none passes: the best by validation ACC (the first on ties), with its own reasons
    failing = [{"a": 0.2, "b": 0.2}, {"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}]
    assert choose(failing, gate) == GateChoice(
        index=1, accepted=False, reasons=["ACC 0.5000 over 2 tasks is below the minimum 0.6000"]
    )
    # lower is better (perplexity): the lowest fails least
    ppl = [{"lm": 30.0}, {"lm": 12.0}]
    got = choose(ppl, GateSpec(min_acc=10.0), higher_is_better=False)
    assert got == GateChoice(
        index=1, accepted=False, reasons=["ACC 12.0000 over 1 tasks is above the maximum 10.0000"]
    )
    assert choose(ppl, GateSpec(min_acc=20.0), higher_is_better=False).index == 1
    # a candidate without scores never wins over one with scores
    assert choose([{}, {"a": 0.1}], gate).index == 1
    # own scores reach every candidate's plasticity check
    plastic = GateSpec(min_retention=0.85)
    cands = [CAND, {**CAND, "new": 0.70}]
    assert choose(cands, plastic, CHAMP, own_scores=OWN) == GateChoice(
        index=1, accepted=True, reasons=[]
    )
    assert (
        choose(cands[:1], plastic, CHAMP, own_scores=OWN)
        .reasons[0]
        .startswith("new task new keeps 0.8000")
    )
    with pytest.raises(ValueError, match="at least one candidate"):
        choose([], gate)


# --- bad input ------------------------------------------------------------------------------
T = {"name": "t", "data": "d/{split}.npz"}


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        (TaskSpec, {**T, "data": "d/val.npz"}, "must contain '{split}' or be a mapping"),
        (TaskSpec, {**T, "data": {"validation": "v.npz"}}, r"data mapping lacks \['test'\]"),
        (
            TaskSpec,
            {**T, "metric": "f1"},
            r"metric 'f1' is neither one of \['accuracy', 'lm_eval', 'perplexity'\] nor 'module:function'",
        ),
        (TaskSpec, {**T, "name": "a:b"}, "task name 'a:b' must be non-empty and use only"),
        (TaskSpec, {**T, "head": "x"}, "Extra inputs are not permitted"),
        (EvaluationSuite, {"tasks": []}, "an evaluation suite needs at least one task"),
        (EvaluationSuite, {"tasks": [T, T]}, "task name 't' appears twice"),
        (
            EvaluationSuite,
            {"tasks": [T, {**T, "name": "u", "metric": "perplexity"}]},
            r"tasks mix higher-is-better \['t'\] and lower-is-better \['u'\]",
        ),
        (EvaluationSuite, {"tasks": [T], "batch_size": 0}, "greater than 0"),
        (GateSpec, {"max_drop": -0.1}, "greater than or equal to 0"),
        (GateSpec, {"max_forgetting": -0.1}, "greater than or equal to 0"),
        (GateSpec, {"min_retention": 0}, "greater than 0"),
        (GateSpec, {"min_acc": float("nan")}, "min_acc must be a number, not NaN"),
        (GateSpec, {"min_accuracy": 0.5}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(model: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        model.model_validate(kwargs)


def test_configs_are_frozen_and_yaml_friendly() -> None:
    suite = EvaluationSuite.model_validate(
        json.loads(
            json.dumps(
                {
                    "tasks": [
                        T,
                        {"name": "u", "checkpoint": "c", "data": {"validation": "v", "test": "t"}},
                    ]
                }
            )
        )
    )
    with pytest.raises(ValidationError, match="frozen"):
        suite.tasks[0].name = "x"  # type: ignore[misc]
    assert (
        suite.tasks[1].data_uri("test") == "t"
        and suite.tasks[0].data_uri("validation") == "d/validation.npz"
    )
    assert [t.name for t in suite.tasks_for([])] == ["t"] and [
        t.name for t in suite.tasks_for(["c"])
    ] == ["t", "u"]


def _bad_data(tmp_path: Path, arrays: dict[str, np.ndarray]) -> str:
    for split in ("validation", "test"):
        np.savez(tmp_path / f"bad-{split}.npz", **arrays)
    return str(tmp_path / "bad-{split}.npz")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: str(p / "none-{split}.npz"), "does not exist"),
        (
            lambda p: "s3://bucket/d-{split}.npz",
            "no reader for the s3:// scheme here; pass read_bytes",
        ),
        (lambda p: str(p / "d-{split}.csv"), "unknown format; use .npz, .safetensors or .parquet"),
        (
            lambda p: _bad_data(p, {"x": X}),
            "has no labels: expected an array named 'labels' or 'y'",
        ),
        (
            lambda p: _bad_data(p, {"labels": LABELS_A, "z": X}),
            "has no inputs: expected 'x' or one of",
        ),
        (
            lambda p: _bad_data(p, {"labels": LABELS_A, "x": X[:3]}),
            "'x' has 3 rows but labels has 4",
        ),
        (lambda p: _bad_data(p, {"labels": X, "x": X}), "labels must be a 1-D integer array"),
    ],
)
def test_data_errors(tmp_path: Path, setup, message: str) -> None:
    task = TaskSpec(name="t", checkpoint="ck-a", data=setup(tmp_path))
    with pytest.raises(ConfigError, match=message):
        ClassificationEvaluator(MLP_CONFIG).evaluate(backbone(IDENTITY), HEADS, [task], "test")


def test_corrupt_data_file(tmp_path: Path) -> None:
    for split in ("validation", "test"):
        (tmp_path / f"c-{split}.npz").write_bytes(b"not a zip file")
    task = TaskSpec(name="t", checkpoint="ck-a", data=str(tmp_path / "c-{split}.npz"))
    with pytest.raises(ConfigError, match="is not a valid npz file"):
        ClassificationEvaluator(MLP_CONFIG).evaluate(backbone(IDENTITY), HEADS, [task], "test")


def test_model_errors(mlp_tasks: list[TaskSpec]) -> None:
    ev = ClassificationEvaluator(MLP_CONFIG)
    with pytest.raises(
        ConfigError,
        match=r"head of checkpoint 'ck-b', which is not among the heads given \(\['ck-a'\]\); has that checkpoint been folded\?",
    ):
        ev.evaluate(backbone(IDENTITY), {"ck-a": HEADS["ck-a"]}, mlp_tasks, "test")
    extra = DictReader(
        {"layers.0.weight": torch.eye(2), "layers.0.bias": torch.zeros(2), "stray": torch.zeros(1)},
        "merged",
    )
    with pytest.raises(
        CheckpointError, match=r"checkpoint merged: tensors the model does not have: \['stray'\]"
    ):
        ClassificationEvaluator(MLP_CONFIG).evaluate(extra, HEADS, mlp_tasks, "test")
    short = DictReader({"layers.0.weight": torch.eye(2)}, "merged")
    with pytest.raises(
        CheckpointError,
        match=r"the model needs tensors that were not provided: \['layers.0.bias'\]",
    ):
        ClassificationEvaluator(MLP_CONFIG).evaluate(short, HEADS, mlp_tasks, "test")
    with pytest.raises(
        ConfigError, match=r"architecture 'resnet9' is not registered \(known: \['mlp'\]\)"
    ):
        ClassificationEvaluator({"mergeflow_architecture": "resnet9"}).evaluate(
            backbone(IDENTITY), HEADS, mlp_tasks, "test"
        )
    with pytest.raises(ConfigError, match="has neither 'model_type'"):
        ClassificationEvaluator({"hidden": 3}).evaluate(
            backbone(IDENTITY), HEADS, mlp_tasks, "test"
        )
    with pytest.raises(ConfigError, match="transformers has no architecture 'NoSuchModel'"):
        ClassificationEvaluator({"model_type": "bert", "architectures": ["NoSuchModel"]}).evaluate(
            backbone(IDENTITY), HEADS, mlp_tasks, "test"
        )


def test_perplexity_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="perplexity needs the model's tokenizer"):
        PerplexityEvaluator({"model_type": "gpt2"}, None)
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        load_tokenizer(b"{}")
    (tmp_path / "validation.txt").write_text("the")
    task = TaskSpec(name="lm", data=str(tmp_path / "{split}.txt"), metric="perplexity")
    ev = PerplexityEvaluator({"model_type": "gpt2", "n_positions": 8}, tiny_tokenizer())
    with pytest.raises(ConfigError, match="has fewer than 2 tokens"):
        ev.evaluate(DictReader({}), {}, [task], "validation")


def test_a_checkpoint_alone_is_split_into_the_base_names_and_its_head() -> None:
    from mergeflow.evaluation.own import own_key, split_checkpoint

    base = DictReader(
        {
            "layers.0.weight": torch.zeros(2, 2),
            "layers.0.bias": torch.ones(2),
            "steps": torch.tensor([3], dtype=torch.int64),
        },
        "base",
    )
    ck = DictReader(
        {
            "layers.0.weight": torch.eye(2, dtype=torch.float64),  # another dtype: the base's wins
            "steps": torch.tensor([9], dtype=torch.int64),  # an integer buffer: the base's is kept
            "classifier.weight": torch.eye(2),
            "classifier.bias": torch.zeros(2),
        },  # layers.0.bias missing: taken from the base, as a zero task vector
        "ck",
    )
    alone, head = split_checkpoint(base, ck)
    assert alone.keys() == base.keys() and alone.source == "ck"
    assert alone.get("layers.0.weight").dtype == torch.float32
    assert torch.equal(alone.get("layers.0.weight"), torch.eye(2))
    assert torch.equal(alone.get("layers.0.bias"), torch.ones(2))
    assert torch.equal(alone.get("steps"), torch.tensor([3]))
    assert set(head) == {"classifier.weight", "classifier.bias"}
    # a cached own score is reused only for the same task definition
    suite = EvaluationSuite(tasks=(TaskSpec(name="a", checkpoint="ck", data="d/{split}.npz"),))
    other = suite.tasks[0].model_copy(update={"data": "e/{split}.npz"})
    assert own_key(suite.tasks[0], suite) != own_key(other, suite)
    capped = suite.model_copy(update={"max_examples": 3})
    assert own_key(suite.tasks[0], suite) != own_key(suite.tasks[0], capped)
