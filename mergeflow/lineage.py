"""Lineage specs: one named stream of checkpoints folded into one merged model.

A lineage is declared in YAML and validated once by :class:`LineageSpec`::

    name: digits-opcm                       # slug: a-z 0-9 and '-'
    base: s3://mergeflow/models/vit-base    # local path, s3://, hf://org/repo@rev, mlflow://models/...
    method: opcm                            # continual; or a pool method (fw_merging, batch_adamerging):
    params: {alpha: 0.5}                    # each new checkpoint is merged with the accepted pool again
    sources:                                # watched in publication order
      - s3://mergeflow/published/digits
      - hf://?base_model=org/vit-base        # new Hub fine-tunes of the base (hf://org/repo watches one repo)
    evaluation: {tasks: [...]}              # mergeflow.evaluation.EvaluationSuite
    gate: {min_acc: 0.5, max_drop: 0.05}    # mergeflow.evaluation.GateSpec
    candidates:                             # optional: several folds of each checkpoint, the best wins
      - {params: {alpha: 0.3}}              # the lineage's method with other parameters
      - {method: task_arithmetic, params: {scale: 0.3}}   # another method: its own state chain
    registered_model: digits-opcm           # MLflow registered model (default: name)
    store: s3://mergeflow/lineages/digits-opcm     # where states and merged weights go
    device: auto                            # auto | cpu | cuda | cuda:N
    dask: {n_workers: 4, groups: 8}         # optional: fold tensor groups on a Dask cluster
    schedule: 60                            # watch every 60 s, or a cron string "*/5 * * * *"
    max_task_vector_ratio: 1.0              # refuse ‖τ‖/‖θ₀‖ above this (another base); null: off
    vocab: base                             # tokens a checkpoint adds: left out (base) or added (union)

Under ``store``: ``lineage.yaml`` (the spec, as created), then the states, merged weights
and evaluations of every step (:mod:`mergeflow.tasks.layout`).

The catalog (:func:`save_lineage`, :func:`load_lineage`, :func:`list_lineages`) keeps the
spec in ``<store>/lineage.yaml`` and a small pointer to it in a Prefect Variable named
``mergeflow_lineage__<name>`` (tag ``mergeflow-lineage``), so any worker that reaches the
Prefect API and the store can load a lineage by name. Prefect Variables hold at most
5000 characters, which is why the spec itself lives on the store.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect.client.orchestration import get_client
from prefect.variables import Variable
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeflow.errors import ConfigError
from mergeflow.evaluation.spec import EvaluationSuite, GateSpec
from mergeflow.merging.methods import (
    ContinualMethod,
    get_continual,
    get_method,
    method_names,
    validate_params,
)
from mergeflow.merging.state import FoldOptions
from mergeflow.storage.schemes import open_store, read_uri

SPEC_FILE = "lineage.yaml"
VARIABLE_PREFIX = "mergeflow_lineage__"
VARIABLE_TAG = "mergeflow-lineage"
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_CRON = re.compile(r"^\S+(\s+\S+){4,5}$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def continual_method(name: str) -> ContinualMethod[Any, Any]:
    """A continual method by name; a batch or pool method is refused (it cannot fold a state)."""
    m = get_method(name)
    if not isinstance(m, ContinualMethod):
        what = "a one-shot merge" if m.kind == "batch" else "it merges a whole pool at once"
        raise ConfigError(
            f"method {name!r} is a {m.kind} method ({what}) and cannot fold continually; "
            f"continual methods: {', '.join(method_names('continual'))}"
        )
    return m


class CandidateSpec(BaseModel):
    """One candidate fold: a continual method with its parameters.

    Without ``method`` it is the lineage's method with ``params`` over the lineage's; with
    another ``method`` it is that method with ``params`` alone (a portfolio). Every candidate
    folds the same checkpoint; the best on the validation split becomes the version. Each
    method keeps its own state chain (one method's state does not continue another's): a
    candidate folds into its method's last state, which is the best of that method's
    candidates at the last accepted version (see :meth:`LineageSpec.candidate_folds`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    method: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    def label(self, index: int) -> str:
        """A short name for logs, metrics and storage prefixes."""
        if self.name:
            return self.name
        parts = [self.method] if self.method else []
        parts += [f"{k}{v}" for k, v in sorted(self.params.items())]
        return "-".join(parts) if parts else f"c{index}"


class CandidateFold(BaseModel):
    """One fold a lineage tries for each checkpoint: its label, method and full parameters."""

    model_config = ConfigDict(frozen=True)

    label: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)


