"""Every LoRA variant PEFT writes folds like PEFT's own ``merge_and_unload()``, or is refused by name.

Each handled variant: a tiny model, a PEFT model with that config and random adapter weights
(DoRA magnitudes and trained biases included), saved as an adapter; ``task_arithmetic`` with
``scale=1.0`` of the adapter must equal the same merge of the saved ``merge_and_unload()`` model.
Each refused option: the one-line error names it and nothing is written. An adapter of a
fine-tune that added tokens (embeddings resized) folds like its ``merge_and_unload()`` model
saved with the grown tokenizer, under ``vocab: base`` and ``vocab: union``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.models import tiny_bert
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=50,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2Model(cfg)


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg)


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, make in MODELS.items():
        make().save_pretrained(root / name)
        out[name] = root / name
    return out


def adapter_and_dense(
    model: str, base: Path, tmp_path: Path, seed: int = 5, **config: Any
) -> tuple[Path, Path]:
    """A PEFT adapter with random trained weights, and its merge_and_unload() saved dense."""
    pm = peft.get_peft_model(
        transformers.AutoModel.from_pretrained(base), peft.LoraConfig(r=4, lora_alpha=8, **config)
    )
    return trained_and_saved(pm, tmp_path, seed)


def trained_and_saved(pm: Any, tmp_path: Path, seed: int, tok: Any = None) -> tuple[Path, Path]:
    """``pm`` with random trained weights, saved as an adapter and merged dense (with ``tok``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():  # trained: A, B, DoRA m, lora_B biases, biases, modules
            noise = torch.randn(p.shape, generator=g)
            if "magnitude" in n:
                p.mul_(1 + 0.1 * noise)
            elif "lora_" in n:
                p.copy_(0.05 * noise)
            elif p.requires_grad:
                p.add_(0.02 * noise)
    adir, ddir = tmp_path / "adapter", tmp_path / "dense"
    with warnings.catch_warnings():  # a resized vocabulary: PEFT saves the embedding layers
        warnings.simplefilter("ignore")
        pm.save_pretrained(adir)
        pm.merge_and_unload().save_pretrained(ddir)
    if tok is not None:
        tok.save_pretrained(adir)
        tok.save_pretrained(ddir)
    return adir, ddir


def merged(cli, base: Path, ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    r = cli(
        "merge", "--base", base, "--method", "task_arithmetic", "--param", "scale=1.0",
        "--out", out, ckpt,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return load_file(str(out / "model.safetensors"))


def assert_folds_exactly(cli, base: Path, adir: Path, ddir: Path, tmp_path: Path) -> None:
    ta = merged(cli, base, adir, tmp_path / "out_a")
    td = merged(cli, base, ddir, tmp_path / "out_d")
    b = load_file(str(base / "model.safetensors"))
    assert ta.keys() == td.keys()
    changed = 0
    for k in td:
        err = float((ta[k].double() - td[k].double()).norm() / max(float(td[k].norm()), 1e-12))
        assert err < 1e-5, (k, err)
        changed += not torch.equal(td[k], b[k])
    assert changed  # the adapter did something


@pytest.mark.parametrize(
    "model, config",
    [
        ("bert", {"target_modules": ["query", "value", "dense", "word_embeddings"]}),
        ("bert", {"target_modules": ["query", "value"], "use_rslora": True}),
        (
            "bert",
            {
                "target_modules": ["query", "value", "dense"],
                "rank_pattern": {"value": 2, r"layer\.1\.attention\.self\.query": 6},
                "alpha_pattern": {"dense": 3.0, "query": 5},
            },
        ),
        ("bert", {"target_modules": ["query", "dense", "word_embeddings"], "use_dora": True}),
        (
            "bert",
            {
                "target_modules": ["query", "value"],
                "use_dora": True,
                "use_rslora": True,
                "rank_pattern": {"value": 2},
            },
        ),
        ("bert", {"target_modules": ["query", "dense"], "lora_bias": True}),
        ("bert", {"target_modules": ["query"], "bias": "all"}),
        ("bert", {"target_modules": ["query", "value"], "bias": "all", "lora_bias": True}),
        ("bert", {"target_modules": ["query", "key"], "bias": "lora_only"}),
        ("bert", {"target_modules": ["query"], "modules_to_save": ["pooler.dense"]}),
        (
            "bert",
            {
                "target_modules": ["query", "value"],
                "layers_to_transform": [1],
                "layers_pattern": "layer",
            },
        ),
        ("bert", {"target_modules": ["query", "dense"], "exclude_modules": ["pooler.dense"]}),
        ("bert", {"target_modules": ["query"], "lora_dropout": 0.1, "init_lora_weights": False}),
        ("bert", {"target_modules": ["query", "value"], "init_lora_weights": "mica"}),
        ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
        ("gpt2", {"target_modules": ["c_attn", "c_proj"]}),  # PEFT turns fan_in_fan_out on
        ("bert", {"target_modules": ["query", "dense"], "fan_in_fan_out": True}),  # and off
        ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc", "wte"], "use_dora": True}),
        ("llama", {"target_modules": ["q_proj", "embed_tokens"]}),  # with embed's base_layer
    ],
    ids=[
        "plain+embedding",
        "rslora",
        "rank_alpha_pattern",
        "dora+embedding",
        "dora+rslora+rank_pattern",
        "lora_bias",
        "bias_all",
        "bias_all+lora_bias",
        "bias_lora_only",
        "modules_to_save",
        "layers_to_transform",
        "exclude_modules",
        "init_false",
        "init_mica",
        "gpt2_fan_in_fan_out",
        "gpt2_fan_in_fan_out_unset",
        "bert_fan_in_fan_out_set",
        "gpt2_dora_fan_in_fan_out",
        "llama_embedding",
    ],
)
def test_handled_variant_folds_like_merge_and_unload(cli, bases, tmp_path, model, config):
    adir, ddir = adapter_and_dense(model, bases[model], tmp_path, **config)
    assert_folds_exactly(cli, bases[model], adir, ddir, tmp_path)


def test_dora_is_not_folded_as_plain_lora(cli, bases, tmp_path):
    """The old corruption: DoRA magnitudes dropped. Folded as plain LoRA it would be far off."""
    adir, ddir = adapter_and_dense(
        "bert", bases["bert"], tmp_path, target_modules=["query"], use_dora=True
    )
    ta = merged(cli, bases["bert"], adir, tmp_path / "out_a")
    k = "encoder.layer.0.attention.self.query.weight"
    a = load_file(str(adir / "adapter_model.safetensors"))
    pre = "base_model.model.encoder.layer.0.attention.self.query."
    w = load_file(str(bases["bert"] / "model.safetensors"))[k]
    v = w + 2.0 * a[pre + "lora_B.weight"] @ a[pre + "lora_A.weight"]
    by_hand = (a[pre + "lora_magnitude_vector"] / v.norm(dim=1)).unsqueeze(1) * v
    assert torch.allclose(ta[k], by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ta[k], v, atol=1e-3)
    assert torch.allclose(ta[k], load_file(str(ddir / "model.safetensors"))[k], atol=1e-6)


@pytest.fixture
def plain_adapter(bases, tmp_path) -> Path:
    adir, _ = adapter_and_dense(
        "bert", bases["bert"], tmp_path, target_modules=["query", "value"], use_dora=True
    )
    return adir


def refused(cli, bases, tmp_path, adir: Path, base: Path | None = None) -> str:
    out = tmp_path / "o"
    base = base or bases["bert"]
    r = cli("merge", "--base", base, "--method", "task_arithmetic", "--out", out, adir)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert not out.exists()
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def set_config(adir: Path, **changes: Any) -> None:
    p = adir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_qalora", True),
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("layer_replication", [[0, 2], [1, 2]]),
        ("target_parameters", ["experts.gate_up_proj"]),
        ("trainable_token_indices", [1, 2]),
        ("alora_invocation_tokens", [7, 8]),
        ("arrow_config", {"top_k": 2}),
        ("velora_config", {"rank": 2}),
        ("monteclora_config", {"n": 2}),
        ("kasa_config", {"beta": 0.1}),
        ("use_bdlora", {"nblocks": 2}),
        ("ensure_weight_tying", True),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "pissa_niter_4"),
        ("init_lora_weights", "olora"),
        ("init_lora_weights", "corda"),
        ("init_lora_weights", "loftq"),
        ("init_lora_weights", "lora_ga"),
        ("bias", "some"),
        ("use_dora", "yes"),
        ("use_rslora", 1),
        ("lora_bias", True),
        ("merge_weights", True),
        ("enable_lora", [True, False, True]),
    ],
)
def test_refused_option_is_named(cli, bases, tmp_path, plain_adapter, key, value):
    set_config(plain_adapter, **{key: value})
    err = refused(cli, bases, tmp_path, plain_adapter)
    assert key in err and str(plain_adapter) in err


