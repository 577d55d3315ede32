"""Vocabulary rows aligned by token, through the tokenizers of the base and of each checkpoint.

A state with vocabulary tensors (:class:`~mergeflow.merging.state.VocabInfo`: the input
embedding and the output head) folds a checkpoint through readers that present its rows in
the merged vocabulary's order (:class:`~mergeflow.merging.vocab.RowsReader`), so every method
folds them unchanged:

- the base's rows come first, each taken from the checkpoint's row of the same token (a
  reordered tokenizer is aligned); a base token the checkpoint lacks keeps the base's row;
- tokens the checkpoint adds are left out (``vocab: base``) or appended (``vocab: union``) in
  the order they are first seen (by step, then by the introducer's id), after the base
  tokenizer's last id; their base value is the introducer's row, kept beside the state
  tensors in ``vocab/rows.safetensors`` with the union's tokenizer files, so the state grows
  by those rows only. A token two checkpoints add has one row.
- a checkpoint without a tokenizer (or a base without one) folds by index when its rows
  match the base's, and is refused when it has more.

A PEFT adapter of a fine-tune that resized its embeddings presents its grown vocabulary tensors
(:attr:`~mergeflow.storage.lora.LoraReader.resized`) and is aligned here like a dense
checkpoint, through the tokenizer beside ``adapter_config.json``; a resized tensor that is not
a vocabulary tensor is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.merging.state import AddedToken, FoldOptions, StateInfo, VocabInfo
from mergeflow.merging.stats import CheckpointStats, stats_key
from mergeflow.merging.tensors import SAFETENSORS_DTYPES, TensorReader
from mergeflow.merging.vectors import check_compatible
from mergeflow.merging.vocab import Fill, RowMap, RowsReader, row_map
from mergeflow.storage.checkpoints import OpenedCheckpoint
from mergeflow.storage.lora import LoraReader
from mergeflow.storage.objects import ObjectStore
from mergeflow.storage.safetensors_file import SafetensorsReader
from mergeflow.storage.vocab_files import (
    ROWS_FILE,
    UNION_FILES,
    VOCAB_DIR,
    Folder,
    Vocabulary,
    tokenizer_json,
    union_files,
)

log = logging.getLogger(__name__)


@dataclass
class VocabFold:
    """One fold's readers with the vocabulary rows aligned, and what the fold adds to the state."""

    base: TensorReader
    checkpoint: TensorReader
    state: TensorReader | None
    vocab: VocabInfo | None = None
    new: tuple[str, ...] = ()
    """The tokens this checkpoint adds (introduced under union, left out under base)."""
    rows: Callable[[], dict[str, torch.Tensor]] | None = None
    """The added rows to keep (every added token, in row order), when the fold adds some."""
    files: dict[str, bytes] | None = None
    """The union's tokenizer files, when the fold adds tokens."""
    maps: dict[str, RowMap] = field(default_factory=dict)
    """The checkpoint's remapped tensors (for its statistics)."""

    def remap_stats(self, stats: CheckpointStats | None) -> CheckpointStats | None:
        """The checkpoint's statistics with a vocabulary tensor's Fisher in the merged row
        order (zero where its tensor is filled); a Gram is per input feature, unchanged."""
        maps = {stats_key(k, "fisher"): m for k, m in self.maps.items()}
        if stats is None or not maps:
            return stats
        return replace(stats, reader=RowsReader(stats.reader, maps))

    def record(self, info: StateInfo) -> StateInfo:
        """``info`` (the fold's new state) with this fold's vocabulary record."""
        return info if self.vocab is None else info.model_copy(update={"vocab": self.vocab})


def _ck_rows(reader: TensorReader, v: VocabInfo, label: str) -> int | None:
    keys = set(reader.keys())
    rows = {k: reader.meta(k).shape[0] for k in v.tensors if k in keys and reader.meta(k).shape}
    if len(set(rows.values())) > 1:
        raise CheckpointError(label, f"its vocabulary tensors disagree on their rows: {rows}")
    return next(iter(rows.values()), None)


def _check_resized(v: VocabInfo | None, ck: OpenedCheckpoint) -> None:
    """An adapter's tensor may have other rows than the base's only where rows are tokens."""
    if isinstance(ck.reader, LoraReader):
        for key, why in ck.reader.resized.items():
            if v is None or (key not in v.tensors and key not in v.tied):
                raise CheckpointError(ck.uri, f"{why} (only vocabulary tensors may be resized)")


