"""Fuzzing the parsers a hostile publisher controls, with hypothesis.

Targets: a safetensors file read end to end (header parsing, every tensor read) over an
in-memory byte source, the folder watcher's wholeness probe, the shard index and the
folder layout, and the PEFT LoRA adapter (its config and tensors against a base). Inputs
are structured (valid-looking headers, indexes and configs with adversarial values) and
then mutated (bit flips, truncation, splices), plus raw bytes.

Property: every input is either accepted or refused with the module's own error
(``CheckpointError`` / ``LayoutError``): never another exception, never a hang (each input
runs under a 5 s alarm), never a large allocation (peak RSS growth over the whole run is
bounded by :data:`RSS_GROWTH_LIMIT`).

CI runs :data:`EXAMPLES` inputs per target; ``scripts/reliability.sh`` sets
``MERGEFLOW_FUZZ_EXAMPLES`` for a run of several minutes and prints the counts.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergeflow.errors import CheckpointError
from mergeflow.merging.tensors import DictReader
from mergeflow.storage.checkpoints import LoraReader
from mergeflow.storage.hf_layout import LayoutError, parse_index, weight_layout
from mergeflow.storage.objects import ObjectInfo
from mergeflow.storage.safetensors_file import SafetensorsReader
from mergeflow.storage.sources import safetensors_state

pytestmark = pytest.mark.timeout(3600)  # long runs: scripts/reliability.sh raises EXAMPLES

EXAMPLES = int(os.environ.get("MERGEFLOW_FUZZ_EXAMPLES", "150"))
RSS_GROWTH_LIMIT = 512 * 2**20
ALARM_S = 5
COUNTS: dict[str, int] = {}

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the alarm below bounds each input; shared CI cores make timing noisy
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def bounded(target: str) -> Iterator[None]:
    """Count the input and turn a hang into a failure."""

    def alarm(*_: Any) -> None:
        raise TimeoutError(f"{target}: an input ran longer than {ALARM_S} s")

    COUNTS[target] = COUNTS.get(target, 0) + 1
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, ALARM_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Bytes:
    """An in-memory :class:`~mergeflow.storage.safetensors_file.ByteSource`."""

    def __init__(self, data: bytes, name: str = "fuzz.safetensors") -> None:
        self.data, self.name = data, name

    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        out = self.data[offset : offset + length]
        if len(out) != length:
            raise CheckpointError(self.name, "truncated")
        return out


class BytesStore:
    """Just enough of a store for :func:`safetensors_state`."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def byte_source(self, relpath: str) -> Bytes:
        return Bytes(self.data, relpath)


# ----------------------------------------------------------------------------- strategies
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]
ints = st.one_of(
    st.integers(-3, 70),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**12]),
)
junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=8), ints)
shapes = st.one_of(
    st.lists(st.integers(0, 9), max_size=4), st.lists(st.one_of(ints, junk), max_size=6), junk
)
offsets = st.one_of(
    st.lists(ints, min_size=2, max_size=2), st.lists(st.one_of(ints, junk), max_size=3), junk
)


@st.composite
def entries(draw: Any) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(junk)
    e: dict[str, Any] = {}
    if draw(st.booleans()) or True:
        e["dtype"] = draw(st.one_of(st.sampled_from(DTYPES), st.text(max_size=5), junk))
    if draw(st.integers(0, 9)):
        e["shape"] = draw(shapes)
    if draw(st.integers(0, 9)):
        e["data_offsets"] = draw(offsets)
    return e


@st.composite
def consistent(draw: Any) -> tuple[dict[str, Any], int]:
    """A header whose entries are mostly right (so reads get exercised), and its data length."""
    header: dict[str, Any] = {}
    pos = 0
    for i in range(draw(st.integers(0, 5))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = 1
        for d in shape:
            n *= d
        size = n * {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(
            dtype, 1
        )
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3), junk)
        )
    return header, pos


@st.composite
def safetensors_files(draw: Any) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        header, datalen = draw(consistent())
    else:
        header = draw(st.dictionaries(st.text(max_size=6), entries(), max_size=6))
        datalen = draw(st.integers(0, 64))
    raw = json.dumps(header).encode()
    data = (
        draw(st.binary(min_size=datalen, max_size=datalen)) if datalen <= 256 else b"\0" * datalen
    )
    n = len(raw)
    if draw(st.integers(0, 4)) == 0:
        n = draw(ints.filter(lambda v: 0 <= v < 2**64))
    blob = struct.pack("<Q", n) + raw + data
    for _ in range(draw(st.integers(0, 3))):  # mutations
        if not blob:
            break
        i = draw(st.integers(0, len(blob) - 1))
        op = draw(st.integers(0, 2))
        if op == 0:
            blob = blob[:i] + bytes([blob[i] ^ (1 << draw(st.integers(0, 7)))]) + blob[i + 1 :]
        elif op == 1:
            blob = blob[:i]
        else:
            blob = blob[:i] + draw(st.binary(max_size=16)) + blob[i:]
    return blob


def _readers() -> Callable[[bytes], None]:
    def read_all(blob: bytes) -> None:
        try:
            r = SafetensorsReader(Bytes(blob))
        except CheckpointError:
            return
        for k in r.keys():
            t = r.get(k)
            assert tuple(t.shape) == r.meta(k).shape

    return read_all