class DaskSpec(BaseModel):
    """Spread each fold's per-tensor work over a Dask cluster (see :mod:`mergeflow.tasks.dask`).

    ``address``: an existing scheduler (``tcp://host:8786``); otherwise a LocalCluster on
    127.0.0.1 with ``n_workers`` workers (``processes`` or threads), no dashboard.
    ``groups``: how many tensor groups (tasks) one fold is split into.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str | None = None
    n_workers: int = Field(2, ge=1)
    processes: bool = True
    groups: int = Field(4, ge=1)


class LineageOrigin(BaseModel):
    """Where a lineage made by ``mergeflow lineage branch|rebuild`` came from.

    ``branch``: it continues the state of ``lineage``'s ``version``. ``rebuild``: it refolded
    ``lineage``'s checkpoints (up to ``version``, the newest then) with another method. Either
    way the checkpoints ``lineage`` had seen up to ``version`` (folded, rejected, dropped) count
    as seen here too, so watch never offers them again.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["branch", "rebuild"]
    lineage: str
    registered_model: str
    version: str


class LineageSpec(BaseModel):
    """A lineage (see the module docstring for the YAML form). Frozen; validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    base: str
    method: str = "opcm"
    params: dict[str, Any] = Field(default_factory=dict)
    compute_dtype: Literal["float32", "float64"] = "float32"
    allow_missing: bool = Field(
        False, description="treat base tensors a checkpoint lacks as zero task vectors"
    )
    project_regex: str | None = Field(
        None, description="OPCM: project exactly the 2-D tensors matching this"
    )
    export_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    vocab: Literal["base", "union"] = "base"
    allow_pickle: bool = False
    max_task_vector_ratio: float | None = Field(
        1.0,
        gt=0,
        description="refuse a checkpoint whose task vector is this large relative to the base, "
        "‖τ‖/‖θ₀‖ (one that was not fine-tuned from this base); null: no check, no extra read",
    )
    sources: tuple[str, ...] = Field(min_length=1)
    evaluation: EvaluationSuite | None = None
    gate: GateSpec = GateSpec()
    candidates: tuple[CandidateSpec, ...] = ()
    registered_model: str = Field("", description="MLflow registered model (default: name)")
    store: str = Field(description="URI of the prefix holding the lineage's states and weights")
    device: str = "auto"
    dask: DaskSpec | None = None
    schedule: int | str = Field(60, description="watch interval in seconds, or a cron string")
    origin: LineageOrigin | None = Field(
        None, description="set by `lineage branch|rebuild`: the lineage and version it came from"
    )

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError(
                f"name {v!r} must be a slug: lowercase letters, digits and '-', at most 63 characters"
            )
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"device {v!r} must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: int | str) -> int | str:
        if isinstance(v, int):
            if v < 5:
                raise ValueError("schedule must be at least 5 seconds")
            return v
        if v.strip().isdigit():
            return cls._schedule(int(v))
        if not _CRON.match(v.strip()):
            raise ValueError(f"schedule {v!r} is neither a number of seconds nor a cron string")
        return v.strip()

    @field_validator("store", "base")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip().rstrip("/")

    @model_validator(mode="after")
    def _method_ok(self) -> LineageSpec:
        try:
            m = get_method(self.method)
            validate_params(m if m.kind == "pool" else get_continual(self.method), self.params)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        for key, on, why in (  # a pool lineage merges its pool again with each new checkpoint
            ("candidates", bool(self.candidates), "rebuild the lineage with each method instead"),
            ("dask", self.dask is not None, "a pool merge optimises the whole model at once"),
            ("vocab: union", self.vocab == "union", "a pool merge keeps the base's vocabulary"),
        ):
            if on and m.kind == "pool":
                raise ValueError(f"method {self.method!r} merges a pool and takes no {key}: {why}")
        for i, c in enumerate(self.candidates):
            try:
                validate_params(continual_method(c.method or self.method), self._params_of(c))
            except ConfigError as e:
                raise ValueError(f"candidate {c.label(i)}: {e}") from None
        labels = [c.label(i) for i, c in enumerate(self.candidates)]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(
                f"candidate names must be unique, got {labels} ({', '.join(twice)} more than once; "
                "give one a `name`)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("registered_model") and "name" in data:
            return {**data, "registered_model": data["name"]}
        return data

    # ------------------------------------------------------------------ derived
    @property
    def method_kind(self) -> Literal["continual", "pool"]:
        """``continual`` (fold into the last accepted state) or ``pool`` (merge its pool again)."""
        return "pool" if get_method(self.method).kind == "pool" else "continual"

    def fold_options(self) -> FoldOptions:
        """The options that change the numbers a fold produces (they live in the state)."""
        return FoldOptions(
            compute_dtype=self.compute_dtype,
            missing="zero" if self.allow_missing else "error",
            vocab=self.vocab,
        )

    @property
    def concurrency_name(self) -> str:
        """The Prefect global concurrency limit that serialises this lineage's folds."""
        return f"mergeflow-fold-{self.name}"

    @property
    def spec_uri(self) -> str:
        return f"{self.store}/{SPEC_FILE}"

    def _params_of(self, c: CandidateSpec) -> dict[str, Any]:
        """A candidate's full parameters: over the lineage's for its own method, else alone."""
        if c.method in (None, self.method):
            return {**self.params, **c.params}
        return dict(c.params)

    def candidate_folds(self) -> list[CandidateFold]:
        """Every fold to try for a checkpoint: the lineage's own, or one per candidate."""
        if not self.candidates:
            return [CandidateFold(label="main", method=self.method, params=dict(self.params))]
        return [
            CandidateFold(
                label=c.label(i), method=c.method or self.method, params=self._params_of(c)
            )
            for i, c in enumerate(self.candidates)
        ]

    def candidate_params(self) -> list[tuple[str, dict[str, Any]]]:
        """``(label, params)`` of every fold to try (see :meth:`candidate_folds`)."""
        return [(c.label, c.params) for c in self.candidate_folds()]

    def chain_methods(self) -> list[str]:
        """The methods whose state chains the lineage keeps, in candidate order."""
        return list(dict.fromkeys(c.method for c in self.candidate_folds()))

    def chain_params(self, method: str) -> dict[str, Any]:
        """The parameters a method's step-0 state is made with (the lineage's for its method)."""
        if method == self.method:
            return dict(self.params)
        return next(c.params for c in self.candidate_folds() if c.method == method)

    # --------------------------------------------------------------------- YAML
    @classmethod
    def from_mapping(cls, data: Any, origin: str = "lineage spec") -> LineageSpec:
        """Validate a parsed document; errors become one :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: expected a mapping at the top level")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors()
            )
            raise ConfigError(f"{origin}: {problems}") from None

    @classmethod
    def from_yaml_text(cls, text: str, origin: str = "lineage spec") -> LineageSpec:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{origin}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_mapping(data, origin)

    @classmethod
    def from_yaml(cls, path: str | Path) -> LineageSpec:
        """Load and validate a lineage YAML file."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read lineage spec {path}: {e.strerror or e}") from None
        return cls.from_yaml_text(text, str(path))

    def to_yaml(self, exclude_defaults: bool = False) -> str:
        """The spec as YAML (every field, unless ``exclude_defaults``)."""
        return yaml.safe_dump(
            self.model_dump(mode="json", exclude_defaults=exclude_defaults), sort_keys=False
        )


