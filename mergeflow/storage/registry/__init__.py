"""The MLflow registry adapter: one MLflow model version per fold, with its lineage.

Every MLflow import of mergeflow lives in this package. It is imported by the pipeline
only (and by :mod:`mergeflow.storage.schemes` on first use of an ``mlflow://`` URI), so
its modules import MLflow at module level; `mergeflow merge` on the light install never
imports it.

Modules: :mod:`.tags` (every tag, alias and metric key name), :mod:`.records`
(:class:`FoldRecord`, :class:`VersionRecord`, tags <-> records), :mod:`.connection` (the
MLflow client, paging, error mapping), :mod:`.client` (:class:`Registry`), :mod:`.entities`
(dataset inputs, linked metrics, the MLmodel file), :mod:`.render` (markdown description,
artifact files), :mod:`.plots` (the PNGs), :mod:`.uri` (:func:`parse_mlflow_uri`,
:func:`resolve_model_uri`), :mod:`.source` (:class:`MlflowSource`).

What one fold records (:meth:`Registry.register_fold`), in this order:

1. a run in experiment ``mergeflow/<lineage>``: params ``method``, ``param.<k>`` (nested
   method params flattened with dots), ``base``, ``checkpoint``; metrics (below);
   ``log_inputs`` of the evaluation datasets (each ``test/<task>`` metric is linked to its
   task's test dataset); the markdown description as the run note;
2. an *external* MLflow 3 LoggedModel (``mlflow.model.isExternal=true``: its weights live
   outside MLflow, at ``rec.model_uri`` on S3, written by the fold task and never
   re-uploaded). It carries the same params and tags, the metrics are linked to it
   (``Metric.model_id``), and the run lists it as an output;
3. small artifacts, logged to both the run and the LoggedModel, which the tracking server
   (``--artifacts-destination s3://...``) stores on the object store:
   ``plots/accuracy_per_step.png``, ``plots/lineage.png``,
   ``plots/accuracy_heatmap.png`` (when an accuracy matrix is given), ``mergeflow.json``
   (the fold record) and ``description.md``;
4. **the commit point**: one ``create_model_version`` call that carries the version's tags,
   description, run id and LoggedModel id, with ``source=models:/<model_id>``: that is what
   the MLflow UI parses to show the version's "Source Model" (an ``s3://`` source would
   lose the link), and it makes the version's storage location the LoggedModel's artifact
   folder on the object store. The weights URI is the ``mergeflow.model.uri`` tag (also on
   the LoggedModel and in its ``MLmodel`` metadata); :func:`resolve_model_uri` reads it.
5. aliases, reconciled from the versions: :data:`NEWEST_ALIAS` on the newest version,
   :data:`CHAMPION_ALIAS` on the newest accepted one.

Crash semantics: nothing before step 4 creates a version, so a crash leaves no version and
the fold is retried. The retry soft-deletes runs (and their LoggedModels) that an earlier
attempt left for the same checkpoint digest without a version; ``mlflow gc`` purges them.
A crash between steps 4 and 5 is repaired by the retry, which finds the version
(idempotency) and reconciles the aliases.

Version tags (all strings; names in :mod:`.tags`): ``mergeflow.lineage``,
``mergeflow.step``, ``mergeflow.status`` (accepted|rejected), ``mergeflow.reason``,
``mergeflow.method``, ``mergeflow.metrics`` (compact JSON of the metrics, so
:meth:`Registry.versions` needs one search call), ``mergeflow.checkpoint.id``,
``mergeflow.checkpoint.uri``, ``mergeflow.checkpoint.digest``, ``mergeflow.parent.version``
("" for none), ``mergeflow.state.uri``, ``mergeflow.model.uri`` ("" when rejected at
validation), ``mergeflow.model.id`` (the LoggedModel); on a fold that tried several
candidates, ``mergeflow.candidates`` (JSON: each candidate's label, method, params, state URI
and validation scores; ``mergeflow.method`` is then the registered candidate's method); on a
pool merge, ``mergeflow.pool`` (JSON: each checkpoint of the pool, in order; the
``checkpoint.*`` tags name the newest, and the run has a ``pool`` param with their ids).

Metrics (the fold flow computes them; keys by split): ``test/<task>`` per task,
``test/avg`` their mean over the tasks folded so far, ``test/bwt`` backward transfer (from
step 2); ``val/<task>`` and ``val/avg`` on the validation split;
``candidate/<label>/val/avg`` per candidate when a fold tries several (and run params
``candidate.<label>.method``, ``candidate.<label>.param.<k>``); timings and memory
keep plain names (``load_seconds``, ``fold_seconds``, ``export_seconds``,
``eval_seconds``, ``peak_rss_mb``, ``step``).

MLflow reserves the alias name ``latest`` (``models:/NAME/latest`` already means the
highest version number), so the "latest" alias of the design is named ``newest``. Because
every fold, accepted or rejected, becomes a version, ``models:/NAME/latest``,
``models:/NAME@newest`` and ``mlflow://models/NAME@latest`` all name the same version.
"""

from __future__ import annotations

from mergeflow.storage.registry.client import Registry
from mergeflow.storage.registry.records import (
    CandidateRecord,
    FoldRecord,
    PoolMember,
    RegistryError,
    VersionRecord,
)
from mergeflow.storage.registry.source import MlflowSource
from mergeflow.storage.registry.tags import CHAMPION_ALIAS, NEWEST_ALIAS
from mergeflow.storage.registry.uri import parse_mlflow_uri, resolve_model_uri

__all__ = [
    "CHAMPION_ALIAS",
    "NEWEST_ALIAS",
    "CandidateRecord",
    "FoldRecord",
    "MlflowSource",
    "PoolMember",
    "Registry",
    "RegistryError",
    "VersionRecord",
    "parse_mlflow_uri",
    "resolve_model_uri",
]