def _added_rows(
    v: VocabInfo,
    prev: TensorReader | None,
    ck: TensorReader,
    new: list[tuple[AddedToken, int]],
    base: TensorReader,
) -> Callable[[str], torch.Tensor]:
    """Rows of every added token per tensor (the earlier ones kept, then this checkpoint's)."""
    cache: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        if key not in cache:
            dtype = SAFETENSORS_DTYPES[base.meta(key).dtype]
            parts = [prev.get(key).to(dtype)] if prev is not None and v.added else []
            if new:
                idx = torch.tensor([c for _, c in new], dtype=torch.int64)
                parts.append(ck.get(key).index_select(0, idx).to(dtype))
            cache[key] = torch.cat(parts)
        return cache[key]

    return get


def _ext_base(
    base: TensorReader,
    v: VocabInfo,
    added: tuple[AddedToken, ...],
    rows_of: Callable[[str], torch.Tensor],
) -> TensorReader:
    """The base with the added rows in place (their values: the introducers' rows)."""
    if not added:
        return RowsReader(base, {}, hide=v.tied) if v.tied else base
    merged = max(v.rows, added[-1].row + 1)
    rm = row_map(merged, v.rows, {a.row: -1 for a in added})
    first = added[0].row
    maps = {k: rm for k in v.tensors if k in set(base.keys())}
    fill = Fill(rows=lambda k, idx: rows_of(k).index_select(0, idx - first))
    return RowsReader(base, maps, fill, hide=v.tied)


def prev_rows(folder: Folder | None, v: VocabInfo | None, label: str) -> TensorReader | None:
    """The added rows a state keeps beside its tensors (None when it added none)."""
    if folder is None or v is None or not v.added:
        return None
    store, prefix = folder
    if not store.exists(prefix + ROWS_FILE):
        raise ConfigError(f"state {label} added tokens but keeps no {VOCAB_DIR}/{ROWS_FILE}")
    return SafetensorsReader(store.byte_source(prefix + ROWS_FILE), f"{label} ({ROWS_FILE})")


def export_base(
    info: StateInfo, base: TensorReader, folder: Folder | None, label: str
) -> TensorReader:
    """The base an export adds the state to: the added rows in place, a tied head hidden."""
    v = info.vocab
    if v is None:
        return base
    prev = prev_rows(folder, v, label)
    return _ext_base(base, v, v.added, _added_rows(v, prev, base, [], base))


def _state_reader(
    state: TensorReader, v: VocabInfo, merged: int, new: list[AddedToken]
) -> TensorReader:
    """The previous state with zero rows for the tokens this fold introduces (D and slots)."""
    maps: dict[str, RowMap] = {}
    keys = state.keys()
    for k in v.tensors:
        if k not in keys:
            continue
        shape = state.meta(k).shape
        old = shape[0]
        zero = {a.row: -1 for a in new if a.row < old}
        maps[k] = row_map(merged, old, zero)
        for sk in keys:
            if not sk.startswith(k + ":"):
                continue
            ss = state.meta(sk).shape
            if ss == shape:
                maps[sk] = maps[k]
            elif len(ss) == 2 and ss == shape[::-1]:
                maps[sk] = row_map(merged, old, zero, axis=1)
    return RowsReader(state, maps)