# -------------------------------------------------------------------- catalog
IMMUTABLE = (
    "base",
    "method",
    "store",
    "registered_model",
    "compute_dtype",
    "project_regex",
    "allow_missing",
    "vocab",
    "origin",
)
"""Fields that cannot change once a lineage exists (its states depend on them)."""


def variable_name(name: str) -> str:
    return VARIABLE_PREFIX + name.replace("-", "_")


def save_lineage(spec: LineageSpec, *, replace: bool = False) -> LineageSpec:
    """Write ``lineage.yaml`` to the store, point a Prefect Variable at it, create the fold lock.

    An existing lineage is only replaced with ``replace=True``, and never in a field of
    :data:`IMMUTABLE`.
    """

    existing = find_lineage(spec.name)
    if existing is not None:
        if not replace:
            if existing == spec:
                return spec
            raise ConfigError(
                f"lineage {spec.name!r} already exists (at {existing.spec_uri}); pass --replace to update it"
            )
        changed = [f for f in IMMUTABLE if getattr(existing, f) != getattr(spec, f)]
        if changed:
            raise ConfigError(
                f"lineage {spec.name!r}: {', '.join(changed)} cannot change once the lineage exists; create a new lineage"
            )
    open_store(spec.store).write_bytes(SPEC_FILE, spec.to_yaml().encode())
    Variable.set(
        variable_name(spec.name),
        {"name": spec.name, "spec_uri": spec.spec_uri, "registered_model": spec.registered_model},
        tags=[VARIABLE_TAG],
        overwrite=True,
    )
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(spec.concurrency_name, 1)
    return spec


