"""Building a torch module for a merged model from its config and tensors.

Two ways to name an architecture:

- an HF ``config.json`` (has ``model_type``): the class is ``config["architectures"][0]``
  (or an explicit ``architecture=``) looked up in ``transformers``;
- a small explicit registry for non-HF models: ``config["mergeflow_architecture"]`` names a
  factory registered with :func:`register_architecture`. Built in: ``mlp``.

Weights are loaded strictly: every tensor of the module must be provided (tied aliases
count once) and every provided tensor must exist in the module. A head tensor may change
shape (e.g. another number of labels than the base config says): it replaces the
parameter instead of being copied into it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.evaluation.spec import TaskSpec
from mergeflow.merging.tensors import TensorReader

ModelFactory = Callable[[Mapping[str, Any]], nn.Module]
Heads = Mapping[str, Mapping[str, torch.Tensor]]
"""Checkpoint id -> that checkpoint's task-specific tensors (those the base lacks)."""
ARCHITECTURES: dict[str, ModelFactory] = {}


def register_architecture(name: str, factory: ModelFactory) -> None:
    """Register a non-HF architecture under ``name`` (``config["mergeflow_architecture"]``)."""
    ARCHITECTURES[name] = factory


class MLP(nn.Module):
    """``mlp``: ``layers.i`` Linear + activation for each hidden size, then ``classifier``.

    Config: ``in_features`` (int), ``hidden`` (list of int, may be empty), ``num_labels``,
    ``activation`` (``relu`` | ``tanh`` | ``identity``). ``forward(x)`` returns logits.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        try:
            sizes = [int(config["in_features"]), *(int(h) for h in config.get("hidden", []))]
            num_labels = int(config["num_labels"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"mlp config needs in_features, num_labels and optional hidden sizes ({e})"
            ) from None
        acts: dict[str, Callable[[], nn.Module]] = {
            "relu": nn.ReLU,
            "tanh": nn.Tanh,
            "identity": nn.Identity,
        }
        act = config.get("activation", "relu")
        if act not in acts:
            raise ConfigError(f"mlp activation {act!r} is not one of {sorted(acts)}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.act = acts[act]()
        self.classifier = nn.Linear(sizes[-1], num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).float()
        for layer in self.layers:
            x = self.act(layer(x))
        return self.classifier(x)


register_architecture("mlp", MLP)


def _no_init_weights() -> AbstractContextManager[Any]:
    """transformers' own switch that skips random initialisation (1-2 s at 86 M parameters)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    return no_init_weights()


def instantiate(config: Mapping[str, Any], architecture: str | None = None) -> nn.Module:
    """A module for ``config`` (see the module docstring), in eval mode, whose weights are to
    be loaded next: an HF model's are left uninitialised (``no_init_weights``)."""
    if "mergeflow_architecture" in config:
        name = config["mergeflow_architecture"]
        if name not in ARCHITECTURES:
            raise ConfigError(
                f"architecture {name!r} is not registered (known: {sorted(ARCHITECTURES)})"
            )
        model = ARCHITECTURES[name](config)
    elif "model_type" in config:
        # transformers: only for HF architectures
        import transformers

        cls_name = architecture or (config.get("architectures") or [None])[0]
        if not cls_name:
            raise ConfigError(
                "config.json names no architecture ('architectures' is empty); set one for the evaluator"
            )
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            raise ConfigError(f"transformers has no architecture {cls_name!r}")
        cfg_dict = {k: v for k, v in config.items() if k != "transformers_version"}
        try:
            hf_config = transformers.AutoConfig.for_model(**cfg_dict)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"config.json cannot be read by transformers: {e}") from None
        with _no_init_weights():  # every weight is loaded next (load_weights is strict)
            model = cls(hf_config)
        model.tie_weights()  # transformers 5 ties them in the init_weights that was skipped
    else:
        raise ConfigError(
            "cannot build a model: the config has neither 'model_type' (an HF config.json) nor "
            f"'mergeflow_architecture' (one of {sorted(ARCHITECTURES)})"
        )
    return model.eval()


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into ``model`` strictly (see the module docstring)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    sd = model.state_dict(keep_vars=True)
    unexpected = [k for k in tensors if k not in sd]
    if unexpected:
        raise CheckpointError(source, f"tensors the model does not have: {sorted(unexpected)[:8]}")
    aliases: dict[int, list[str]] = {}
    for name, p in params.items():
        aliases.setdefault(id(p), []).append(name)
    missing = []
    for name, t in sd.items():
        if name in tensors:
            continue
        group = aliases.get(id(t), [name])
        if not any(a in tensors for a in group):
            missing.append(name)
    if missing:
        raise CheckpointError(
            source, f"the model needs tensors that were not provided: {sorted(missing)[:8]}"
        )
    same = {k: v for k, v in tensors.items() if tuple(sd[k].shape) == tuple(v.shape)}
    model.load_state_dict(same, strict=False)
    for k, v in tensors.items():
        if k in same:
            continue
        if k not in params:
            raise CheckpointError(
                source,
                f"tensor {k!r} has shape {list(v.shape)} but the model's buffer has {list(sd[k].shape)}",
            )
        mod_name, _, leaf = k.rpartition(".")
        module = model.get_submodule(mod_name)
        setattr(module, leaf, nn.Parameter(v.detach().to(sd[k].dtype).clone(), requires_grad=False))


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a forward output: a tensor, an HF output with ``.logits``, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"the model's forward returned {type(output).__name__}; expected logits")


class ModelCache:
    """Keeps the module built for the last reader, so validation then test build it once."""

    def __init__(self, config: Mapping[str, Any], architecture: str | None, device: str) -> None:
        self.config = dict(config)
        self.architecture = architecture
        self.device = device
        self._reader: TensorReader | None = None
        self._base: dict[str, torch.Tensor] = {}
        self._model: torch.nn.Module | None = None

    def get(self, reader: TensorReader, head: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        if self._reader is not reader or self._model is None:
            self._model = None
            self._base = {k: reader.get(k) for k in reader.keys()}
            self._model = instantiate(self.config, self.architecture)
            self._reader = reader
        overlap = set(head) & set(self._base)
        if overlap:
            raise ConfigError(
                f"head tensors {sorted(overlap)[:4]} are also in the merged model; heads hold only tensors the base lacks"
            )
        load_weights(self._model, {**self._base, **head}, reader.source)
        return self._model.to(self.device)


def head_for(task: TaskSpec, heads: Heads) -> Mapping[str, torch.Tensor]:
    """The head that scores ``task``: its checkpoint's tensors ({} for a headless task)."""
    if task.checkpoint is None:
        return {}
    if task.checkpoint not in heads:
        raise ConfigError(
            f"task {task.name!r} is scored with the head of checkpoint {task.checkpoint!r}, which is not among "
            f"the heads given ({sorted(heads)}); has that checkpoint been folded?"
        )
    return heads[task.checkpoint]
