"""Tokenizer files: reading a folder's vocabulary, and the files of a merged vocabulary.

Read with the ``tokenizers`` package (``transformers`` converts a folder that has no
``tokenizer.json``); used by :mod:`mergeflow.storage.vocab`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.merging.state import AddedToken, StateInfo, VocabInfo
from mergeflow.storage.checkpoints import OpenedCheckpoint, check_regular_files
from mergeflow.storage.hf_layout import CONFIG_FILE, MAX_JSON_BYTES
from mergeflow.storage.objects import ReadOnlyStore

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
SLOW_FILES = ("tokenizer.model", "vocab.json", "vocab.txt", "merges.txt")
UNION_FILES = (
    TOKENIZER_JSON,
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    *TEMPLATE_FILES,
    GENERATION_CONFIG,
)
"""The files of a merged model that follow its vocabulary (``vocab: union`` keeps its own)."""
VOCAB_DIR = "vocab"
ROWS_FILE = "rows.safetensors"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")

Folder = tuple[ReadOnlyStore, str]
"""A store and a prefix ending in ``/`` (or empty)."""


def _read(folder: Folder, name: str, label: str) -> bytes | None:
    store, prefix = folder
    if not store.exists(prefix + name):
        return None
    check_regular_files(store, [prefix + name], label)
    data = store.read_bytes(prefix + name)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(label, f"{name} is larger than {MAX_JSON_BYTES // 2**20} MiB")
    return data


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "aligning vocabularies reads tokenizers with the `tokenizers` package: pip install tokenizers"
        ) from None
    return tokenizers


def tokenizer_json(folder: Folder, label: str) -> bytes | None:
    """The folder's ``tokenizer.json``, else one transformers converts from its other
    tokenizer files; None when the folder has no tokenizer."""
    raw = _read(folder, TOKENIZER_JSON, label)
    if raw is not None:
        return raw
    names = (*SLOW_FILES, TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json")
    present = {n: d for n in names if (d := _read(folder, n, label)) is not None}
    if not any(n in present for n in SLOW_FILES):
        return None
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            label, "its tokenizer has no tokenizer.json, and reading it needs transformers"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        for n, data in present.items():
            (Path(tmp) / n).write_bytes(data)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(tmp)
            return str(tok.backend_tokenizer.to_str()).encode()
        except Exception as e:
            raise CheckpointError(
                label, f"its tokenizer cannot be read ({type(e).__name__}: {str(e)[:200]})"
            ) from None


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's vocabulary: token -> id, the next free id, and its added tokens' flags."""

    ids: dict[str, int]
    size: int
    flags: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes, label: str) -> Vocabulary:
        tk = _tokenizers()
        try:
            tok = tk.Tokenizer.from_str(raw.decode())
        except Exception as e:
            raise CheckpointError(
                label, f"tokenizer.json cannot be read ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        ids = dict(tok.get_vocab(with_added_tokens=True))
        flags = {t.content: t for t in tok.get_added_tokens_decoder().values()}
        return cls(ids, max(ids.values(), default=-1) + 1, flags)


def read_files(folder: Folder, label: str) -> dict[str, bytes]:
    """The folder's files of :data:`UNION_FILES` that exist, by name."""
    return {n: d for n in UNION_FILES if (d := _read(folder, n, label)) is not None}


def _json(files: dict[str, bytes], name: str, label: str) -> Any:
    """One of ``files`` parsed as a JSON object (None when absent)."""
    if name not in files:
        return None
    try:
        obj = json.loads(files[name])
    except ValueError as e:
        raise CheckpointError(label, f"{name} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(label, f"{name} is not a JSON object")
    return obj


def _template(files: dict[str, bytes], label: str) -> tuple[dict[str, bytes], Any]:
    """A folder's chat template: its template files, and tokenizer_config's ``chat_template``."""
    cfg = _json(files, TOKENIZER_CONFIG, label) or {}
    return {n: files[n] for n in TEMPLATE_FILES if n in files}, cfg.get("chat_template")


def union_files(
    folder: Folder | None,
    base: OpenedCheckpoint,
    ck: OpenedCheckpoint,
    cv: Vocabulary,
    introduced: list[AddedToken],
    v: VocabInfo,
) -> dict[str, bytes]:
    """The union's tokenizer files: the previous union's (else the base's) with the introduced
    tokens added; the chat template and generation config of this checkpoint when it has them."""
    tk = _tokenizers()
    files = read_files(folder, base.uri) if folder is not None and v.added else {}
    if not files:
        files = read_files((base.store, base.prefix), base.uri)
        raw = tokenizer_json((base.store, base.prefix), base.uri)
        assert raw is not None
        files[TOKENIZER_JSON] = raw
    tok = tk.Tokenizer.from_str(files[TOKENIZER_JSON].decode())
    specials = []
    for a in introduced:
        f = cv.flags.get(a.token)
        special = bool(f.special) if f is not None else False
        at = (
            tk.AddedToken(
                a.token,
                single_word=f.single_word,
                lstrip=f.lstrip,
                rstrip=f.rstrip,
                normalized=f.normalized,
                special=special,
            )
            if f is not None
            else tk.AddedToken(a.token, normalized=True, special=False)
        )
        (tok.add_special_tokens if special else tok.add_tokens)([at])
        got = tok.token_to_id(a.token)
        if got != a.row:
            raise CheckpointError(
                ck.uri,
                f"the merged tokenizer gave new token {a.token!r} id {got}, not its row {a.row}",
            )
        if special:
            specials.append(a.token)
    files[TOKENIZER_JSON] = tok.to_str().encode()
    cfg = _json(files, TOKENIZER_CONFIG, base.uri)
    if cfg is not None:
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            for a in introduced:
                f = cv.flags.get(a.token)
                cfg["added_tokens_decoder"][str(a.row)] = {
                    "content": a.token,
                    "lstrip": bool(f and f.lstrip),
                    "normalized": bool(f.normalized) if f else True,
                    "rstrip": bool(f and f.rstrip),
                    "single_word": bool(f and f.single_word),
                    "special": a.token in specials,
                }
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(cfg.get(key), list):
                cfg[key] = [*cfg[key], *(t for t in specials if t not in cfg[key])]
    mine = read_files((ck.store, ck.prefix), ck.uri)
    tpl, cfg_tpl = _template(mine, ck.uri)
    if tpl or cfg_tpl is not None:
        for n in TEMPLATE_FILES:
            files.pop(n, None)
        files.update(tpl)
        if cfg is not None:
            cfg.pop("chat_template", None)
            if cfg_tpl is not None:
                cfg["chat_template"] = cfg_tpl
    if cfg is not None:
        files[TOKENIZER_CONFIG] = json.dumps(cfg, indent=2, ensure_ascii=False).encode()
    if GENERATION_CONFIG in mine:
        files[GENERATION_CONFIG] = _remap_generation(mine, cv, files, ck.uri)
    return files


def _remap_generation(
    mine: dict[str, bytes], cv: Vocabulary, files: dict[str, bytes], label: str
) -> bytes:
    """A checkpoint's generation config with its token ids renumbered to the merged vocabulary
    (an id the merged vocabulary lacks is dropped)."""
    gen = _json(mine, GENERATION_CONFIG, label)
    merged = Vocabulary.parse(files[TOKENIZER_JSON], label).ids
    token_of = {i: t for t, i in cv.ids.items()}

    def one(i: Any) -> Any:
        if not isinstance(i, int) or i not in token_of:
            return None
        return merged.get(token_of[i])

    for key in TOKEN_ID_KEYS:
        value = gen.get(key)
        if value is None:
            continue
        mapped = [one(i) for i in value] if isinstance(value, list) else one(value)
        if mapped is None or (isinstance(mapped, list) and None in mapped):
            gen.pop(key)
        else:
            gen[key] = mapped
    return json.dumps(gen, indent=2).encode()


def model_files(info: StateInfo, base: OpenedCheckpoint, folder: Folder | None) -> dict[str, bytes]:
    """The small files of a merged model: the base's, with the union's tokenizer files and the
    config's ``vocab_size`` when the vocabulary grew."""
    files = {n: base.store.read_bytes(base.prefix + n) for n in base.small_files()}
    v = info.vocab
    if v is None or not v.added or folder is None:
        return files
    for n in UNION_FILES:
        files.pop(n, None)
    files.update(read_files(folder, info.base.uri))
    cfg = _json(files, CONFIG_FILE, info.base.uri)
    if cfg is not None:
        for c in (cfg, cfg.get("text_config")):
            if isinstance(c, dict) and "vocab_size" in c:
                c["vocab_size"] = v.merged_rows
        files[CONFIG_FILE] = json.dumps(cfg, indent=2).encode()
    return files