def align(
    v: VocabInfo | None,
    policy: str,
    state: TensorReader | None,
    folder: Folder | None,
    base: OpenedCheckpoint,
    ck: OpenedCheckpoint,
    checkpoint_id: str,
    *,
    files: bool = True,
) -> VocabFold:
    """The readers of one fold with vocabulary rows aligned by token (see the module doc).

    ``v`` and ``policy``: the state's vocabulary record and ``vocab`` option; ``folder``: where
    it keeps its added rows and tokenizer files (None at step 0); ``files``: build the union's
    tokenizer files when the checkpoint adds tokens (not for a check).
    """
    _check_resized(v, ck)
    if v is None:
        return VocabFold(base.reader, ck.reader, state)
    prev = prev_rows(folder, v, "the state")
    rows = _ck_rows(ck.reader, v, ck.uri)
    b_raw = tokenizer_json((base.store, base.prefix), base.uri)
    c_raw = tokenizer_json((ck.store, ck.prefix), ck.uri) if rows is not None else None
    src: dict[int, int] | None = None
    new: list[str] = []
    introduced: list[tuple[AddedToken, int]] = []
    cv: Vocabulary | None = None
    if rows is None:
        pass
    elif b_raw is None or c_raw is None:
        if rows != v.rows:
            which = "it carries no tokenizer" if c_raw is None else "the base has no tokenizer"
            more = "more" if rows > v.rows else "fewer"
            raise CheckpointError(
                ck.uri,
                f"its vocabulary tensors ({', '.join(v.tensors)}) have {rows} rows, {more} than "
                f"the base's {v.rows}, and {which} to say which token each row is; refused "
                f"(publish the fine-tune's tokenizer files beside its weights)",
            )
        src = {a.row: -1 for a in v.added if a.row < v.rows}
    elif b_raw != c_raw or v.added or rows != v.rows:
        bv, cv = Vocabulary.parse(b_raw, base.uri), Vocabulary.parse(c_raw, ck.uri)
        src, new, introduced = _match(v, bv, cv, rows, policy, checkpoint_id, ck.uri)
    added = (*v.added, *(a for a, _ in introduced))
    rows_of = _added_rows(v, prev, ck.reader, introduced, base.reader)
    ext = _ext_base(base.reader, v, added, rows_of)
    merged = max(v.rows, added[-1].row + 1) if added else v.rows
    reader, maps = ck.reader, {}
    if src is not None or v.tied:
        rm = row_map(merged, min(rows or 0, v.rows), src)
        keys = set(ck.reader.keys())
        maps = {} if rm.is_identity(rows or 0) else {k: rm for k in v.tensors if k in keys}
        fill = Fill(
            rows=lambda k, idx: ext.get(k).index_select(0, idx),
            dtype=lambda k: ext.meta(k).dtype,
        )
        reader = RowsReader(ck.reader, maps, fill, hide=v.tied) if maps or v.tied else ck.reader
    new_state = state
    if state is not None and introduced:
        new_state = _state_reader(state, v, merged, [a for a, _ in introduced])
    record = v
    if new and policy == "base":
        record = v.model_copy(update={"left_out": {**v.left_out, checkpoint_id: tuple(new)}})
        log.info("%s: %d new token(s) left out (vocab: base): %s", ck.uri, len(new), _few(new))
    union = None
    if introduced:
        record = v.model_copy(update={"added": added})
        log.info("%s: %d token(s) added to the vocabulary: %s", ck.uri, len(new), _few(new))
        assert cv is not None
        if files:
            union = union_files(folder, base, ck, cv, [a for a, _ in introduced], v)
    keep = (lambda: {k: rows_of(k) for k in v.tensors}) if introduced else None
    return VocabFold(ext, reader, new_state, record, tuple(new), keep, union, maps)


def aligned(
    v: VocabInfo | None, policy: str, base: OpenedCheckpoint, cks: list[OpenedCheckpoint]
) -> tuple[OpenedCheckpoint, list[OpenedCheckpoint], list[str]]:
    """A one-shot merge's base and checkpoints with vocabulary rows aligned to the base's, and
    a line per checkpoint whose new tokens are left out (``union`` needs a continual method)."""
    if v is None:
        return base, cks, []
    if policy == "union":
        raise ConfigError("vocab: union grows the vocabulary fold by fold; use a continual method")
    folds = [align(v, policy, None, None, base, c, c.uri, files=False) for c in cks]
    notes = [
        f"{c.uri}: {len(f.new)} new token(s) left out (vocab: base): {_few(f.new)}"
        for c, f in zip(cks, folds, strict=True)
        if f.new
    ]
    b = replace(base, reader=folds[0].base) if folds else base
    return b, [replace(c, reader=f.checkpoint) for c, f in zip(cks, folds, strict=True)], notes


def check(
    v: VocabInfo | None, options: FoldOptions, base: OpenedCheckpoint, ck: OpenedCheckpoint
) -> list[str]:
    """Refuse, before any work, what folding ``ck`` would (its vocabulary's rows and tokenizer,
    then names, shapes and dtypes); returns its tensors the base lacks. Reads headers and
    tokenizers only."""
    fresh = v.model_copy(update={"added": ()}) if v is not None else None
    fold = align(fresh, options.vocab, None, None, base, ck, ck.uri, files=False)
    return check_compatible(fold.base, fold.checkpoint, options)


