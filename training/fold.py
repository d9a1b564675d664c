"""Fold every BatchNorm of an eval-mode model into a conv/linear neighbour where that is exact.

The model is traced with torch.fx, so ``self.bn(self.conv(x))``, residual blocks and functional
``F.batch_norm`` calls with constant statistics are found, not only ``nn.Sequential``
neighbours. Each BatchNorm is folded into the layer that produces its input (*bn-after*) or,
failing that, into every layer that consumes its output (*bn-before*), through pure data-movement
ops (flatten, view, transpose, ...) in between when its channel axis lines up with the layer's
feature axis. Anything else is left in place with the reason in the report: the rules are the
ones tools such as ``torch.fx.experimental.optimization.fuse`` get wrong (a module called at two
sites, zero padding after a BN, the channel layout of grouped transposed convolutions).

The result is checked against a float64 copy of the original on a probe batch by default, and a
mismatch raises :class:`FoldVerificationError` naming the worst folded layer. The arithmetic
itself lives in :mod:`training.fold_math`; this module only decides what to fold and rewrites.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from training import fold_math
from training.bn.layers import require_eval_mode
from training.errors import (
    FoldRangeError,
    FoldVerificationError,
    MissingProbeInputError,
    UntraceableModelError,
)
from training.fold_records import Direction, Exactness, FoldedBN, SkipKind, SkippedBN
from training.fold_report import FoldReport, FoldVerification, ModelCounts
from training.fold_verify import Recorder, verify_fold

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYER_TYPES = (*_CONV_TYPES, *_TRANSPOSED_TYPES, nn.Linear)
# Ops that only move elements; a BN may fold across them when its channels line up.
_LAYOUT_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_LAYOUT_FUNCTIONS = frozenset(
    {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze}
)
_LAYOUT_METHODS = frozenset(
    {"flatten", "unflatten", "view", "reshape", "transpose", "permute", "contiguous"}
    | {"squeeze", "unsqueeze", "swapaxes"}
)
# Functional BatchNorm: its arguments are bound by name, so positional and keyword calls agree.
_BN_SIGNATURE = inspect.signature(F.batch_norm)


# --------------------------------------------------------------------------- public API


def fold_model(
    model: nn.Module,
    example_input: Tensor | None = None,
    *,
    verify: bool = True,
    tolerance: float | None = None,
    probe_batch_size: int = 4,
    seed: int = 0,
) -> tuple[fx.GraphModule, FoldReport]:
    """Return a folded copy of an eval-mode ``model`` and a report; ``model`` is not mutated.

    ``example_input`` is the calibration batch used to trace shapes and to verify; without it a
    probe batch with non-zero mean and varied scale is built from ``model.input_shape``.
    ``tolerance`` overrides training.tolerances' ``("fold", dtype)`` entry.
    """
    require_eval_mode(model, "fold")
    probe = make_probe(model, probe_batch_size, seed) if example_input is None else example_input
    graph_module = _trace(model)
    reference = copy.deepcopy(graph_module) if verify else None
    unfolded = Recorder(graph_module).run_recorded(probe)
    folder = _FxFolder(graph_module, unfolded.shapes, unfolded.values)
    bns_before = folder.bn_count()
    skipped = folder.run()
    folded = _finish(graph_module, model)
    report = FoldReport(
        model=type(model).__name__,
        folded=tuple(folder.folded),
        skipped=tuple(skipped),
        before=_counts(model, bns_before),
        after=_counts(folded, folder.bn_count()),
        foldable_left=folder.foldable_left(),
    )
    if reference is not None:
        source = "caller's batch" if example_input is not None else "generated"
        check = verify_fold(reference, folded, probe, unfolded.result, folder.value_map, tolerance)
        report = replace(report, verification=replace(check, probe=source))
        if not check.passed:
            raise FoldVerificationError(report, check)
    return folded, report


def make_probe(model: nn.Module, batch_size: int = 4, seed: int = 0) -> Tensor:
    """A reproducible batch for ``model.input_shape`` with non-zero, varied per-channel means.

    Zero-mean unit inputs would hide bias mistakes (a wrong shift term times a zero-mean input
    averages out), so every channel gets its own offset of 0.5–2 and its own scale of 0.1–10.
    """
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise MissingProbeInputError(
            f"{type(model).__name__} has no input_shape attribute: pass example_input "
            "(a batch the model accepts) so the folder can trace shapes and verify the fold"
        )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *shape), generator=gen, dtype=torch.float64)
    if len(shape) >= 1:
        view = (1, shape[0], *([1] * (len(shape) - 1)))
        sign = torch.randint(0, 2, (shape[0],), generator=gen).double() * 2 - 1
        mean = sign * (0.5 + 1.5 * torch.rand(shape[0], generator=gen, dtype=torch.float64))
        scale = 10 ** (2 * torch.rand(shape[0], generator=gen, dtype=torch.float64) - 1)
        x = mean.reshape(view) + scale.reshape(view) * x
    like = _first_float_tensor(model)
    return x.to(device=like.device, dtype=like.dtype) if like is not None else x.float()


# --------------------------------------------------------------------------- set-up


class _FoldTracer(fx.Tracer):
    """Keeps every BatchNorm, including user subclasses, as one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    root = copy.deepcopy(model)  # never touch the caller's modules
    tracer = _FoldTracer()
    try:
        graph = tracer.trace(root)
    except Exception as exc:
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}: {exc}. Folding needs a traceable "
            "forward (no data-dependent control flow)."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _first_float_tensor(model: nn.Module) -> Tensor | None:
    tensors = [*model.parameters(), *model.buffers()]
    return next((t for t in tensors if t.is_floating_point()), None)


