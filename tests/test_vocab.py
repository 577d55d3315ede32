"""Vocabulary rows aligned by token (issue 21): checkpoints that add tokens, reorder the base's,
share new tokens or carry no tokenizer, on a tiny Llama with a WordLevel tokenizer built here."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli import Result
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "foo", "bar", "baz", "qux", "red", "green"]
WORDS += ["blue", "one", "two", "three", "four", "five", "six", "seven", "eight"]
V = len(WORDS)  # 20 rows; hidden size 16
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"


def _tokenizer(words: Sequence[str] = WORDS) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _base(folder: Path, tied: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _finetune(
    base: Path,
    folder: Path,
    seed: int,
    *,
    add: Sequence[str] = (),
    special: Sequence[str] = (),
    order: Sequence[int] | None = None,
    tokenizer: bool = True,
    template: str | None = None,
) -> Path:
    """A fine-tune of ``base``: every weight moved a little; ``add``/``special`` tokens appended
    (new rows random); ``order``: the base's tokens renumbered (row j is the base's token
    ``order[j]``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        if add or special:
            tok.add_tokens(list(add))
            tok.add_special_tokens({"additional_special_tokens": list(special)})
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            for m in (model.get_input_embeddings(), model.get_output_embeddings()):
                w = m.weight
                w[V:] = torch.randn(w[V:].shape, generator=g)
        if order is not None:
            idx = torch.tensor(list(order))
            for m in (model.get_input_embeddings(), model.get_output_embeddings()):
                m.weight.copy_(m.weight[idx])
            tok = _tokenizer([WORDS[i] for i in order])
    if template is not None:
        tok.chat_template = template
    model.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder


def _strip(ck: Path, folder: Path) -> Path:
    """The same checkpoint with its new rows removed (and no tokenizer)."""
    tensors = load_file(ck / "model.safetensors")
    for k in (EMBED, HEAD):
        if k in tensors:
            tensors[k] = tensors[k][:V].contiguous()
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((ck / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"vocab_size": V}))
    return folder


def _merge(
    cli: Callable[..., Result], base: Path, out: Path, cks: Sequence[Path], *args: str
) -> Result:
    r = cli("merge", "--base", base, "--out", out, "--no-progress", "--device", "cpu", *args, *cks)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    base = _base(root / "base")
    m = {"base": base}
    m["ck1"] = _finetune(base, root / "ck1", 1)
    m["ck2"] = _finetune(base, root / "ck2", 2)
    m["added"] = _finetune(base, root / "added", 2, add=["newword"], special=["<|im_start|>"])
    m["stripped"] = _strip(m["added"], root / "stripped")
    m["reordered"] = _finetune(base, root / "reordered", 2, order=[*range(V)][::-1])
    m["a"] = _finetune(base, root / "a", 3, add=["newword", "alpha"])
    m["b"] = _finetune(base, root / "b", 4, add=["beta", "newword"])
    return m