def _match(
    v: VocabInfo, bv: Vocabulary, cv: Vocabulary, rows: int, policy: str, cid: str, label: str
) -> tuple[dict[int, int], list[str], list[tuple[AddedToken, int]]]:
    """Merged row -> checkpoint row (-1: the base's value), the checkpoint's new tokens, and
    the tokens it introduces (under union) with their rows in the checkpoint."""
    over = [(t, i) for t, i in cv.ids.items() if i >= rows]
    if over:
        t, i = min(over, key=lambda x: x[1])
        raise CheckpointError(
            label,
            f"its tokenizer has token {t!r} at id {i}, but its vocabulary tensors have {rows} rows",
        )
    added = {a.token: a.row for a in v.added}
    new = [
        t
        for t, _ in sorted(cv.ids.items(), key=lambda x: x[1])
        if t not in bv.ids and t not in added
    ]
    introduced: list[tuple[AddedToken, int]] = []
    if new and policy == "union":
        first = v.added[0].row if v.added else bv.size
        if first > v.rows:
            raise ConfigError(
                f"the base's tokenizer has {bv.size} ids but its vocabulary tensors only {v.rows} "
                "rows; vocab: union cannot place new tokens after them"
            )
        nxt = first + len(v.added)
        introduced = [
            (AddedToken(token=t, row=nxt + j, checkpoint=cid), cv.ids[t]) for j, t in enumerate(new)
        ]
    token_at = {i: t for t, i in bv.ids.items() if i < v.rows}
    token_at.update({a.row: a.token for a in v.added})
    fresh = {a.row for a, _ in introduced}
    named = set(cv.ids.values())
    src: dict[int, int] = {}
    merged = max([v.rows, *(a.row + 1 for a in v.added), *(r + 1 for r in fresh)])
    missing = 0
    for r in range(merged):
        tok = token_at.get(r)
        if r in fresh:
            src[r] = -1
        elif tok is not None:
            src[r] = cv.ids.get(tok, -1)
            missing += src[r] < 0 and r < v.rows
        elif r < rows and r not in named:
            src[r] = r
        else:
            src[r] = -1
    if missing:
        log.info(
            "%s: its tokenizer lacks %d of the base's tokens; their rows keep the base's",
            label,
            missing,
        )
    return src, new, introduced


def _few(tokens: list[str] | tuple[str, ...], n: int = 8) -> str:
    more = f" and {len(tokens) - n} more" if len(tokens) > n else ""
    return ", ".join(repr(t) for t in tokens[:n]) + more


def save(store: ObjectStore, rel: str, fold: VocabFold, folder: Folder | None) -> None:
    """Keep the added rows and the union's tokenizer files under ``rel/vocab/`` (a new state's
    tensors folder): this fold's when it added tokens, else the previous state's, carried."""
    from safetensors.torch import save as st_save

    v = fold.vocab
    if v is None or not v.added:
        return
    dst = f"{rel}/{VOCAB_DIR}/"
    if fold.rows is not None:
        rows = {k: t.contiguous() for k, t in fold.rows().items()}
        store.write_bytes(dst + ROWS_FILE, st_save(rows, {"mergeflow.vocab": "rows"}))
        for n, data in (fold.files or {}).items():
            store.write_bytes(dst + n, data)
        return
    if folder is None:
        raise ConfigError(
            "a state that added tokens keeps them beside its tensors, and these are gone"
        )
    for n in (ROWS_FILE, *UNION_FILES):
        if folder[0].exists(folder[1] + n):
            data = folder[0].read_bytes(folder[1] + n)
            store.write_bytes(dst + n, data)


def summary(info: StateInfo) -> dict[str, Any] | None:
    """The vocabulary part of a state's summary (``mergeflow.json``, ``state show``)."""
    v = info.vocab
    if v is None:
        return None
    return {
        "policy": info.options.vocab,
        "tensors": list(v.tensors),
        "rows": v.merged_rows,
        "base_rows": v.rows,
        "tied": list(v.tied),
        "added": [a.model_dump() for a in v.added],
        "left_out": {k: list(t) for k, t in v.left_out.items()},
    }


def note(info: StateInfo, checkpoint_id: str) -> str | None:
    """One line on what a fold did to the vocabulary (printed by the CLI), if anything."""
    v = info.vocab
    if v is None:
        return None
    left = v.left_out.get(checkpoint_id)
    if left:
        return f"{checkpoint_id}: {len(left)} new token(s) left out (vocab: base): {_few(left)}"
    mine = [a.token for a in v.added if a.checkpoint == checkpoint_id]
    if mine:
        return f"{checkpoint_id}: {len(mine)} token(s) added to the vocabulary (vocab: union): {_few(mine)}"
    return None
