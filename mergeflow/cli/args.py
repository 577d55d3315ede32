"""Parsers of the CLI's argument values: sizes, KEY=VALUE parameters, ratios."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from mergeflow.errors import ConfigError

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """``5GB`` (10^9), ``500MiB`` (2^20) or plain bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes"
        )
    n = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def parse_key_values(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def parse_ratio(text: str) -> float | None:
    """``--max-task-vector-ratio``: a positive number, or none."""
    if text.strip().lower() in ("none", "off", "null"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or none") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value
