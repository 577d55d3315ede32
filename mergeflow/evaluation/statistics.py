"""Computing a checkpoint's statistics (``mergeflow.stats/1``, see :mod:`mergeflow.merging.stats`).

:func:`compute_stats` runs a built model over batches and returns Gram matrices of the
inputs of its ``nn.Linear`` layers and the diagonal Fisher of its parameters;
:func:`stats_for_checkpoint` does it for a checkpoint's config, tensors and calibration data
files (npz, safetensors, parquet: the formats evaluation reads; labels optional).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mergeflow.errors import ConfigError, MergeflowError
from mergeflow.evaluation.data import Arrays, calibration_inputs, data_format, parse_arrays
from mergeflow.evaluation.models import instantiate, load_weights, logits_of
from mergeflow.merging.stats import check_stats, stats_key, stats_metadata
from mergeflow.merging.tensors import DictReader

__all__ = [
    "Batch",
    "FisherLabels",
    "calibration_inputs",
    "compute_stats",
    "stats_for_checkpoint",
]

FisherLabels = Literal["auto", "empirical", "predicted"]
FISHER_LABELS: tuple[FisherLabels, ...] = get_args(FisherLabels)
Batch = tuple[list[Tensor], dict[str, Tensor], Tensor | None]
"""(positional args, keyword inputs, labels or None), as the classification evaluator builds them."""


class _GramHooks:
    """Forward pre-hooks on every ``nn.Linear``: Σ x xᵀ (float64) and the row count per weight."""

    def __init__(self, model: nn.Module) -> None:
        self.mask: Tensor | None = None
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list[Any] = []
        seen: set[int] = set()
        for mod_name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if not isinstance(module, nn.Linear) or not isinstance(w, Tensor):
                continue
            if not w.is_floating_point() or id(w) in seen:  # a weight shared by Linears: one key
                continue
            seen.add(id(w))
            key = f"{mod_name}.weight" if mod_name else "weight"
            self.counts[key] = 0
            self._handles.append(
                module.register_forward_pre_hook(self._hook(key), with_kwargs=True)
            )

    def _hook(self, key: str) -> Any:
        """The pre-hook of the Linear whose weight is ``key``."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor):
                return
            x = x.detach()
            mask = self.mask
            if mask is not None and mask.dim() == 2 and x.dim() == 3 and x.shape[:2] == mask.shape:
                rows = x[mask != 0]
            else:
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.to(torch.float64)
            s = rows.T @ rows
            if key in self.sums:
                self.sums[key].add_(s)
            else:
                self.sums[key] = s
            self.counts[key] += int(rows.shape[0])

        return hook

    def remove(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _batch_len(args: Sequence[Tensor], kwargs: Mapping[str, Tensor]) -> int:
    """The number of examples of a batch: the length of its first input."""
    for t in [*args, *kwargs.values()]:
        return int(t.shape[0])
    raise ConfigError("a calibration batch has no inputs")


def _batch_tokens(args: Sequence[Tensor], kwargs: Mapping[str, Tensor], n: int) -> int:
    """Non-padding tokens of a batch: mask sum, else batch*seq for token inputs, else examples."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int((mask != 0).sum())
    ids = kwargs.get("input_ids")
    if ids is not None and ids.dim() == 2:
        return int(ids.shape[0] * ids.shape[1])
    for t in [kwargs.get("inputs_embeds"), *args[:1]]:
        if t is not None and t.dim() == 3:
            return int(t.shape[0] * t.shape[1])
    return n


def _log_likelihood(
    logits: Tensor, labels: Tensor | None, i: int, fisher_labels: FisherLabels
) -> Tensor:
    """log p(y|x) of one example's logits [1, C], y chosen by ``fisher_labels``."""
    if logits.dim() != 2:
        if logits.dim() > 2:
            raise ConfigError(
                f"Fisher of sequence outputs is not supported (logits of shape {list(logits.shape)}); use --no-fisher"
            )
        raise ConfigError(
            f"the model's logits have shape {list(logits.shape)}; a Fisher needs [batch, classes]"
        )
    logp = torch.log_softmax(logits.float(), dim=-1)[0]
    if fisher_labels == "predicted" or (fisher_labels == "auto" and labels is None):
        y = int(logp.detach().argmax())
    elif labels is None:
        raise ConfigError(
            "fisher_labels 'empirical' needs labels, but the calibration data has none "
            "(use 'auto' or 'predicted')"
        )
    else:
        y = int(labels[i])
        if not 0 <= y < logp.shape[0]:
            raise ConfigError(f"label {y} is out of range for a model with {logp.shape[0]} classes")
    ll = logp[y]
    if not bool(torch.isfinite(ll)):
        raise ConfigError(
            f"the log-likelihood of a calibration example is {float(ll.detach())} (not finite)"
        )
    return ll


def compute_stats(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    grams: bool = True,
    fisher: bool = True,
    fisher_labels: FisherLabels = "auto",
    progress: bool = False,
    total: int | None = None,
) -> tuple[dict[str, Tensor], int, int]:
    """Gram matrices and the diagonal Fisher of ``model`` over ``batches``.

    Each batch is ``(positional args, keyword inputs, labels or None)`` on the model's
    device; the model is called as ``model(*args, **kwargs)`` in eval mode.

    - Gram, for each ``nn.Linear`` (a weight shared by several Linears counts once, under
      the first one's name): ``G = (1/N) Σ_rows x xᵀ`` over the rows ``x`` (``[d_in]``) of
      the Linear's input reshaped to ``[-1, d_in]``, accumulated in float64. When the
      keyword inputs hold an ``attention_mask`` of shape ``[B, T]`` and the Linear's input
      has shape ``[B, T, d_in]``, rows where the mask is 0 (padding) are left out; otherwise
      every row counts. Key ``<module name>.weight:gram``. A Linear that saw no rows has none.
    - Fisher, for each floating-point parameter that requires grad:
      ``F = (1/E) Σ_examples (∂ log p(y|x)/∂θ)²``, ``p = softmax(logits)``, one backward per
      example. ``y`` is chosen by ``fisher_labels``: ``empirical`` the data's label (an
      error where a batch has none), ``predicted`` the model's argmax, ``auto`` (default)
      the label when the batch has labels, else the argmax. Key ``<param name>:fisher``. Only
      classification logits ``[B, C]`` are supported: sequence logits (``[B, T, V]``, a causal
      LM) raise ConfigError "Fisher of sequence outputs is not supported; use --no-fisher".

    Without Fisher the forwards run under ``torch.no_grad``. Returns ``(tensors, examples,
    tokens)``: float32 CPU tensors; ``examples`` the number of examples seen; ``tokens`` the
    non-padding tokens (the ``attention_mask`` sum; else batch*seq for 2-D ``input_ids`` or
    3-D ``inputs_embeds``/positional input; else one per example). A NaN/Inf Gram, Fisher or
    log-likelihood, or zero examples, raises :class:`~mergeflow.errors.ConfigError`.
    """
    if not grams and not fisher:
        raise ConfigError("nothing to compute: both grams and Fisher are off")
    if fisher_labels not in FISHER_LABELS:
        raise ConfigError(f"fisher_labels {fisher_labels!r} is not one of {list(FISHER_LABELS)}")
    model.eval()
    params = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()
    ]
    if fisher and not params:
        raise ConfigError("the model has no floating-point parameters that require grad; no Fisher")
    squares = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params} if fisher else {}
    hooks = _GramHooks(model) if grams else None
    examples = tokens = 0
    bar = tqdm(
        total=total,
        desc="stats",
        unit="example",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    try:
        for args, kwargs, labels in batches:
            n = _batch_len(args, kwargs)
            if n == 0:
                continue
            tokens += _batch_tokens(args, kwargs, n)
            if fisher:
                with torch.enable_grad():
                    for i in range(n):
                        a_i = [a[i : i + 1] for a in args]
                        kw_i = {k: v[i : i + 1] for k, v in kwargs.items()}
                        if hooks is not None:
                            hooks.mask = kw_i.get("attention_mask")
                        logits = logits_of(model(*a_i, **kw_i))
                        ll = _log_likelihood(logits, labels, i, fisher_labels)
                        grads = torch.autograd.grad(ll, [p for _, p in params], allow_unused=True)
                        for (name, _), g in zip(params, grads, strict=True):
                            if g is not None:
                                squares[name].add_(g.detach().to(torch.float64).square())
            else:
                assert hooks is not None
                hooks.mask = kwargs.get("attention_mask")
                with torch.no_grad():
                    model(*args, **kwargs)
            examples += n
            bar.update(n)
    finally:
        bar.close()
        if hooks is not None:
            hooks.remove()
    if examples == 0:
        raise ConfigError("no calibration examples: the data is empty")
    out: dict[str, Tensor] = {}
    if hooks is not None:
        for key, count in hooks.counts.items():
            if count == 0:
                continue
            out[stats_key(key, "gram")] = _finite(hooks.sums[key] / count, stats_key(key, "gram"))
    for name, sq in squares.items():
        out[stats_key(name, "fisher")] = _finite(sq / examples, stats_key(name, "fisher"))
    return out, examples, tokens


def _finite(t: Tensor, key: str) -> Tensor:
    """``t`` as contiguous float32 on the CPU; NaN/Inf raises ConfigError naming ``key``."""
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"statistic {key!r} has NaN or Inf values (non-finite activations?)")
    return t.to(device="cpu", dtype=torch.float32).contiguous()


