"""The explicit method registry: every method is listed in :data:`METHODS`, nowhere else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict, get_args, get_origin

from pydantic import ValidationError

from mergeflow.errors import ConfigError
from mergeflow.merging.methods.adamerging import AdaMerging
from mergeflow.merging.methods.base import BatchMethod, ContinualMethod, MethodParams, PoolMethod
from mergeflow.merging.methods.batch_adamerging import BatchAdaMerging
from mergeflow.merging.methods.batch_dare import BatchDare
from mergeflow.merging.methods.batch_task_arithmetic import BatchTaskArithmetic
from mergeflow.merging.methods.batch_ties import BatchTies
from mergeflow.merging.methods.batch_weight_average import BatchWeightAverage
from mergeflow.merging.methods.dop import DOP
from mergeflow.merging.methods.fisher import Fisher
from mergeflow.merging.methods.fw_merging import FWMerging
from mergeflow.merging.methods.fw_soft import FWSoft
from mergeflow.merging.methods.magmax import MagMax
from mergeflow.merging.methods.nufilt import NUFILT
from mergeflow.merging.methods.opcm import OPCM
from mergeflow.merging.methods.regmean import RegMean
from mergeflow.merging.methods.task_arithmetic import TaskArithmetic
from mergeflow.merging.methods.ties import Ties
from mergeflow.merging.methods.weight_average import WeightAverage

# Each method has its own Params/Scalars types; a registry entry is any one of them.
Method = ContinualMethod[Any, Any] | BatchMethod[Any] | PoolMethod[Any]
Kind = Literal["continual", "batch", "pool"]

METHODS: tuple[Method, ...] = (
    OPCM(),
    TaskArithmetic(),
    WeightAverage(),
    MagMax(),
    Ties(),
    DOP(),
    NUFILT(),
    AdaMerging(),
    RegMean(),
    Fisher(),
    BatchTaskArithmetic(),
    BatchTies(),
    BatchDare(),
    BatchWeightAverage(),
    BatchAdaMerging(),
    FWMerging(),
    FWSoft(),
)


class ParamRow(TypedDict):
    """One parameter of a method, as listed by ``mergeflow methods``."""

    name: str
    type: str
    default: object
    description: str


class MethodRow(TypedDict):
    """One method, as listed by ``mergeflow methods``."""

    name: str
    kind: Kind
    summary: str
    params: list[ParamRow]


def method_names(kind: Kind | None = None) -> list[str]:
    """Names of the registered methods (of one kind when ``kind`` is given)."""
    return [m.name for m in METHODS if kind is None or m.kind == kind]


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names raise :class:`ConfigError` listing the known ones."""
    for m in METHODS:
        if m.name == name:
            return m
    raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")


def get_continual(name: str) -> ContinualMethod[Any, Any]:
    """A continual method by name; a batch method raises :class:`ConfigError`."""
    m = get_method(name)
    if not isinstance(m, ContinualMethod):
        raise ConfigError(
            f"method {name!r} is a batch method (a one-shot merge); folding into a state "
            f"needs a continual method: {', '.join(method_names('continual'))}"
        )
    return m


def get_batch(name: str) -> BatchMethod[Any]:
    """A batch method by name; a continual method raises :class:`ConfigError`."""
    m = get_method(name)
    if not isinstance(m, BatchMethod):
        raise ConfigError(
            f"method {name!r} is a continual method (it folds into a state); a one-shot "
            f"merge needs a batch method: {', '.join(method_names('batch'))}"
        )
    return m


def get_pool(name: str) -> PoolMethod[Any]:
    """A pool method by name; another kind raises :class:`ConfigError`."""
    m = get_method(name)
    if not isinstance(m, PoolMethod):
        raise ConfigError(
            f"method {name!r} is not a pool method; pool methods: {', '.join(method_names('pool'))}"
        )
    return m


def validate_params(method: Method, raw: Mapping[str, object]) -> MethodParams:
    """Validate raw parameters (strings from the CLI are coerced) into the method's frozen model."""
    try:
        return method.Params.model_validate(dict(raw))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'params'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid parameters for method {method.name!r}: {problems}") from None


def _type_name(annotation: object) -> str:
    if get_origin(annotation) is Literal:
        return "|".join(map(str, get_args(annotation)))
    return getattr(annotation, "__name__", None) or str(annotation)


def method_table() -> list[MethodRow]:
    """Every method with its kind, summary and parameters (name, type, default, description)."""
    return [
        MethodRow(
            name=m.name,
            kind=m.kind,
            summary=m.summary,
            params=[
                ParamRow(
                    name=pname,
                    type=_type_name(f.annotation),
                    default=f.default,
                    description=f.description or "",
                )
                for pname, f in m.Params.model_fields.items()
            ],
        )
        for m in METHODS
    ]


__all__ = [
    "METHODS",
    "BatchMethod",
    "ContinualMethod",
    "Kind",
    "Method",
    "MethodRow",
    "ParamRow",
    "get_batch",
    "get_continual",
    "get_pool",
    "get_method",
    "method_names",
    "method_table",
    "validate_params",
]