def _finish(graph_module: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Rebuild so only referenced modules survive, and keep plain attributes such as config."""
    graph_module.graph.lint()
    result = fx.GraphModule(graph_module, graph_module.graph, type(model).__name__)
    for name, value in vars(model).items():
        plain = not isinstance(value, Tensor | nn.Module) and not name.startswith("_")
        if plain and name != "training" and not hasattr(result, name):
            setattr(result, name, value)
    return result.eval()


def _counts(model: nn.Module, batchnorms: int) -> ModelCounts:
    return ModelCounts(
        parameters=sum(p.numel() for p in model.parameters()),
        buffers=sum(b.numel() for b in model.buffers()),
        leaf_modules=sum(1 for m in model.modules() if not any(True for _ in m.children())),
        batchnorms=batchnorms,
    )


# --------------------------------------------------------------------------- graph analysis


@dataclass(frozen=True)
class _BNSite:
    node: fx.Node
    source: fx.Node  # the tensor it normalises
    name: str
    mean: Tensor | None
    var: Tensor | None
    eps: float
    weight: Tensor | None
    bias: Tensor | None
    problem: tuple[SkipKind, str] | None = None  # (kind, reason)


@dataclass(frozen=True)
class _Blocked:
    kind: SkipKind
    reason: str


@dataclass(frozen=True)
class _Plan:
    site: _BNSite
    direction: Direction
    exactness: Exactness
    layers: tuple[fx.Node, ...]
    params: tuple[tuple[Tensor, Tensor | None], ...]


def _is_bn_node(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(str(node.target)), _BatchNorm)
    return node.op == "call_function" and node.target is F.batch_norm


def _layer_problem(module: nn.Module) -> str | None:
    """Why this module's weights cannot simply be rescaled, or None when they can."""
    base = next(t for t in _LAYER_TYPES if isinstance(module, t))
    for method in ("forward", "_conv_forward"):
        if getattr(type(module), method, None) is not getattr(base, method, None):
            return f"it is a {type(module).__name__}, whose own {method} may transform its weight"
    if parametrize.is_parametrized(module) or module._forward_pre_hooks or module._forward_hooks:
        return "its weight is computed by a parametrization or hook at call time"
    return None


def _zero_padded(conv: nn.Module) -> bool:
    pads = getattr(conv, "_reversed_padding_repeated_twice", ())
    return getattr(conv, "padding_mode", "zeros") == "zeros" and any(p > 0 for p in pads)


def _channel_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _index_tensor(shape: tuple[int, ...], axis: int) -> Tensor:
    """A tensor of ``shape`` whose every element holds its own index along ``axis``."""
    axis %= len(shape)
    ids = torch.arange(shape[axis]).reshape([-1 if d == axis else 1 for d in range(len(shape))])
    return ids.expand(shape).contiguous()


def _constant_along(ids: Tensor, axis: int) -> Tensor | None:
    """The value per slice of ``axis`` if every slice holds a single value, else None."""
    moved = ids.movedim(axis, 0).reshape(ids.shape[axis], -1)
    return moved[:, 0].clone() if bool((moved == moved[:, :1]).all()) else None


class _NotConstantError(Exception):
    pass


class _FxFolder:
    """Plans and applies folds on one traced graph until no BatchNorm can fold any more."""

    def __init__(
        self, graph_module: fx.GraphModule, shapes: Mapping[str, tuple[int, ...]], values: Mapping
    ) -> None:
        self.gm = graph_module
        self.shapes = shapes
        self.values = values
        self.folded: list[FoldedBN] = []
        # folded-graph node -> (reference node with the same value, label for reports)
        self.value_map: dict[str, tuple[str, str]] = {}

    # ----- driver

    def run(self) -> list[SkippedBN]:
        for _ in range(len(self._bn_nodes()) + 1):  # every pass folds at least one BN
            outcomes = [self._plan(node) for node in self._bn_nodes()]
            plans = [o for o in outcomes if isinstance(o, _Plan)]
            if not plans:
                return [o for o in outcomes if isinstance(o, SkippedBN)]
            touched: set[str] = set()
            for plan in plans:  # plans sharing a layer were computed from the same weights
                targets = {str(n.target) for n in plan.layers}
                if not targets & touched:
                    touched |= targets
                    self._apply(plan)
        return []

    def foldable_left(self) -> int:
        return sum(isinstance(self._plan(n), _Plan) for n in self._bn_nodes())

    def bn_count(self) -> int:
        return len(self._bn_nodes())

    def _bn_nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if _is_bn_node(self.gm, n)]

    def _call_sites(self) -> Counter[str]:
        return Counter(str(n.target) for n in self.gm.graph.nodes if n.op == "call_module")

    # ----- BatchNorm sites

    def _site(self, node: fx.Node) -> _BNSite:
        if node.op == "call_module":
            bn = self.gm.get_submodule(str(node.target))
            name = str(node.target)
            if self._call_sites()[name] > 1:
                name = f"{name}@{node.name}"
            source = node.args[0]
            assert isinstance(source, fx.Node)  # nn.Module calls take their input positionally
            stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            site = _BNSite(node, source, name, *stats)
        else:
            site = self._functional_site(node)
        if site.problem is not None:
            return site
        if site.mean is None or site.var is None:
            reason = "it has no running statistics (track_running_stats=False): it always "
            return replace(site, problem=("no-running-stats", reason + "uses batch statistics"))
        problem = fold_math.statistics_problem(
            site.mean, site.var, site.eps, site.weight, site.bias
        )
        return replace(site, problem=("bad-statistics", problem)) if problem else site

    def _functional_site(self, node: fx.Node) -> _BNSite:
        bound = _BN_SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        args = bound.arguments
        tensors: dict[str, Tensor | None] = {}
        problem = None
        for key in ("running_mean", "running_var", "weight", "bias"):
            value = args.get(key)
            if isinstance(value, fx.Node) and value.op != "get_attr":
                problem = ("batch-statistics", f"its {key} is computed at run time, not a constant")
            tensors[key] = self._attr(value) if isinstance(value, fx.Node) else value
        if args["training"] is not False:
            problem = ("batch-statistics", "it is called with training=True (batch statistics)")
        if not isinstance(args["eps"], float | int):
            problem = ("batch-statistics", "its eps is not a constant")
        eps = float(args["eps"]) if isinstance(args["eps"], float | int) else 0.0
        source = args.get("input")
        if not isinstance(source, fx.Node):
            source, problem = node, ("batch-statistics", "its input is not a traced tensor")
        stats = (tensors["running_mean"], tensors["running_var"], eps)
        name = _owner(args["running_mean"]) or node.name
        return _BNSite(node, source, name, *stats, tensors["weight"], tensors["bias"], problem)

    def _attr(self, node: fx.Node) -> Tensor | None:
        if node.op != "get_attr":
            return None
        value: Any = self.gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value

    # ----- planning

    def _plan(self, node: fx.Node) -> _Plan | SkippedBN:
        site = self._site(node)
        if site.problem is not None:
            return SkippedBN(site.name, *site.problem)
        assert site.mean is not None
        assert site.var is not None
        scale, shift = fold_math.bn_scale_shift(
            site.mean, site.var, site.eps, site.weight, site.bias
        )
        after = self._plan_after(site, scale, shift)
        if isinstance(after, _Plan):
            return after
        before = self._plan_before(site, scale, shift)
        if isinstance(before, _Plan):
            return before
        chosen = after if after.kind != "no-adjacent-layer" else before
        reason = f"as bn-after, {after.reason}; as bn-before, {before.reason}"
        return SkippedBN(site.name, chosen.kind, reason)

    def _plan_after(self, site: _BNSite, scale: Tensor, shift: Tensor) -> _Plan | _Blocked:
        chain: list[fx.Node] = []
        producer = site.source
        while self._is_layout(producer) and len(producer.users) == 1:
            chain.insert(0, producer)
            producer = producer.args[0]  # type: ignore[assignment]  # _is_layout checked it
        module = self._layer(producer)
        if module is None:
            return _Blocked("no-adjacent-layer", f"its input comes from {self._describe(producer)}")
        blocked = self._layer_blocker(producer, module)
        if blocked:
            return blocked
        if len(producer.users) > 1:
            others = [self._describe(u) for u in producer.users if u not in (*chain, site.node)]
            reason = f"{producer.target}'s output also feeds {', '.join(others)}"
            return _Blocked("shared-output", reason)
        channel_of = self._map_after(producer, module, chain)
        if channel_of is None:
            axis = "last" if isinstance(module, nn.Linear) else "channel"
            reason = f"the BN's channel axis is not {producer.target}'s {axis} (feature) axis"
            return _Blocked("axis-mismatch", reason)
        s, t = scale[channel_of], shift[channel_of]
        try:
            params = _cast_params(module, *_fold_after(module, s, t))
        except FoldRangeError as exc:
            return _Blocked("dtype-range", f"folding into {producer.target}: {exc}")
        exactness: Exactness = "scale-only" if bool((t == 0).all()) else "exact"
        return _Plan(site, "bn-after", exactness, (producer,), (params,))

    def _plan_before(self, site: _BNSite, scale: Tensor, shift: Tensor) -> _Plan | _Blocked:
        users = list(site.node.users)
        if not users:
            return _Blocked("no-adjacent-layer", "its output is unused")
        layers, params, scale_only = [], [], True
        for user in users:
            found = self._plan_consumer(site, user, scale, shift)
            if isinstance(found, _Blocked):
                if len(users) > 1:
                    reason = f"its output feeds {len(users)} places and {found.reason}"
                    return _Blocked(found.kind, reason)
                return found
            layers.append(found[0])
            params.append(found[1])
            scale_only &= found[2]
        exactness: Exactness = "scale-only" if scale_only else "exact"
        return _Plan(site, "bn-before", exactness, tuple(layers), tuple(params))

    def _plan_consumer(
        self, site: _BNSite, user: fx.Node, scale: Tensor, shift: Tensor
    ) -> tuple[fx.Node, tuple[Tensor, Tensor | None], bool] | _Blocked:
        chain, prev, consumer = [], site.node, user
        while self._is_layout(consumer) and consumer.args[0] is prev and len(consumer.users) == 1:
            chain.append(consumer)
            prev, consumer = consumer, next(iter(consumer.users))
        module = self._layer(consumer)
        if module is None or not _reads_only(consumer, prev):
            return _Blocked("no-adjacent-layer", f"its output feeds {self._describe(consumer)}")
        blocked = self._layer_blocker(consumer, module)
        if blocked:
            return blocked
        channel_of = self._map_before(site.node, chain, module)
        if channel_of is None:
            reason = f"the BN's channel axis does not line up with {consumer.target}'s input axis"
            return _Blocked("axis-mismatch", reason)
        s, t = scale[channel_of], shift[channel_of]
        scale_only = bool((t == 0).all())
        inexact = None if scale_only else _inexact_before(module, str(consumer.target))
        if inexact:
            return _Blocked("inexact", inexact)
        try:
            params = _cast_params(module, *_fold_before(module, s, t))
        except FoldRangeError as exc:
            return _Blocked("dtype-range", f"folding into {consumer.target}: {exc}")
        return consumer, params, scale_only

    def _layer(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        module = self.gm.get_submodule(str(node.target))
        return module if isinstance(module, _LAYER_TYPES) else None

    def _layer_blocker(self, node: fx.Node, module: nn.Module) -> _Blocked | None:
        problem = _layer_problem(module)
        if problem:
            return _Blocked("unsupported-layer", f"{node.target} is not folded into: {problem}")
        sites = self._call_sites()[str(node.target)]
        if sites > 1:
            reason = f"{node.target} is called at {sites} sites; folding would change every call"
            return _Blocked("multi-call-site", reason)
        return None

    # ----- channel layout across flatten/view/transpose

    def _is_layout(self, node: fx.Node) -> bool:
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(str(node.target)), _LAYOUT_MODULES)
        if node.op == "call_method":
            return node.target in _LAYOUT_METHODS
        return node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS

    def _map_after(
        self, producer: fx.Node, module: nn.Module, chain: list[fx.Node]
    ) -> Tensor | None:
        """For each output feature of ``producer``, the BN channel it lands in (a bijection)."""
        shape = self.shapes[producer.name]
        axis = _channel_axis(module) % len(shape)
        if not chain:
            return torch.arange(shape[1]) if axis == 1 else None
        ids = self._follow(_index_tensor(shape, axis), chain)
        feature_of = None if ids is None or ids.ndim < 2 else _constant_along(ids, 1)
        features = torch.arange(shape[axis])
        if feature_of is None or not torch.equal(feature_of.sort().values, features):
            return None
        channel_of = torch.empty_like(feature_of)
        channel_of[feature_of] = torch.arange(len(feature_of))
        return channel_of

    def _map_before(self, bn: fx.Node, chain: list[fx.Node], module: nn.Module) -> Tensor | None:
        """For each input channel/feature of the consumer, the BN channel it reads."""
        shape = self.shapes[bn.name]
        axis = _channel_axis(module)
        if not chain:
            return torch.arange(shape[1]) if axis % len(shape) == 1 else None
        ids = self._follow(_index_tensor(shape, 1), chain)
        return None if ids is None else _constant_along(ids, axis)

    def _follow(self, ids: Tensor, chain: list[fx.Node]) -> Tensor | None:
        """Replay layout ops on an index tensor, with every other argument as recorded."""
        for node in chain:
            data = node.args[0]

            def value(arg: fx.Node, data: Any = data, ids: Tensor = ids) -> Any:
                if arg is data:
                    return ids
                if arg.name not in self.values:
                    raise _NotConstantError(arg.name)
                return self.values[arg.name]

            try:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
            except _NotConstantError:
                return None
            ids = self._call(node, args, kwargs)
        return ids

    def _call(self, node: fx.Node, args: Any, kwargs: Any) -> Tensor:
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return node.target(*args, **kwargs)  # type: ignore[operator]

    # ----- rewrite

    def _apply(self, plan: _Plan) -> None:
        changes, types = [], []
        for layer, (weight, bias) in zip(plan.layers, plan.params, strict=True):
            old = self.gm.get_submodule(str(layer.target))
            changes.append(fold_math.relative_change(old.weight, weight))
            types.append(type(old).__name__)
            self.gm.set_submodule(str(layer.target), _with_params(old, weight, bias))
        bn, source = plan.site.node, plan.site.source
        self._remap(plan, source)
        bn.replace_all_uses_with(source)
        self.gm.graph.erase_node(bn)
        for node in list(self.gm.graph.nodes):  # a functional BN leaves its buffers unused
            if node.op == "get_attr" and not node.users:
                self.gm.graph.erase_node(node)
        names = tuple(str(n.target) for n in plan.layers)
        self.folded.append(
            FoldedBN(
                bn=plan.site.name,
                layers=names,
                layer_types=tuple(types),
                direction=plan.direction,
                exactness=plan.exactness,
                max_rel_weight_change=max(changes),
            )
        )

    def _remap(self, plan: _Plan, source: fx.Node) -> None:
        """Track which folded-graph node now carries which original value, for verification."""
        label = f"{' + '.join(str(n.target) for n in plan.layers)} (folded with {plan.site.name})"
        if plan.direction == "bn-after":
            for node in _upstream_to(source, plan.layers[0]):  # their values were rescaled
                self.value_map.pop(node.name, None)
            self.value_map[source.name] = (plan.site.node.name, label)
            return
        for layer in plan.layers:  # a bn-before fold leaves the consumers' outputs unchanged
            reference = self.value_map.get(layer.name, (layer.name, ""))[0]
            self.value_map[layer.name] = (reference, label)

    def _describe(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"the model input {node.name!r}"
        if node.op == "output":
            return "the model output"
        if node.op == "call_module":
            return f"{node.target} ({type(self.gm.get_submodule(str(node.target))).__name__})"
        if node.op == "call_method":
            return f"{node.name} (.{node.target}())"
        return f"{node.name} ({getattr(node.target, '__name__', node.target)}())"


def _owner(arg: Any) -> str | None:
    """Name a functional BN after the module holding its running mean, as modules are named."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and "." in str(arg.target):
        return str(arg.target).rsplit(".", 1)[0]
    return None


def _reads_only(consumer: fx.Node, data: fx.Node) -> bool:
    """True when ``data`` is the consumer's input (args[0]) and no other argument of it."""
    uses: list[fx.Node] = []
    fx.node.map_arg((consumer.args, consumer.kwargs), lambda n: uses.append(n) or n)
    return bool(consumer.args) and consumer.args[0] is data and uses.count(data) == 1


def _upstream_to(source: fx.Node, producer: fx.Node) -> Iterator[fx.Node]:
    node = source
    while node is not producer:
        yield node
        node = node.args[0]  # type: ignore[assignment]
    yield producer


def _inexact_before(module: nn.Module, name: str) -> str | None:
    """Why folding a BN with a non-zero shift into this consumer would not be exact."""
    if isinstance(module, _TRANSPOSED_TYPES):
        return (
            f"{name} is a transposed convolution: its outputs receive different numbers of "
            "kernel taps, so the BN shift cannot become a bias (only a zero-shift BN folds)"
        )
    if _zero_padded(module):
        return (
            f"{name} pads with zeros: border outputs would see the BN shift where the original "
            "saw zeros (padding 0, or reflect/replicate/circular padding, would fold)"
        )
    return None


def _fold_after(module: nn.Module, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
    transposed = isinstance(module, _TRANSPOSED_TYPES)
    groups = getattr(module, "groups", 1)
    return fold_math.fold_into_output(
        module.weight, module.bias, s, t, transposed=transposed, groups=groups
    )


def _fold_before(module: nn.Module, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
    transposed = isinstance(module, _TRANSPOSED_TYPES)
    groups = getattr(module, "groups", 1)
    return fold_math.fold_into_input(
        module.weight, module.bias, s, t, transposed=transposed, groups=groups
    )


def _cast_params(
    module: nn.Module, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    dtype = module.weight.dtype
    bias_dtype = module.bias.dtype if module.bias is not None else dtype
    new_bias = None if bias is None else fold_math.cast_checked(bias, bias_dtype)
    return fold_math.cast_checked(weight, dtype), new_bias


def _with_params(module: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    new = copy.deepcopy(module)
    grad = module.weight.requires_grad
    new.weight = nn.Parameter(weight.to(module.weight.device), requires_grad=grad)
    new.bias = None if bias is None else nn.Parameter(bias.to(module.weight.device), grad)
    return new


__all__ = [
    "FoldReport",
    "FoldVerification",
    "FoldedBN",
    "ModelCounts",
    "SkippedBN",
    "fold_model",
    "make_probe",
]