def _tensor(a: np.ndarray, device: str) -> Tensor:
    """A copy of a numpy slice as a tensor on ``device``."""
    return torch.from_numpy(np.array(a)).to(device)


def _slice(arrays: Arrays, sl: slice, device: str) -> Batch:
    """Rows ``sl`` of one data file as a batch on ``device``."""
    x, kwargs, labels = arrays
    args = [_tensor(x[sl], device)] if x is not None else []
    kw = {k: _tensor(v[sl], device) for k, v in kwargs.items()}
    return args, kw, (None if labels is None else _tensor(labels[sl], "cpu"))


def _rows(arrays: Arrays) -> int:
    """The number of examples of one data file."""
    x, kwargs, _ = arrays
    return len(x) if x is not None else len(next(iter(kwargs.values())))


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _probe(
    model: nn.Module,
    arrays: Arrays,
    uri: str,
    device: str,
    fisher: bool,
    fisher_labels: FisherLabels,
) -> None:
    """One forward of the first example: data that does not fit the model is one ConfigError."""
    args, kw, _ = _slice(arrays, slice(0, 1), device)
    try:
        with torch.no_grad():
            output = model(*args, **kw)
    except MergeflowError:
        raise
    except Exception as e:
        raise ConfigError(
            f"calibration data {uri!r} does not fit the model: {_first_line(e)}"
        ) from None
    if not fisher:
        return
    logits = logits_of(output)
    if logits.dim() > 2:
        raise ConfigError(
            f"Fisher of sequence outputs is not supported (the model's logits on {uri!r} have shape "
            f"{list(logits.shape)}); use --no-fisher"
        )
    labels = arrays[2]
    if labels is not None and fisher_labels != "predicted" and len(labels) and logits.dim() == 2:
        classes = logits.shape[-1]
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= classes:
            raise ConfigError(
                f"calibration data {uri!r} has labels in [{lo}, {hi}] but the model has {classes} classes"
            )