def test_other_adapter_types_are_refused_by_name(cli, bases, tmp_path, plain_adapter):
    for kind in ("IA3", "LOHA", "LOKR", "ADALORA", "VERA"):
        set_config(plain_adapter, peft_type=kind)
        assert f"adapter type {kind!r} is not supported" in refused(
            cli, bases, tmp_path, plain_adapter
        )


def test_dora_magnitudes_without_use_dora_are_refused(cli, bases, tmp_path, plain_adapter):
    set_config(plain_adapter, use_dora=False)
    err = refused(cli, bases, tmp_path, plain_adapter)
    assert "lora_magnitude_vector" in err and "use_dora" in err


def test_use_dora_without_magnitudes_is_refused(cli, bases, tmp_path, plain_adapter):
    f = plain_adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "magnitude" not in k}, str(f))
    assert "no lora_magnitude_vector" in refused(cli, bases, tmp_path, plain_adapter)


def test_rank_pattern_that_does_not_fit_the_weights_is_refused(cli, bases, tmp_path, plain_adapter):
    set_config(plain_adapter, rank_pattern={"value": 2})
    err = refused(cli, bases, tmp_path, plain_adapter)
    assert "rank_pattern" in err and "value" in err


def test_unknown_lora_tensor_is_refused(cli, bases, tmp_path, plain_adapter):
    f = plain_adapter / "adapter_model.safetensors"
    t = load_file(str(f))
    t["base_model.model.encoder.layer.0.attention.self.query.lora_velora_embed"] = torch.zeros(2)
    save_file(t, str(f))
    assert "lora_velora_embed" in refused(cli, bases, tmp_path, plain_adapter)