@pytest.mark.parametrize("policy", ["base", "union"])
def test_added_tokens_fold_under_both_policies(
    cli: Callable[..., Result], models: dict[str, Path], tmp_path: Path, policy: str
) -> None:
    from transformers import AutoTokenizer

    ref, out = tmp_path / "ref", tmp_path / "out"
    _merge(cli, models["base"], ref, [models["ck1"], models["stripped"]], "--method", "opcm")
    r = _merge(
        cli,
        models["base"],
        out,
        [models["ck1"], models["added"]],
        "--method",
        "opcm",
        "--vocab",
        policy,
    )
    want, got = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for k, t in want.items():  # the base vocabulary's rows fold as without the new rows
        torch.testing.assert_close(
            got[k][:V] if k in (EMBED, HEAD) else got[k], t, rtol=1e-5, atol=1e-6
        )
    summary = json.loads((out / "mergeflow.json").read_text())["vocab"]
    ck = str(models["added"])
    if policy == "base":
        assert got[EMBED].shape[0] == V
        assert "2 new token(s) left out (vocab: base): 'newword', '<|im_start|>'" in r.stderr
        assert summary["left_out"] == {ck: ["newword", "<|im_start|>"]}
        assert AutoTokenizer.from_pretrained(out)("newword")["input_ids"] == [0]  # <unk>
        return
    added = load_file(models["added"] / "model.safetensors")
    for k in (EMBED, HEAD):  # the new rows are the introducing checkpoint's
        assert got[k].shape[0] == V + 2
        torch.testing.assert_close(got[k][V:], added[k][V:], rtol=0, atol=0)
    assert "2 token(s) added to the vocabulary (vocab: union)" in r.stderr
    assert [a["token"] for a in summary["added"]] == ["newword", "<|im_start|>"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == V + 2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello newword <|im_start|> world")["input_ids"] == [3, V, V + 1, 4]
    assert tok.convert_ids_to_tokens([V, V + 1]) == ["newword", "<|im_start|>"]

    # the same through a resumable state: init records the policy, the state grows by the rows
    st, exported = tmp_path / "st", tmp_path / "exported"
    common = ("--no-progress", "--device", "cpu")
    init = ("state", "init", "--state", st, "--base", models["base"], "--method", "opcm")
    assert cli(*init, "--vocab", "union").returncode == 0
    assert cli("state", "fold", "--state", st, *common, models["ck1"]).returncode == 0
    r = cli("state", "fold", "--state", st, *common, models["added"])
    assert r.returncode == 0 and "2 token(s) added" in r.stderr
    state = load_file(next((st / "tensors").glob("step-*")) / "model.safetensors")
    assert state[EMBED].shape[0] == V + 2 and not state[EMBED][V:].any()
    assert cli("state", "export", "--state", st, "--out", exported, *common).returncode == 0
    for k, t in load_file(exported / "model.safetensors").items():
        assert torch.equal(t, got[k]), k
    assert AutoTokenizer.from_pretrained(exported)("newword")["input_ids"] == [V]
    # a later checkpoint without the new tokens: their rows and the union's tokenizer carry on
    assert cli("state", "fold", "--state", st, *common, models["ck2"]).returncode == 0
    assert len(list((st / "tensors").glob("step-*"))) == 1  # in place: the parent's removed
    later = tmp_path / "later"
    assert cli("state", "export", "--state", st, "--out", later, *common).returncode == 0
    for k in (EMBED, HEAD):
        torch.testing.assert_close(
            load_file(later / "model.safetensors")[k][V:], added[k][V:], rtol=0, atol=0
        )
    assert (later / "tokenizer.json").read_bytes() == (exported / "tokenizer.json").read_bytes()
    shown = json.loads(cli("state", "show", "--state", st).stdout)["vocab"]
    assert shown["rows"] == V + 2 and shown["policy"] == "union"


def test_reordered_tokenizer_merges_as_an_aligned_one(
    cli: Callable[..., Result], models: dict[str, Path], tmp_path: Path
) -> None:
    plain = load_file(models["ck2"] / "model.safetensors")
    shuffled = load_file(models["reordered"] / "model.safetensors")
    assert not torch.equal(plain[EMBED], shuffled[EMBED])  # by index the rows would mix tokens
    a, b = tmp_path / "a", tmp_path / "b"
    _merge(cli, models["base"], a, [models["ck1"], models["ck2"]], "--method", "opcm")
    _merge(cli, models["base"], b, [models["ck1"], models["reordered"]], "--method", "opcm")
    want, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k, t in want.items():
        torch.testing.assert_close(got[k], t, rtol=1e-6, atol=1e-7)


def test_two_checkpoints_adding_one_token_share_its_row(
    cli: Callable[..., Result], models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    _merge(
        cli,
        models["base"],
        out,
        [models["a"], models["b"]],
        "--method",
        "task_arithmetic",
        "--vocab",
        "union",
    )
    got = load_file(out / "model.safetensors")
    a, b = (
        load_file(models["a"] / "model.safetensors"),
        load_file(models["b"] / "model.safetensors"),
    )
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == V + 3
    assert tok("newword alpha beta")["input_ids"] == [V, V + 1, V + 2]
    for k in (EMBED, HEAD):
        assert got[k].shape[0] == V + 3
        # newword: a introduced it (a's row is its base value), b's vector folds on it
        torch.testing.assert_close(got[k][V], a[k][V] + 0.3 * (b[k][V + 1] - a[k][V]))
        torch.testing.assert_close(got[k][V + 1], a[k][V + 1], rtol=0, atol=0)  # alpha: only a
        torch.testing.assert_close(got[k][V + 2], b[k][V], rtol=0, atol=0)  # beta: only b


def test_tied_embeddings_are_merged_and_written_once(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _base(tmp_path / "base", tied=True)
    weights = load_file(base / "model.safetensors")
    assert HEAD not in weights  # save_pretrained writes a tied head once; store it twice anyway
    save_file(
        weights | {HEAD: weights[EMBED].clone()}, str(base / "model.safetensors"), {"format": "pt"}
    )
    ck1 = _finetune(base, tmp_path / "ck1", 1)
    chat = _finetune(base, tmp_path / "chat", 2, special=["<|im_start|>"], template=TEMPLATE)
    out = tmp_path / "out"
    _merge(cli, base, out, [ck1, chat], "--method", "opcm", "--vocab", "union")
    got = load_file(out / "model.safetensors")
    assert HEAD not in got and got[EMBED].shape[0] == V + 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), got[EMBED], rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == TEMPLATE
    assert (out / "generation_config.json").exists()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [V, 3]
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 5)


def test_larger_vocab_without_tokenizer_is_refused(
    cli: Callable[..., Result], models: dict[str, Path], tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        (bare / name).write_bytes((models["added"] / name).read_bytes())
    out = tmp_path / "out"
    r = cli(
        "merge", "--base", models["base"], "--method", "opcm", "--out", out, "--no-progress", bare
    )
    assert r.returncode == 2
    assert (
        f"checkpoint {bare}: its vocabulary tensors ({EMBED}, {HEAD}) have {V + 2} rows" in r.stderr
    )
    assert "more than the base's 20, and it carries no tokenizer" in r.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bare"]


@pytest.mark.parametrize("dask", [False, True])
def test_a_lineage_folds_and_exports_the_union(
    cli: Callable[..., Result], models: dict[str, Path], tmp_path: Path, dask: bool
) -> None:
    """The lineage's tasks (without Prefect; one process, or the Dask path's group tasks)
    validate, fold and export as the CLI merges."""
    pytest.importorskip("prefect")
    from mergeflow.lineage import DaskSpec, LineageSpec
    from mergeflow.tasks import layout
    from mergeflow.tasks.dask import commit_groups, fold_group, plan_groups
    from mergeflow.tasks.fold import export_model, fold_checkpoint, validate_checkpoint
    from mergeflow.tasks.lineage import ensure_init_state
    from mergeflow.tasks.values import CheckpointRef, ParentState

    spec = LineageSpec(
        name="chat",
        base=str(models["base"]),
        sources=(str(tmp_path),),
        store=str(tmp_path / "lineage"),
        method="task_arithmetic",
        vocab="union",
        dask=DaskSpec(groups=3) if dask else None,
    )
    uri = ensure_init_state(spec)
    for step, name in enumerate(["a", "b"], 1):
        ck = validate_checkpoint.fn(spec, CheckpointRef(id=name, uri=str(models[name])))
        parent = ParentState(version=None, state_uri=uri, step=step - 1)
        prefix = layout.new_prefix(spec, step)
        if dask:
            plan = plan_groups.fn(spec, parent, ck, parent.params, prefix)
            results = [fold_group.fn(spec, ck, plan, i) for i in range(len(plan.groups))]
            fold = commit_groups.fn(spec, ck, plan, results, "main", prefix)
        else:
            fold = fold_checkpoint.fn(spec, parent, ck, "main", parent.params, prefix)
        uri = fold.state_uri
    folder = Path(export_model.fn(spec, fold).model_uri.removeprefix("file://"))
    ref = tmp_path / "ref"
    _merge(
        cli,
        models["base"],
        ref,
        [models["a"], models["b"]],
        "--method",
        "task_arithmetic",
        "--vocab",
        "union",
    )
    got, want = load_file(folder / "model.safetensors"), load_file(ref / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for name in ("tokenizer.json", "config.json"):
        assert (folder / name).read_bytes() == (ref / name).read_bytes(), name
    added = json.loads((folder / "mergeflow.json").read_text())["vocab"]["added"]
    assert [(a["token"], a["checkpoint"]) for a in added] == [
        ("newword", "a"),
        ("alpha", "a"),
        ("beta", "b"),
    ]


def test_lineage_spec_chooses_the_policy() -> None:
    pytest.importorskip("prefect")
    from mergeflow.lineage import IMMUTABLE, LineageSpec

    text = "name: chat\nbase: /m/base\nsources: [/src]\nstore: /st\n"
    spec = LineageSpec.from_yaml_text(text + "vocab: union\n")
    assert spec.fold_options().vocab == "union"
    assert LineageSpec.from_yaml_text(spec.to_yaml()) == spec
    assert LineageSpec.from_yaml_text(text).fold_options().vocab == "base"
    with pytest.raises(Exception, match="vocab"):
        LineageSpec.from_yaml_text(text + "vocab: all\n")
    assert "vocab" in IMMUTABLE