def _batches(
    files: Sequence[Arrays], batch_size: int, max_examples: int | None, device: str
) -> Iterator[Batch]:
    """Batches of at most ``batch_size`` rows over the files in order, ``max_examples`` in all."""
    left = max_examples
    for arrays in files:
        n = _rows(arrays) if left is None else min(_rows(arrays), left)
        for i in range(0, n, batch_size):
            yield _slice(arrays, slice(i, min(i + batch_size, n)), device)
        if left is not None:
            left -= n
            if left <= 0:
                return


def _file_names(
    model: nn.Module, stats: Mapping[str, Tensor], names: set[str]
) -> dict[str, Tensor]:
    """Stats renamed to the names the checkpoint's tensors use (a tied weight has aliases)."""
    aliases: dict[int, list[str]] = {}
    by_name: dict[str, int] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
        by_name[n] = id(p)
    out: dict[str, Tensor] = {}
    for key, t in stats.items():
        name, _, kind = key.rpartition(":")
        if name not in names:
            name = next((a for a in aliases.get(by_name.get(name, -1), []) if a in names), name)
        out.setdefault(f"{name}:{kind}", t)
    return out


def stats_for_checkpoint(
    config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    data: Sequence[tuple[str, bytes]],
    *,
    batch_size: int = 32,
    max_examples: int | None = 256,
    device: str = "cpu",
    grams: bool = True,
    fisher: bool = True,
    fisher_labels: FisherLabels = "auto",
    progress: bool = False,
    source: str = "<memory>",
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The ``mergeflow.stats/1`` tensors and metadata of a checkpoint on calibration data.

    The model is built from ``config`` (an HF ``config.json`` or a registry config, see
    :mod:`mergeflow.evaluation.models`) and loaded strictly with ``tensors`` (``source``
    names the checkpoint in errors). ``data`` is ``(uri, bytes)`` per file, decoded by the
    URI's extension (npz, safetensors, parquet) into ``x`` (positional) and/or keyword
    inputs (``input_ids``, ``attention_mask``, ...) plus optional labels (``labels`` or
    ``y``). At most ``max_examples`` examples in all (None: every one) are taken from the
    files in order, ``batch_size`` at a time.

    Statistics and formulas: see :func:`compute_stats` (Gram ``(1/N) Σ x xᵀ`` over
    non-padding tokens per ``nn.Linear``; diagonal Fisher ``(1/E) Σ (∂ log p(y|x)/∂θ)²``
    per parameter with ``y`` the label when the data has one and the model's prediction
    otherwise, by default; ``fisher_labels`` overrides). Names follow the checkpoint's
    tensors (a tied weight under the alias ``tensors`` holds).

    Each file is checked with one forward first: data that does not fit the model raises
    one ConfigError "calibration data X does not fit the model: <error>"; so do labels out of
    range, ``fisher_labels='empirical'`` on a file without labels, and sequence logits
    with ``fisher`` on. Returns ``(tensors, metadata)``: float32 contiguous CPU tensors, and
    ``stats_metadata(examples, tokens, data)`` with ``data`` the URIs joined by ", ".
    The result is validated with :func:`~mergeflow.merging.stats.check_stats` against
    ``tensors``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be at least 1 (or None for all), got {max_examples}")
    if not grams and not fisher:
        raise ConfigError("nothing to compute: both grams and Fisher are off")
    if fisher_labels not in FISHER_LABELS:
        raise ConfigError(f"fisher_labels {fisher_labels!r} is not one of {list(FISHER_LABELS)}")
    if not data:
        raise ConfigError("no calibration data given")
    files: list[Arrays] = []
    for uri, raw in data:
        data_format(uri)
        arrays = calibration_inputs(parse_arrays(raw, uri), uri)
        if fisher and fisher_labels == "empirical" and arrays[2] is None:
            raise ConfigError(
                f"calibration data {uri!r} has no labels ('labels' or 'y'); Fisher labels "
                "'empirical' need them (use 'auto' or 'predicted')"
            )
        files.append(arrays)
    model = instantiate(config)
    load_weights(model, tensors, source)
    if fisher:  # a head that changed shape is loaded frozen; every float parameter counts
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    model = model.to(device).eval()
    for (uri, _), arrays in zip(data, files, strict=True):
        if _rows(arrays):
            _probe(model, arrays, uri, device, fisher, fisher_labels)
    total = sum(_rows(a) for a in files)
    total = total if max_examples is None else min(total, max_examples)
    stats, examples, tokens = compute_stats(
        model,
        _batches(files, batch_size, max_examples, device),
        grams=grams,
        fisher=fisher,
        fisher_labels=fisher_labels,
        progress=progress,
        total=total,
    )
    if tokens == 0:
        raise ConfigError("the calibration data has no tokens: every attention_mask entry is 0")
    out = _file_names(model, stats, set(tensors))
    metadata = stats_metadata(examples, tokens, ", ".join(uri for uri, _ in data))
    check_stats(DictReader(out, "the computed statistics"), metadata, DictReader(tensors, source))
    return out, metadata
