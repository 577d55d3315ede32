"""PEFT LoRA adapters presented as dense weights, exactly as PEFT's ``merge_and_unload()``.

Folded: plain LoRA (``scale·B·A``), rsLoRA, ``rank_pattern``/``alpha_pattern``, ``fan_in_fan_out``,
``lora_bias`` (``scale·b`` added to the base bias), DoRA (``m·(W + scale·B·A)/‖W + scale·B·A‖``,
the norm per output row, against the base weight) and the trained biases and modules of ``bias``
and ``modules_to_save``. Every other ``adapter_config.json`` key is one PEFT's ``LoraConfig``
defines (0.21) and leaves the merged weights alone, or it is refused by name; so are adapter
tensors that are not such weights and adapter types other than LORA.

A fine-tune that added tokens (``resize_token_embeddings``) carries its grown embedding and
output head: trained whole (``modules_to_save``; PEFT also writes each as ``<module>.weight``
and its untrained ``original_module``, which the merge leaves out), or as the grown layer PEFT
saves as ``<module>.base_layer.weight`` beside LoRA on it. They are presented with the
adapter's rows and listed in :attr:`LoraReader.resized`; the rows are then aligned by token
through the adapter's tokenizer, exactly as a dense checkpoint's
(:func:`mergeflow.storage.vocab.align`, which refuses a resized tensor that is not a
vocabulary tensor with the message kept here).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mergeflow.errors import CheckpointError
from mergeflow.merging.tensors import TensorMeta, TensorReader

# LoraConfig keys that do not change the merged weights: metadata, training-time settings, which
# modules carry weights (the weights file says), and configs of initialisations that either leave
# the base alone or are refused through init_lora_weights.
_NO_EFFECT = frozenset(
    """task_type auto_mapping peft_version base_model_name_or_path revision inference_mode
    lora_dropout target_modules exclude_modules layers_to_transform layers_pattern modules_to_save
    megatron_core qalora_group_size runtime_config eva_config loftq_config corda_config
    lora_ga_config""".split()
)
_READ = frozenset(
    """peft_type r lora_alpha use_rslora fan_in_fan_out rank_pattern alpha_pattern use_dora
    lora_bias bias init_lora_weights""".split()
)
# Refused unless unset (None, false, empty): why mergeflow cannot fold them exactly.
_REFUSED = {
    "use_qalora": "QA-LoRA's A reads group-pooled inputs; PEFT cannot merge it",
    "megatron_config": "Megatron parallel layers",
    "layer_replication": "layers are duplicated, so the merged model has layers the base lacks",
    "target_parameters": "LoRA on bare parameters (MoE experts)",
    "trainable_token_indices": "trained token rows replace embedding rows",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens; PEFT cannot merge it",
    "arrow_config": "an Arrow router mixes adapters per input; PEFT cannot merge it",
    "velora_config": "the VeLoRA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "kasa_config": "the KaSA variant",
    "use_bdlora": "block-diagonal LoRA factors",
    "ensure_weight_tying": "adapters tied across embedding and output layers",
}
# These initialisations only set A and B (MiCA also freezes B; it merges as plain LoRA); others
# (pissa, olora, corda, loftq, lora_ga) change the base weights: the adapter fits that base only.
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
_MAGNITUDE = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


@dataclass(frozen=True)
class _Factor:
    """One targeted weight: its A/B tensors, scale and (DoRA) magnitude vector."""

    module: str
    a: str
    b: str
    emb: bool
    fan: bool
    scale: float
    magnitude: str | None = None


class LoraReader:
    """Presents base + PEFT LoRA adapter as full weights, one tensor at a time.

    For each targeted weight ``W`` the merged weight is ``W + scale·B·A`` (``scale =
    alpha/r``, or ``alpha/√r`` with rsLoRA, per module through ``alpha_pattern``/``rank_pattern``;
    transposed for ``fan_in_fan_out``), or with DoRA ``m·(W + scale·B·A)/‖·‖`` row-wise, mapped
    onto the base's names; only that tensor is densified. Non-LoRA adapter tensors that match a
    base name replace it (``modules_to_save``, ``bias``); the rest are task-specific extras.
    A tensor whose rows differ from the base's (a resized vocabulary) is in :attr:`resized`.
    """

    PREFIX = "base_model.model."

    def __init__(
        self, base: TensorReader, adapter: TensorReader, config: Mapping[str, Any], label: str
    ) -> None:
        self.source = label
        self._base = base
        self._adapter = adapter
        check_config(config, label)
        self._alpha, self._r = _lora_numbers(config, label)
        self._rs = config.get("use_rslora", False) is True
        self._fan = config.get("fan_in_fan_out", False) is True
        self._dora = config.get("use_dora", False) is True
        self._lora_bias = config.get("lora_bias", False) is True
        self._alpha_pattern = _pattern(config.get("alpha_pattern"), "alpha_pattern", label, False)
        self._rank_pattern = _pattern(config.get("rank_pattern"), "rank_pattern", label, True)
        self._base_keys = set(base.keys())
        self._factors: dict[str, _Factor] = {}
        self._bias_add: dict[str, tuple[str, float]] = {}
        self._replace: dict[str, str] = {}
        self._layer: dict[str, str] = {}  # PEFT's copy of a LoRA layer's (resized) base weight
        self._extra: dict[str, str] = {}
        self.resized: dict[str, str] = {}
        """Base key -> why its rows differ from the base's (refused unless a vocabulary tensor)."""
        names = adapter.keys()
        name_set = set(names)
        magnitudes: dict[str, str] = {}
        biases: dict[str, str] = {}
        pairs: list[tuple[str, str, str, bool]] = []
        for k in names:
            stripped = k[len(self.PREFIX) :] if k.startswith(self.PREFIX) else k
            layer = ".base_layer." in stripped  # bias="all" and saved embedding layers
            stripped = stripped.replace(".base_layer.", ".")
            for a_tag, b_tag, emb in (
                (".lora_A.weight", ".lora_B.weight", False),
                (".lora_embedding_A", ".lora_embedding_B", True),
            ):
                if stripped.endswith(a_tag):
                    bk = k[: -len(a_tag)] + b_tag
                    if bk not in name_set:
                        raise CheckpointError(
                            label, f"adapter tensor {k!r} has no matching {b_tag.strip('.')}"
                        )
                    pairs.append((stripped[: -len(a_tag)], k, bk, emb))
                    break
                if stripped.endswith(b_tag):  # read with its A
                    if k[: -len(b_tag)] + a_tag not in name_set:
                        raise CheckpointError(
                            label, f"adapter tensor {k!r} has no matching {a_tag.strip('.')}"
                        )
                    break
            else:
                mag = next((t for t in _MAGNITUDE if stripped.endswith(t)), None)
                if mag is not None:
                    magnitudes[stripped[: -len(mag)]] = k
                elif stripped.endswith(".lora_B.bias"):
                    biases[stripped[: -len(".lora_B.bias")]] = k
                elif ".lora_" in stripped:
                    raise CheckpointError(
                        label,
                        f"adapter tensor {k!r} is not a LoRA, DoRA or lora_bias weight; refused",
                    )
                elif ".original_module." not in f".{stripped}":  # the untrained copy
                    self._add_plain(k, stripped, layer)
        for pair in pairs:
            self._add_pair(*pair)
        self._attach(magnitudes, biases)

    def _add_pair(self, module: str, ak: str, bk: str, emb: bool) -> None:
        target = self._match(f"{module}.weight")
        if target is None:
            raise CheckpointError(
                self.source, f"adapter targets {module}.weight, which the base does not have"
            )
        if target in self._factors:
            raise CheckpointError(self.source, f"adapter has two LoRA pairs for {target!r}")
        rank = self._check_pair(target, ak, bk, emb)
        r = _pattern_value(self._rank_pattern, module, self._r, self.source, "rank_pattern")
        if rank != r:
            raise CheckpointError(
                self.source,
                f"adapter tensor {ak!r} has rank {rank} but adapter_config.json's r/rank_pattern "
                f"gives {int(r)} for {module}",
            )
        alpha = _pattern_value(
            self._alpha_pattern, module, self._alpha, self.source, "alpha_pattern"
        )
        scale = alpha / math.sqrt(rank) if self._rs else alpha / rank
        fan = self._fan and not emb  # PEFT's embeddings ignore fan_in_fan_out
        self._factors[target] = _Factor(module, ak, bk, emb, fan, scale)

    def _add_plain(self, k: str, stripped: str, layer: bool) -> None:
        plain = stripped.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
        target = self._match(plain)
        if target is None:
            self._extra[plain] = k
            return
        have, want = tuple(self._adapter.meta(k).shape), tuple(self._base.meta(target).shape)
        if have != want:
            why = (
                f"adapter tensor {k!r} replaces {target!r} with shape {list(have)} "
                f"but the base has {list(want)}"
            )
            if not have or not have[0] or len(have) != len(want) or have[1:] != want[1:]:
                raise CheckpointError(self.source, why)
            self.resized[target] = why  # other rows: a resized vocabulary, aligned by token
        table = self._layer if layer else self._replace
        old = table.get(target)
        if old is not None:  # PEFT writes a trained module as both <m>.weight and
            mts = plain != stripped  # <m>.modules_to_save.weight: the same tensor
            if (".modules_to_save" in old) == mts or self._adapter.meta(old).shape != have:
                raise CheckpointError(
                    self.source, f"adapter tensors {old!r} and {k!r} both replace {target!r}"
                )
            if not mts:
                return
        table[target] = k

    def _attach(self, magnitudes: dict[str, str], biases: dict[str, str]) -> None:
        """Pair DoRA magnitudes and lora_bias biases with their A/B pairs; refuse strays."""
        for target in [t for t in self._layer if t not in self._factors]:
            if target in self._replace:  # a base-layer copy without LoRA: the tensor itself
                raise CheckpointError(
                    self.source,
                    f"adapter tensors {self._replace[target]!r} and {self._layer[target]!r} "
                    f"both replace {target!r}",
                )
            self._replace[target] = self._layer.pop(target)
        modules = {f.module: (t, f) for t, f in self._factors.items()}
        for module, (t, _) in modules.items():
            if t in self._replace:
                raise CheckpointError(
                    self.source, f"adapter both trains {module!r} whole and puts LoRA on it"
                )
        if magnitudes and not self._dora:
            raise CheckpointError(
                self.source,
                f"adapter tensor {next(iter(magnitudes.values()))!r} is a DoRA magnitude but "
                "adapter_config.json's use_dora is not true",
            )
        if self._dora and self._lora_bias:
            raise CheckpointError(
                self.source,
                "adapter_config.json sets both use_dora and lora_bias (PEFT forbids it)",
            )
        for module, (target, f) in modules.items():
            if not self._dora:
                continue
            mk = magnitudes.pop(module, None)
            if mk is None:
                raise CheckpointError(
                    self.source, f"use_dora is set but {module!r} has no lora_magnitude_vector"
                )
            m, shape = self._adapter.meta(mk), self._shape(target)
            rows = shape[1] if (f.emb or f.fan) else shape[0]
            if not m.is_float or tuple(m.shape) != (rows,):
                raise CheckpointError(
                    self.source,
                    f"DoRA magnitude {mk!r} has shape {list(m.shape)}; {target!r} needs [{rows}]",
                )
            self._factors[target] = _Factor(module, f.a, f.b, f.emb, f.fan, f.scale, mk)
        if magnitudes:
            raise CheckpointError(
                self.source,
                f"DoRA magnitude {next(iter(magnitudes.values()))!r} has no LoRA A/B pair",
            )
        if biases and not self._lora_bias:
            raise CheckpointError(
                self.source,
                f"adapter tensor {next(iter(biases.values()))!r} is a LoRA bias but "
                "adapter_config.json's lora_bias is not true",
            )
        for module, bk in biases.items():
            if module not in modules or modules[module][1].emb:
                raise CheckpointError(self.source, f"LoRA bias {bk!r} has no LoRA A/B pair")
            bias = self._match(f"{module}.bias")
            if bias is None:
                raise CheckpointError(
                    self.source,
                    f"lora_bias trains a bias for {module}, whose base layer has no bias "
                    "(PEFT cannot merge it)",
                )
            have, want = self._adapter.meta(bk), self._shape(bias)
            if not have.is_float or tuple(have.shape) != tuple(want):
                raise CheckpointError(
                    self.source,
                    f"LoRA bias {bk!r} has shape {list(have.shape)} but {bias!r} has {list(want)}",
                )
            self._bias_add[bias] = (bk, modules[module][1].scale)

    def _check_pair(self, target: str, ak: str, bk: str, emb: bool) -> int:
        """Refuse, from headers alone, an A/B pair whose product cannot be the base's shape."""
        a, b = self._adapter.meta(ak), self._adapter.meta(bk)
        if not (a.is_float and b.is_float):
            raise CheckpointError(
                self.source, f"adapter tensors {ak!r}/{bk!r} are not floating-point"
            )
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != a.shape[0] or a.shape[0] == 0:
            raise CheckpointError(
                self.source,
                f"adapter tensors {ak!r} {list(a.shape)} and {bk!r} {list(b.shape)} are not a rank-r pair",
            )
        shape = (a.shape[1], b.shape[0]) if emb else (b.shape[0], a.shape[1])
        if self._fan and not emb:
            shape = (shape[1], shape[0])
        expected = self._shape(target)
        if shape != expected:
            grown = shape[1:] == expected[1:] and target not in self._layer
            raise CheckpointError(
                self.source,
                f"adapter update for {target!r} has shape {list(shape)} but the base has "
                f"{list(expected)}"
                + (
                    " (LoRA on a resized vocabulary: the adapter lacks the resized layer, which "
                    "PEFT saves as '<module>.base_layer.weight')"
                    if grown
                    else ""
                ),
            )
        return int(a.shape[0])

    def _shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` before any LoRA update: the adapter's copy or replacement of it
        (a resized vocabulary's rows), else the base's."""
        src = self._layer.get(key) or self._replace.get(key)
        return tuple((self._adapter.meta(src) if src else self._base.meta(key)).shape)

    def _match(self, name: str) -> str | None:
        if name in self._base_keys:
            return name
        hits = [b for b in self._base_keys if b.endswith("." + name) or name.endswith("." + b)]
        return hits[0] if len(hits) == 1 else None

    def keys(self) -> list[str]:
        return [*self._base.keys(), *self._extra]

    def meta(self, key: str) -> TensorMeta:
        if key in self._extra:
            return self._adapter.meta(self._extra[key])
        if key in self._replace and key not in self._bias_add:
            return self._adapter.meta(self._replace[key])
        m = self._base.meta(key)
        if key in self._factors or key in self._bias_add:
            return TensorMeta("F32", self._shape(key))
        return m

    def delta(self, key: str) -> torch.Tensor:
        """``scale·B·A`` for a targeted weight, in the base's layout (float32)."""
        f = self._factors[key]
        a = self._adapter.get(f.a).float()
        b = self._adapter.get(f.b).float()
        d = (b @ a).T if f.emb or f.fan else b @ a
        expected = self._shape(key)
        if tuple(d.shape) != expected:
            raise CheckpointError(
                self.source,
                f"adapter update for {key!r} has shape {list(d.shape)} but the base has {list(expected)}",
            )
        return d * f.scale

    def _dora_merge(self, key: str, w: torch.Tensor, mk: str) -> torch.Tensor:
        """PEFT's DoRA merge: ``m·(W + ΔW)/‖W + ΔW‖``, the norm over each output row of the
        (out, in) layout (embeddings and ``fan_in_fan_out`` weights are stored transposed)."""
        f = self._factors[key]
        v = w + self.delta(key)
        v_rows = v.T if f.emb or f.fan else v
        m = self._adapter.get(mk).float().reshape(-1)
        merged = (m / torch.linalg.norm(v_rows, dim=1)).view(-1, 1) * v_rows
        if not bool(torch.isfinite(merged).all()):
            raise CheckpointError(self.source, f"DoRA merge of {key!r} is not finite (a zero row?)")
        return merged.T if f.emb or f.fan else merged

    def get(self, key: str) -> torch.Tensor:
        if key in self._extra:
            return self._adapter.get(self._extra[key])
        if key in self._replace and key not in self._bias_add:
            return self._adapter.get(self._replace[key])
        src = self._replace.get(key) or self._layer.get(key)
        w = self._adapter.get(src) if src else self._base.get(key)
        if key in self._bias_add:
            bk, scale = self._bias_add[key]
            return w.float() + scale * self._adapter.get(bk).float().reshape(w.shape)
        if key in self._factors:
            mk = self._factors[key].magnitude
            return self._dora_merge(key, w.float(), mk) if mk else w.float() + self.delta(key)
        return w


def check_config(config: Mapping[str, Any], label: str) -> None:
    """Refuse, by name, an adapter type or config key that mergeflow cannot fold exactly."""
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            label, f"adapter type {config.get('peft_type')!r} is not supported (only LORA)"
        )
    for key, value in config.items():
        shown = repr(value)[:60]
        unset = any(value is v for v in (None, False)) or value in ([], {}, "")
        if key in _REFUSED and not unset:
            raise CheckpointError(
                label, f"adapter_config.json sets {key}={shown} ({_REFUSED[key]}); refused"
            )
        # A key newer PEFT versions add is written unset (None/False/empty) unless used, and
        # an unset option changes nothing; a set one that mergeflow does not know is refused.
        if key not in _REFUSED and key not in _READ and key not in _NO_EFFECT and not unset:
            raise CheckpointError(
                label,
                f"adapter_config.json sets {key}={shown}, an option mergeflow does not know "
                "(PEFT 0.21's LoraConfig has no such key); refused",
            )
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        if not any(config.get(key) is v for v in (True, False, None)):
            raise CheckpointError(label, f"adapter_config.json's {key} must be true or false")
    init = config.get("init_lora_weights", True)
    if not any(init is s if isinstance(s, bool) else init == s for s in _SAFE_INITS):
        raise CheckpointError(
            label,
            f"adapter_config.json sets init_lora_weights={repr(init)[:60]}, whose adapter fits a "
            "changed base (convert it with save_pretrained's "
            "path_initial_model_for_weight_conversion); refused",
        )
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise CheckpointError(
            label, f"adapter_config.json sets bias={repr(config.get('bias'))[:60]}; refused"
        )


def _lora_numbers(config: Mapping[str, Any], label: str) -> tuple[float, int]:
    """``lora_alpha`` (finite) and ``r`` (a positive integer) of an adapter config."""
    alpha, r = config.get("lora_alpha"), config.get("r")
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or not isinstance(r, int)
        or isinstance(r, bool)
        or r <= 0
    ):
        raise CheckpointError(
            label,
            "adapter_config.json needs a finite number 'lora_alpha' and a positive integer 'r'",
        )
    return float(alpha), r


def _pattern(value: Any, name: str, label: str, ints: bool) -> dict[str, float]:
    """``rank_pattern`` (positive integers) or ``alpha_pattern`` (finite numbers)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and (not ints or (isinstance(v, int) and v > 0))
        for v in value.values()
    ):
        kind = "positive integers" if ints else "finite numbers"
        raise CheckpointError(
            label, f"adapter_config.json's {name} must map module names to {kind}"
        )
    return {str(k): float(v) for k, v in value.items()}


def _pattern_value(
    patterns: dict[str, float], module: str, default: float, label: str, name: str
) -> float:
    """PEFT's ``get_pattern_key``: the first key that, as a regex, matches the end of the
    module's name at a dot boundary; else the default."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            raise CheckpointError(
                label, f"adapter_config.json's {name} key {key!r} is not a valid pattern"
            ) from None
    return default