# ----------------------------------------------------------------------------- targets
@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    start = _peak_rss()
    yield
    growth = _peak_rss() - start
    total = sum(COUNTS.values())
    print(
        f"\nRELIABILITY fuzz: {total} inputs ({', '.join(f'{k} {v}' for k, v in sorted(COUNTS.items()))}); "
        f"none crashed or hung; peak RSS growth {growth / 2**20:.0f} MiB"
    )
    assert growth < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth / 2**20:.0f} MiB"


@FUZZ
@given(safetensors_files())
def test_fuzz_safetensors_file(blob: bytes) -> None:
    with bounded("safetensors"):
        _readers()(blob)


@FUZZ
@given(safetensors_files())
def test_fuzz_wholeness_probe_never_raises(blob: bytes) -> None:
    with bounded("wholeness"):
        state = safetensors_state(
            BytesStore(blob), ObjectInfo("x.safetensors", len(blob), "e", 0.0)
        )  # type: ignore[arg-type]
        assert state in ("whole", "partial", "broken")


@st.composite
def index_files(draw: Any) -> bytes:
    names = st.one_of(
        st.sampled_from(
            [
                "model-00001-of-00002.safetensors",
                "../x.safetensors",
                "/etc/passwd",
                "a\\b.safetensors",
                ".hidden.safetensors",
                "",
                "x.bin",
                "c:x.safetensors",
                "a\x00.safetensors",
            ]
        ),
        st.text(max_size=12),
    )
    wm = st.dictionaries(st.text(max_size=6), st.one_of(names, junk), max_size=5)
    doc = draw(
        st.one_of(
            st.fixed_dictionaries({"weight_map": wm}),
            st.dictionaries(st.text(max_size=5), junk, max_size=3),
            junk,
        )
    )
    raw = json.dumps(doc).encode()
    if draw(st.booleans()):
        i = draw(st.integers(0, max(0, len(raw) - 1)))
        raw = raw[:i] + draw(st.binary(max_size=8)) + raw[i:]
    return raw


@FUZZ
@given(index_files(), st.lists(st.text(max_size=12), max_size=6))
def test_fuzz_shard_index_and_layout(raw: bytes, names: list[str]) -> None:
    with bounded("index"):
        try:
            wm = parse_index(raw)
        except LayoutError:
            wm = None
        if wm is not None:
            for shard in wm.values():
                assert "/" not in shard and "\\" not in shard and not shard.startswith(".")
                assert shard.endswith(".safetensors")
        try:
            weight_layout([*names, "model.safetensors.index.json"] if wm else names, wm)
        except LayoutError:
            pass


BASE = {"m.weight": torch.randn(6, 4), "m.bias": torch.randn(6), "emb.weight": torch.randn(5, 3)}


@st.composite
def adapters(draw: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config: dict[str, Any] = {}
    for key, value in (
        ("r", st.one_of(st.integers(-2, 8), junk)),
        (
            "lora_alpha",
            st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-4, 16), junk),
        ),
        ("peft_type", st.one_of(st.just("LORA"), st.text(max_size=5), junk)),
        ("use_rslora", junk),
        ("fan_in_fan_out", junk),
        (
            "alpha_pattern",
            st.one_of(
                st.dictionaries(
                    st.text(max_size=4), st.one_of(st.floats(allow_nan=True), junk), max_size=2
                ),
                junk,
            ),
        ),
    ):
        if draw(st.integers(0, 4)):
            config[key] = draw(value)
    tensors: dict[str, torch.Tensor] = {}
    for module in draw(st.lists(st.sampled_from(["m", "emb", "nope", "m.x"]), max_size=3)):
        dims = st.integers(0, 7)
        emb = module == "emb" and draw(st.booleans())
        a_name, b_name = (
            (".lora_embedding_A", ".lora_embedding_B")
            if emb
            else (".lora_A.weight", ".lora_B.weight")
        )
        prefix = "base_model.model." if draw(st.booleans()) else ""
        if draw(st.integers(0, 5)):
            tensors[f"{prefix}{module}{a_name}"] = torch.zeros(
                [draw(dims) for _ in range(draw(st.integers(1, 3)))]
            )
        if draw(st.integers(0, 5)):
            tensors[f"{prefix}{module}{b_name}"] = torch.zeros(
                [draw(dims) for _ in range(draw(st.integers(1, 3)))]
            )
    if draw(st.booleans()):
        tensors["base_model.model.m.bias"] = torch.zeros(draw(st.integers(0, 7)))
    return config, tensors


@FUZZ
@given(adapters())
def test_fuzz_lora_adapter(adapter: tuple[dict[str, Any], dict[str, torch.Tensor]]) -> None:
    config, tensors = adapter
    with bounded("lora"):
        try:
            r = LoraReader(DictReader(BASE, "base"), DictReader(tensors, "adapter"), config, "fuzz")
            for k in r.keys():
                t = r.get(k)
                if k in r.resized:  # other rows (a resized vocabulary): aligned by token later
                    assert t.shape[0] and tuple(t.shape[1:]) == tuple(BASE[k].shape[1:])
                elif k in BASE:
                    assert tuple(t.shape) == tuple(BASE[k].shape)
        except CheckpointError:
            pass
