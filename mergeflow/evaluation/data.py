"""Loading evaluation data: labelled arrays (npz, safetensors, parquet) and text files.

Evaluation never imports :mod:`mergeflow.storage` (they are sibling layers). Bytes come
from a ``read_bytes(uri) -> bytes`` callable: the default reads local paths and
``file://`` URIs; the pipeline passes one backed by its object store for ``s3://`` etc.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from safetensors.numpy import load

from mergeflow.errors import ConfigError

ReadBytes = Callable[[str], bytes]
Arrays = tuple[np.ndarray | None, dict[str, np.ndarray], np.ndarray | None]
"""One data file split into (positional ``x`` or None, keyword inputs, labels or None)."""

LABEL_KEYS = ("labels", "y")
MODEL_INPUT_KEYS = (
    "pixel_values",
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "input_features",
    "inputs_embeds",
)
"""Arrays passed to the model as keyword arguments when present (``x`` is passed positionally)."""


def read_local_bytes(uri: str) -> bytes:
    """Read a local path or ``file://`` URI; other schemes need a ``read_bytes`` from the caller."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise ConfigError(
            f"cannot read {uri!r}: no reader for the {parsed.scheme}:// scheme here; pass read_bytes (the pipeline uses its object store)"
        )
    else:
        path = Path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"evaluation data {uri!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read evaluation data {uri!r}: {e}") from None


def data_format(uri: str) -> str:
    path = urlparse(uri).path or uri
    for ext in (".npz", ".safetensors", ".parquet"):
        if path.endswith(ext):
            return ext[1:]
    raise ConfigError(
        f"evaluation data {uri!r}: unknown format; use .npz, .safetensors or .parquet"
    )


def parse_arrays(data: bytes, uri: str) -> dict[str, np.ndarray]:
    """Decode one data file into named arrays, by the URI's extension."""
    fmt = data_format(uri)
    try:
        if fmt == "npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if fmt == "safetensors":
            return dict(load(data))
        # pyarrow: only for .parquet data
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        out: dict[str, np.ndarray] = {}
        for name in table.column_names:
            col = table.column(name).to_pylist()
            out[name] = np.asarray(col)
        return out
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"evaluation data {uri!r} is not a valid {fmt} file: {e}") from None


def split_inputs(
    arrays: dict[str, np.ndarray], uri: str
) -> tuple[np.ndarray | None, dict[str, np.ndarray], np.ndarray]:
    """Split decoded arrays into (positional ``x`` or None, keyword inputs, labels); validate."""
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    if label_key is None:
        raise ConfigError(
            f"evaluation data {uri!r} has no labels: expected an array named 'labels' or 'y' (found {sorted(arrays)})"
        )
    labels = np.asarray(arrays[label_key])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"evaluation data {uri!r}: labels must be a 1-D integer array, got {labels.dtype}{list(labels.shape)}"
        )
    x = arrays.get("x")
    kwargs = {k: arrays[k] for k in MODEL_INPUT_KEYS if k in arrays}
    if x is None and not kwargs:
        raise ConfigError(
            f"evaluation data {uri!r} has no inputs: expected 'x' or one of {list(MODEL_INPUT_KEYS)} (found {sorted(arrays)})"
        )
    for name, arr in ([("x", x)] if x is not None else []) + list(kwargs.items()):
        if len(arr) != len(labels):
            raise ConfigError(
                f"evaluation data {uri!r}: {name!r} has {len(arr)} rows but labels has {len(labels)}"
            )
    return x, kwargs, labels


def calibration_inputs(arrays: Mapping[str, np.ndarray], uri: str) -> Arrays:
    """Split decoded arrays into (positional ``x`` or None, keyword inputs, labels or None)."""
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    labels = None if label_key is None else np.asarray(arrays[label_key])
    if labels is not None and (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer)):
        raise ConfigError(
            f"calibration data {uri!r}: labels must be a 1-D integer array, got {labels.dtype}{list(labels.shape)}"
        )
    x = arrays.get("x")
    kwargs = {k: np.asarray(arrays[k]) for k in MODEL_INPUT_KEYS if k in arrays}
    if x is None and not kwargs:
        raise ConfigError(
            f"calibration data {uri!r} has no inputs: expected 'x' or one of {list(MODEL_INPUT_KEYS)} (found {sorted(arrays)})"
        )
    named = ([("x", np.asarray(x))] if x is not None else []) + list(kwargs.items())
    rows = len(named[0][1]) if named[0][1].ndim else -1
    for name, arr in named + ([("labels", labels)] if labels is not None else []):
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or arr.ndim == 0:
            raise ConfigError(
                f"calibration data {uri!r}: {name!r} is a {arr.dtype}{list(arr.shape)} array; inputs must be numeric arrays with one row per example"
            )
        if len(arr) != rows:
            raise ConfigError(
                f"calibration data {uri!r}: {name!r} has {len(arr)} rows but {named[0][0]!r} has {rows}"
            )
    return (None if x is None else np.asarray(x)), kwargs, labels