def test_lora_bias_on_a_layer_without_bias_is_refused(cli, tmp_path):
    base = tmp_path / "base"
    m = tiny_bert()
    sd = {
        k: v for k, v in m.state_dict().items() if k != "encoder.layer.0.attention.self.query.bias"
    }
    base.mkdir()
    save_file(sd, str(base / "model.safetensors"))
    adir = tmp_path / "adapter"
    adir.mkdir()
    (adir / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_bias": True})
    )
    pre = "base_model.model.encoder.layer.0.attention.self.query."
    save_file(
        {
            pre + "lora_A.weight": torch.ones(2, 16),
            pre + "lora_B.weight": torch.ones(16, 2),
            pre + "lora_B.bias": torch.ones(16),
        },
        str(adir / "adapter_model.safetensors"),
    )
    out = tmp_path / "o"
    r = cli("merge", "--base", base, "--method", "task_arithmetic", "--out", out, adir)
    assert r.returncode == 2 and "lora_bias" in r.stderr and "no bias" in r.stderr, r.stderr
    assert not out.exists()


def test_unset_options_of_newer_peft_versions_are_accepted_and_set_ones_refused():
    """PEFT writes every LoraConfig field; newer versions add fields left unset (None, False,
    empty) unless used, which change nothing; a set one mergeflow does not know is refused."""
    from mergeflow.errors import CheckpointError
    from mergeflow.storage.lora import check_config

    for unset in (None, False, [], {}, ""):
        check_config({"peft_type": "LORA", "r": 4, "future_config": unset}, "ck")
    with pytest.raises(CheckpointError, match="sets future_config=\\{'a': 1\\}, an option"):
        check_config({"peft_type": "LORA", "r": 4, "future_config": {"a": 1}}, "ck")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_vocab import _base

    return _base(tmp_path_factory.mktemp("llama") / "base")


