"""The explicit method registry: every method is listed here, nowhere else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from mergeflow.errors import ConfigError
from mergeflow.merging.methods.base import BatchMethod, ContinualMethod, MethodParams
from mergeflow.merging.methods.batch import Average, BatchTaskArithmetic, BatchTies, Dare
from mergeflow.merging.methods.magmax import MagMax
from mergeflow.merging.methods.opcm import OPCM
from mergeflow.merging.methods.task_arithmetic import TaskArithmetic
from mergeflow.merging.methods.ties import Ties
from mergeflow.merging.methods.weight_average import WeightAverage

CONTINUAL: tuple[ContinualMethod, ...] = (
    OPCM(),
    TaskArithmetic(),
    WeightAverage(),
    MagMax(),
    Ties(),
)
BATCH: tuple[BatchMethod, ...] = (BatchTaskArithmetic(), BatchTies(), Dare(), Average())


def method_names() -> list[str]:
    return [m.name for m in CONTINUAL + BATCH]


def get_method(name: str) -> ContinualMethod | BatchMethod:
    """Look a method up by name; unknown names raise :class:`ConfigError` listing the known ones."""
    for m in CONTINUAL + BATCH:
        if m.name == name:
            return m
    raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")


def is_continual(method: ContinualMethod | BatchMethod) -> bool:
    return any(method is m for m in CONTINUAL)


def parse_params(method: ContinualMethod | BatchMethod, raw: Mapping[str, Any]) -> MethodParams:
    """Validate raw parameters (strings from the CLI are coerced) into the method's frozen model."""
    try:
        return method.Params.model_validate(dict(raw))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'params'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid parameters for method {method.name!r}: {problems}") from None


def describe() -> list[dict[str, Any]]:
    """Every method with its kind, summary and parameters (name, type, default, description)."""
    rows = []
    for kind, methods in (("continual", CONTINUAL), ("batch", BATCH)):
        for m in methods:
            params = []
            for pname, f in m.Params.model_fields.items():
                if get_origin(f.annotation) is Literal:
                    ann = "|".join(map(str, get_args(f.annotation)))
                else:
                    ann = getattr(f.annotation, "__name__", None) or str(f.annotation)
                params.append(
                    {
                        "name": pname,
                        "type": ann,
                        "default": f.default,
                        "description": f.description or "",
                    }
                )
            rows.append({"name": m.name, "kind": kind, "summary": m.summary, "params": params})
    return rows