def _pointer(name: str) -> dict[str, Any] | None:
    value = Variable.get(variable_name(name), default=None)
    return value if isinstance(value, dict) else None


def load_spec_uri(uri: str) -> LineageSpec:
    """Read a ``lineage.yaml`` from a store URI."""
    try:
        text = read_uri(uri).decode()
    except (OSError, FileNotFoundError) as e:
        raise ConfigError(f"cannot read lineage spec {uri}: {e}") from None
    return LineageSpec.from_yaml_text(text, uri)


def find_lineage(name: str) -> LineageSpec | None:
    """The lineage registered under ``name``, or None."""
    ptr = _pointer(name)
    if ptr is None:
        return None
    return load_spec_uri(str(ptr["spec_uri"]))


def load_lineage(name: str) -> LineageSpec:
    """The lineage registered under ``name``; a :class:`ConfigError` if there is none."""
    spec = find_lineage(name)
    if spec is None:
        raise ConfigError(
            f"no lineage named {name!r}; create it with `mergeflow lineage create SPEC.yaml`"
        )
    return spec


def list_lineages() -> list[dict[str, Any]]:
    """Pointers (name, spec_uri, registered_model) of every registered lineage, by name."""

    with get_client(sync_client=True) as client:
        variables = client.read_variables()
    out = [
        v.value
        for v in variables
        if v.name.startswith(VARIABLE_PREFIX) and isinstance(v.value, dict)
    ]
    return sorted(out, key=lambda d: str(d.get("name")))


def delete_lineage(name: str) -> bool:
    """Forget a lineage in the catalog (its store and MLflow versions stay)."""

    return bool(Variable.unset(variable_name(name)))


def derive_lineage(
    origin: LineageSpec,
    kind: Literal["branch", "rebuild"],
    name: str,
    version: str,
    *,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    sources: tuple[str, ...] = (),
    store: str | None = None,
) -> LineageSpec:
    """The spec of lineage ``name``, branched or rebuilt from ``origin`` at ``version``.

    Same base, sources (unless ``sources``), suite, gate and options; its own registered
    model (``name``) and store (default: ``name`` beside ``origin``'s store). A branch keeps
    the method and takes ``params`` over the origin's; it refuses another method, since one
    method's state does not continue another's. A rebuild takes ``method`` (and only
    ``params``, and no candidates, when the method changes). Raises :class:`ConfigError`.
    """
    if kind == "branch" and method not in (None, origin.method):
        raise ConfigError(
            f"a branch continues the {origin.method} state of {origin.name} and one method's "
            f"state does not continue another's ({origin.method} -> {method}); refold the same "
            f"checkpoints with {method} instead: "
            f"mergeflow lineage rebuild {origin.name} --as {name} --method {method}"
        )
    if find_lineage(name) is not None:
        raise ConfigError(f"lineage {name!r} already exists; choose another name")
    same = method in (None, origin.method)
    data = origin.model_dump(mode="json")
    parent_dir = origin.store.rpartition("/")[0]
    data.update(
        name=name,
        registered_model=name,
        store=store or (f"{parent_dir}/{name}" if parent_dir else name),
        method=method or origin.method,
        params={**(origin.params if same else {}), **(params or {})},
        candidates=data["candidates"] if same else [],
        sources=list(sources) or data["sources"],
        origin={
            "kind": kind,
            "lineage": origin.name,
            "registered_model": origin.registered_model,
            "version": str(version),
        },
    )
    if data["store"].rstrip("/") == origin.store:
        raise ConfigError(f"{kind} {name}: give it its own --store (not {origin.store})")
    return LineageSpec.from_mapping(data, f"{kind} {name} of {origin.name}")