ADDED = ["newword", "<|im_start|>"]
GROWN = {
    "modules_to_save": {
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["embed_tokens", "lm_head"],
    },
    "lora_on_embeddings": {"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
}

NOTES = {
    "base": "2 new token(s) left out (vocab: base): 'newword', '<|im_start|>'",
    "union": "2 token(s) added to the vocabulary (vocab: union): 'newword', '<|im_start|>'",
}


def added_tokens_adapter(base: Path, tmp_path: Path, config: dict[str, Any]) -> tuple[Path, Path]:
    """A fine-tune whose tokenizer adds ``ADDED`` (embeddings resized, new rows random) as a PEFT
    adapter, and its merge_and_unload(); both with the grown tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    tok.add_tokens(ADDED[:1])
    tok.add_special_tokens({"additional_special_tokens": ADDED[1:]})
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            m.weight[-2:] = torch.randn(
                m.weight[-2:].shape, generator=torch.Generator().manual_seed(9)
            )
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **config))
    return trained_and_saved(pm, tmp_path, 6, tok)


@pytest.mark.parametrize("policy", ["base", "union"])
@pytest.mark.parametrize("kind", sorted(GROWN))
def test_adapter_that_adds_tokens_folds_like_its_merged_model(cli, llama, tmp_path, kind, policy):
    from test_vocab import EMBED, HEAD, V

    adir, ddir = added_tokens_adapter(llama, tmp_path, GROWN[kind])
    written = load_file(str(adir / "adapter_model.safetensors"))
    grown = "original_module" if kind == "modules_to_save" else "base_layer"
    assert any(grown in k and t.shape[0] == V + 2 for k, t in written.items())  # what PEFT writes
    outs = {}
    for name, ck in (("a", adir), ("d", ddir)):
        outs[name] = tmp_path / f"out_{name}"
        r = cli(
            "merge", "--base", llama, "--method", "task_arithmetic", "--param", "scale=1.0",
            "--vocab", policy, "--no-progress", "--out", outs[name], ck,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert NOTES[policy] in r.stderr, r.stderr
    ta, td = (load_file(str(outs[n] / "model.safetensors")) for n in ("a", "d"))
    assert ta.keys() == td.keys()
    for k in td:
        torch.testing.assert_close(ta[k], td[k], rtol=1e-5, atol=1e-6)
    dense = load_file(str(ddir / "model.safetensors"))
    rows = V if policy == "base" else V + 2
    for k in (EMBED, HEAD):  # scale 1.0: the merged model is the fine-tune's, row for row
        assert ta[k].shape[0] == rows
        torch.testing.assert_close(ta[k], dense[k][:rows], rtol=1e-5, atol=1e-6)
    for name in ("tokenizer.json", "config.json"):
        assert (outs["a"] / name).read_bytes() == (outs["d"] / name).read_bytes(), name


def _edit(change: Any) -> Any:
    """An edit of an adapter folder: each tensor replaced by ``change(name, tensor)``."""

    def edit(adir: Path) -> None:
        f = adir / "adapter_model.safetensors"
        save_file({k: change(k, t).contiguous() for k, t in load_file(str(f)).items()}, str(f))

    return edit


def _add(adir: Path, more: dict[str, torch.Tensor]) -> None:
    f = adir / "adapter_model.safetensors"
    save_file(load_file(str(f)) | more, str(f))


def _unlink(*names: str) -> Any:
    return lambda adir: [(adir / n).unlink() for n in names]


O_PROJ = "base_model.model.model.layers.0.self_attn.o_proj.modules_to_save.weight"
VOCAB = ("embed_tokens", "lm_head")
WRONG = {
    "other_columns": (
        _edit(lambda k, t: t[:, :8] if "lm_head" in k else t),
        "replaces 'lm_head.weight' with shape [22, 8] but the base has [20, 16]",
    ),
    "fewer_rows_than_tokens": (
        _edit(lambda k, t: t[:21] if any(m in k for m in VOCAB) else t),
        "its tokenizer has token '<|im_start|>' at id 21, but its vocabulary tensors have 21 rows",
    ),
    "embedding_and_head_disagree": (
        _edit(lambda k, t: torch.cat([t, t[:1]]) if "embed_tokens" in k else t),
        "its vocabulary tensors disagree on their rows",
    ),
    "resized_non_vocabulary_tensor": (
        lambda adir: _add(adir, {O_PROJ: torch.zeros(17, 16)}),
        f"adapter tensor {O_PROJ!r} replaces 'model.layers.0.self_attn.o_proj.weight' with shape "
        "[17, 16] but the base has [16, 16] (only vocabulary tensors may be resized)",
    ),
    "no_tokenizer": (
        _unlink("tokenizer.json", "tokenizer_config.json"),
        "have 22 rows, more than the base's 20, and it carries no tokenizer",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrongly_shaped_grown_tensors_are_refused_by_name(cli, bases, llama, tmp_path, case):
    adir, _ = added_tokens_adapter(llama, tmp_path, GROWN["modules_to_save"])
    edit, message = WRONG[case]
    edit(adir)
    err = refused(cli, bases, tmp_path, adir, llama)
    assert message in err and str(adir) in err, err
