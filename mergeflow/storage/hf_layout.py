"""The Hugging Face checkpoint layout: which files of a folder are its weights. One place.

A folder (local, an S3 prefix or a Hub repo at a commit) is a checkpoint when its file
names match one of these layouts, tried in this order:

1. ``sharded``: ``model.safetensors.index.json`` plus every shard its ``weight_map`` names;
2. ``single``: ``model.safetensors``;
3. ``adapter``: a PEFT adapter, ``adapter_config.json`` plus ``adapter_model.safetensors``;
4. ``bare``: exactly one ``*.safetensors`` file (a ``mergeflow_stats.safetensors`` beside the
   weights holds statistics, :mod:`mergeflow.merging.stats`, and never counts as weights);
5. ``pickle``: exactly one pickle file (``.bin``, ``.pt``, ...), only read on request.

Readers (:mod:`mergeflow.storage.checkpoints`), folder watchers
(:class:`mergeflow.storage.sources.StoreSource`) and the Hub
(:class:`mergeflow.storage.hub.repo.HubRepo`) all decide with :func:`weight_layout`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from mergeflow.merging.stats import STATS_FILE

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "config.json"
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DIGEST_CONFIG_FILES = (CONFIG_FILE, "generation_config.json", ADAPTER_CONFIG)
"""Small files whose change makes a listed checkpoint a new one."""
SMALL_FILES = (
    CONFIG_FILE,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
"""Non-weight files copied next to a merged model, so ``from_pretrained`` loads it."""

Kind = Literal["sharded", "single", "adapter", "bare", "pickle"]


class LayoutError(ValueError):
    """The folder's names match no checkpoint layout; the message says what is wrong."""


@dataclass(frozen=True)
class WeightLayout:
    """How a folder holds its weights: ``weights`` are read, ``extra`` (index, adapter config) parsed."""

    kind: Kind
    weights: tuple[str, ...]
    extra: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        """Every file that makes up the checkpoint (what its digest covers)."""
        return (*self.extra, *self.weights)


def is_weight_file(name: str) -> bool:
    """A name that is one weight file by itself (a bare safetensors or a pickle file)."""
    return name.endswith(SAFETENSORS_SUFFIX) or name.endswith(PICKLE_SUFFIXES)


MAX_JSON_BYTES = 64 * 2**20
"""Index, config and adapter config files larger than this are refused before reading."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise LayoutError(f"{INDEX_FILE} lists {key!r} more than once")
        out[key] = value
    return out


def safe_member(name: str) -> bool:
    """A file name directly inside a checkpoint folder: no separator, no ``..``, no NUL."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith(".")
        and ":" not in name
    )


def parse_index(data: bytes) -> dict[str, str]:
    """The ``weight_map`` of a shard index; refuses shards outside the folder.

    Raises :class:`LayoutError` for invalid JSON (too deep, numbers too long), a tensor
    listed twice, a shard that is not a ``.safetensors`` file directly in the folder
    (absolute paths, ``..``, separators), or an index over :data:`MAX_JSON_BYTES`.
    """
    if len(data) > MAX_JSON_BYTES:
        raise LayoutError(f"{INDEX_FILE} is larger than {MAX_JSON_BYTES // 2**20} MiB")
    try:
        index = json.loads(data, object_pairs_hook=_no_duplicates)
    except LayoutError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LayoutError(f"{INDEX_FILE} is not valid JSON ({msg})") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise LayoutError(f"{INDEX_FILE} has no usable weight_map")
    for shard in sorted(set(wm.values())):
        if not safe_member(shard):
            raise LayoutError(
                f"{INDEX_FILE} names shard {shard[:200]!r} outside the checkpoint folder"
            )
        if not shard.endswith(SAFETENSORS_SUFFIX):
            raise LayoutError(f"{INDEX_FILE} names shard {shard[:200]!r}, not a .safetensors file")
    return dict(wm)


def weight_layout(names: Collection[str], index: Mapping[str, str] | None = None) -> WeightLayout:
    """Decide the layout of a folder from the names directly inside it (see the module doc).

    ``index`` is the parsed ``weight_map`` when the folder has an index (the caller reads
    it); shards it names must all be present. Raises :class:`LayoutError` otherwise.
    """
    present = set(names)
    if INDEX_FILE in present:
        if index is None:
            raise LayoutError(f"{INDEX_FILE} was not read")
        shards = tuple(sorted(set(index.values())))
        missing = [s for s in shards if s not in present]
        if missing:
            raise LayoutError(f"shard {missing[0]} listed in {INDEX_FILE} is missing")
        return WeightLayout("sharded", shards, (INDEX_FILE,))
    if SINGLE_FILE in present:
        return WeightLayout("single", (SINGLE_FILE,))
    if ADAPTER_CONFIG in present:
        if ADAPTER_FILE not in present:
            raise LayoutError(f"adapter folder has {ADAPTER_CONFIG} but no {ADAPTER_FILE}")
        return WeightLayout("adapter", (ADAPTER_FILE,), (ADAPTER_CONFIG,))
    bare = sorted(n for n in present if n.endswith(SAFETENSORS_SUFFIX) and n != STATS_FILE)
    if len(bare) == 1:
        return WeightLayout("bare", (bare[0],))
    if len(bare) > 1:
        raise LayoutError(
            f"folder has {len(bare)} .safetensors files but no {INDEX_FILE} saying how they fit together"
        )
    pickles = sorted(n for n in present if n.endswith(PICKLE_SUFFIXES))
    if len(pickles) == 1:
        return WeightLayout("pickle", (pickles[0],))
    if pickles:
        raise LayoutError(
            f"several pickle files ({', '.join(pickles[:3])}); convert to safetensors first"
        )
    raise LayoutError(
        f"folder has no weights (expected {SINGLE_FILE}, {INDEX_FILE}, {ADAPTER_FILE} or one .safetensors file)"
    )
