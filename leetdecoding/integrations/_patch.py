"""What every model integration shares: reversible patching of layer instances and the report of what ran.

An integration describes its layers once, as an `Integration`, and writes only what is specific to its model: the
forward that replaces a layer's (computed with `leetdecoding.layers`), and how it reads the model's decay and cache.

    _MODEL = Integration(layer_type=SomeAttention, forward=_forward, describe=_index_heads_and_head_dim,
                         model="a transformers Some model", examples="SomeForCausalLM, SomeModel, ...")
    _MODEL.patch(model, method)    # each layer instance gets `forward` = partial(_forward, layer) and a record
    _MODEL.unpatch(model)          # the original forwards back, exactly
    _MODEL.report(model)           # per layer: patched or not, the method asked for, the methods that ran

Only instances change, never a class or a process-wide global. A patched layer holds two instance attributes:
`forward` (a functools.partial, which pickles, unlike a bound method) and `_leetdecoding_patch` (its
`PatchRecord`). No parameter or buffer is added, renamed or removed, so `state_dict` and `load_state_dict` see the
same model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

import leetdecoding as ld
from leetdecoding.decay import log_decay_from

ATTR = "_leetdecoding_patch"  # the instance attribute that holds a patched layer's PatchRecord


@dataclass
class PatchRecord:
    """What `Integration.patch` keeps on a layer: the forward to restore, the method asked for, the calls made."""

    method: str
    original: object  # the instance attribute `forward` before patching, or None when there was none
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    log_decays: dict = field(default_factory=dict)  # (device, dtype) -> the log-decay tensor kept for a GPU

    def count(self, path: str, method: str) -> None:
        per_path = self.calls.setdefault(path, {})
        per_path[method] = per_path.get(method, 0) + 1

    @contextmanager
    def counting(self, continues: bool) -> Iterator[None]:
        """Counts every leetdecoding call made inside, by the method its dispatcher chose (`record_choices`):
        under "decode" for a decode step, else "continue" when the call `continues` from a cached state, else
        "prefill"."""
        with ld.record_choices() as made:
            yield
        for choice in made:
            path = "decode" if choice.operation == "decode_step" else "continue" if continues else "prefill"
            self.count(path, choice.method.name)

    def log_decay(self, source: torch.Tensor, to_log_decay, heads: int, device: torch.device, dtype: torch.dtype):
        """log lambda (heads,) of a decay the model keeps in its own form (see `leetdecoding.decay.log_decay_from`;
        `to_log_decay` a module-level function), holding `source`'s values at this call.

        leetdecoding checks a decay tensor on a GPU once per tensor and version (the check reads its values: a
        host sync), so a new tensor per call would be checked at every token of every layer. On a GPU this layer
        keeps one tensor and writes the current values into it through `.data`, which keeps its version: the values
        have just been checked through `source` (once per `source` tensor and version, as log_decay_from does)."""
        current = log_decay_from(source, to_log_decay, heads, device, dtype)
        if current.is_cpu:  # remembered by value there: the same values give the same tensor
            return current
        kept = self.log_decays.get((device, dtype))
        if kept is None or kept.shape != current.shape:
            with torch.inference_mode(False):  # an inference tensor has no version, and would be checked per call
                kept = current.clone()
            self.log_decays[(device, dtype)] = kept
        else:
            kept.data.copy_(current)
        return kept


@dataclass
class LayerReport:
    """One attention layer: where it is, its shape, and what leetdecoding did with it."""

    name: str
    layer_idx: int
    heads: int
    head_dim: int
    patched: bool
    method: str | None  # the method asked for at patch time ("auto" lets the dispatcher choose per call)
    calls: dict[str, dict[str, int]]  # "prefill" / "continue" / "decode" -> {method used: number of calls}


@dataclass
class PatchReport:
    """What `patch`, `unpatch` or `report` found in a model: one entry per attention layer it patches."""

    model: str
    layers: list[LayerReport]
    kind: str = "attention"  # what the layers are called when printed

    @property
    def patched(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.patched]

    def __str__(self) -> str:
        lines = [f"{self.model}: {len(self.patched)} of {len(self.layers)} {self.kind} layers patched"]
        for r in self.layers:
            used = "; ".join(
                f"{path}: " + ", ".join(f"{m} x{c}" for m, c in per.items()) for path, per in r.calls.items()
            )
            state = f"method={r.method}" if r.patched else "not patched"
            lines.append(
                f"  {r.name} (layer {r.layer_idx}, {r.heads} heads x {r.head_dim}): {state}"
                + (f"; used {used}" if used else "")
            )
        return "\n".join(lines)


def check_method(method) -> str:
    """An attention method for a patched model: "auto" or a name from `leetdecoding.list_methods()` (every
    attention method carries a state from call to call; decode steps choose their own method).

    Raises:
        TypeError: `method` is not a string.
        ValueError: it names no attention method.
    """
    names = [m["name"] for m in ld.list_methods() if m["operation"] == "attention"]
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, 'auto' or one of {', '.join(names)}; got {type(method).__name__}.")
    if method != "auto" and method not in names:
        raise ValueError(
            f"method must be 'auto' or an attention method ({', '.join(names)}); got {method!r}. "
            "Hint: leetdecoding.list_methods() lists them."
        )
    return method


def record(layer: nn.Module) -> PatchRecord:
    """The record of a patched layer (its patched forward reads it at every call)."""
    return layer.__dict__[ATTR]


@dataclass(frozen=True)
class Integration:
    """The layers of one model family that an integration patches, and the forward that replaces theirs."""

    layer_type: type  # the attention class whose instances are patched
    forward: Callable  # forward(layer, *args, **kwargs): set on each instance as functools.partial(forward, layer)
    describe: Callable[[nn.Module], tuple[int, int, int]]  # layer -> (layer index, heads, head dim)
    model: str  # what the errors call the model, e.g. "a transformers MiniMax model"
    examples: str = ""  # its classes, e.g. "MiniMaxForCausalLM, MiniMaxModel, ..."
    kind: str = "attention"  # what the report calls the layers
    hint: str = ""  # appended to the error for a model without such layers

    def layers(self, model, what: str) -> list[tuple[str, nn.Module]]:
        """(name, layer) of every layer of `layer_type` in `model`.

        Raises:
            TypeError: `model` is not an nn.Module.
            ValueError: it has no such layer.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"{what} expects {self.model} (an nn.Module); got {type(model).__name__}.")
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, self.layer_type)]
        if not found:
            examples = f" ({self.examples})" if self.examples else ""
            hint = f" Hint: {self.hint}" if self.hint else ""
            raise ValueError(
                f"{what} expects {self.model}{examples} with at least one {self.layer_type.__name__} layer; "
                f"{type(model).__name__} has none.{hint}"
            )
        return found

    def is_ours(self, layer: nn.Module) -> bool:
        """Whether the layer's instance `forward` is still the one `patch` set."""
        fwd = layer.__dict__.get("forward")
        return isinstance(fwd, functools.partial) and fwd.func is self.forward and fwd.args[0] is layer

    def report(self, model) -> PatchReport:
        layers = []
        for name, m in self.layers(model, "report"):
            rec = m.__dict__.get(ATTR)
            layer_idx, heads, head_dim = self.describe(m)
            layers.append(
                LayerReport(
                    name=name or type(m).__name__,
                    layer_idx=layer_idx,
                    heads=heads,
                    head_dim=head_dim,
                    patched=rec is not None,
                    method=rec.method if rec is not None else None,
                    calls={p: dict(c) for p, c in rec.calls.items()} if rec is not None else {},
                )
            )
        return PatchReport(type(model).__name__, layers, self.kind)

    def patch(self, model, method: str) -> PatchReport:
        """Patch every layer (a patched layer only gets the new method); `method` checked by the caller."""
        for _name, m in self.layers(model, "patch"):
            rec = m.__dict__.get(ATTR)
            if rec is not None:
                rec.method = method
                continue
            setattr(m, ATTR, PatchRecord(method=method, original=m.__dict__.get("forward")))
            m.forward = functools.partial(self.forward, m)
        return self.report(model)

    def unpatch(self, model) -> PatchReport:
        """Restore every patched layer's forward exactly (an instance forward it had, or none).

        Raises:
            ValueError: a patched layer's forward was replaced after `patch` (nothing is restored then).
        """
        layers = self.layers(model, "unpatch")
        for name, m in layers:
            if m.__dict__.get(ATTR) is not None and not self.is_ours(m):
                raise ValueError(
                    f"{name}.forward was replaced after patch(); unpatch would discard that change. Restore it first."
                )
        for _name, m in layers:
            rec = m.__dict__.pop(ATTR, None)
            if rec is None:
                continue
            if rec.original is None:
                del m.forward
            else:
                m.forward = rec.original
        return self.report(model)
