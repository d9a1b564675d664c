"""What the index and a model's page show, assembled from the services; no HTML here.

Everything comes from what the service already keeps: the manager's index (every version on
disk or loaded, with its state and the reason for it), the serving `ModelVersion` (graph
inputs and outputs, providers, the foldserve metadata) and the counters behind /stats and
/metrics. Nothing is cached: a page is a snapshot of the moment it was asked for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from foldserve.model_metadata import InputSpec, ModelMetadata
from service import repository
from service.deps import Services
from service.errors import BadRequestError, NotFoundError
from service.manager import LOADING, READY, ModelEntry, ModelManager
from service.preprocess import effective_spec
from service.runtime import ModelVersion
from service.ui import report
from service.ui.counters import Counters, read_counters
from service.ui.examples import Example, examples

DEFAULT_TOP_K = 5
MAX_EXAMPLE_VALUES = 1024  # beyond this a prefilled array is a wall of zeros, not a help


@dataclass(frozen=True)
class VersionRow:
    """One version of one model as the index shows it."""

    name: str
    version: str  # "" when the model has no version at all
    state: str  # ready, loading, failed, unavailable
    reason: str
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TryOut:
    """What the try-out offers: a picture (upload, and a canvas for one channel) or an array."""

    classify_url: str
    kind: str  # "image" or "array"
    canvas: bool
    top_k: int
    token: bool  # the server wants a token: show the field
    example_array: str = ""  # for "array": the lowest raw value in the input's shape, as JSON


@dataclass(frozen=True)
class ModelPage:
    name: str
    shown: VersionRow  # the version this page is about
    versions: list[VersionRow]
    model: ModelVersion | None  # None when the shown version does not serve
    metadata: ModelMetadata | None
    spec: InputSpec | None  # the metadata's input spec with the config.json overrides
    counters: Counters | None
    tryout: TryOut | None
    examples: list[Example]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.labels if self.metadata else ()

    @property
    def input_facts(self) -> list[report.Fact]:
        return report.input_facts(self.spec) if self.spec else []

    @property
    def training(self) -> list[report.Fact]:
        return report.facts(self.metadata.training, report.TRAINING) if self.metadata else []

    @property
    def fold(self) -> report.FoldView | None:
        return report.fold_view(self.metadata.fold) if self.metadata else None

    @property
    def verification(self) -> list[report.Fact]:
        meta = self.metadata
        return report.facts(meta.verification, report.VERIFICATION) if meta else []

    @property
    def export(self) -> list[report.Fact]:
        return report.facts(self.metadata.export, report.EXPORT) if self.metadata else []

    @property
    def origin(self) -> list[report.Fact]:
        """Architecture, its config, and the checkpoint the file came from."""
        if self.metadata is None:
            return []
        model = self.metadata.model if isinstance(self.metadata.model, dict) else {}
        rows = [report.Fact(k, report.show(v)) for k, v in model.items() if k != "name"]
        if self.metadata.checkpoint_sha256:
            rows.append(report.Fact("checkpoint SHA-256", self.metadata.checkpoint_sha256))
        return rows


# ---------------------------------------------------------------------- the index


def index_rows(manager: ModelManager) -> list[VersionRow]:
    """Every model on disk or loaded, one row per version, with state, reason, providers."""
    return [_row(manager, raw) for raw in manager.index()]


def _row(manager: ModelManager, raw: dict[str, Any]) -> VersionRow:
    name, version = raw["name"], raw.get("version", "")
    entry = manager.entry_or_none(name)
    number = int(version) if version else None
    return VersionRow(
        name=name,
        version=version,
        state=_state(raw["state"], entry, number),
        reason=raw.get("reason", ""),
        providers=_providers(entry, number),
    )


def _state(state: str, entry: ModelEntry | None, number: int | None) -> str:
    if state == READY:
        return "ready"
    if state == LOADING:
        return "loading"
    failed = entry is not None and number is not None and number in entry.failures
    return "failed" if failed else "unavailable"


def _providers(entry: ModelEntry | None, number: int | None) -> tuple[str, ...]:
    if entry is None or number is None or number not in entry.serving:
        return ()
    return tuple(entry.serving[number].providers)


# ---------------------------------------------------------------------- a model's page


def model_page(services: Services, name: str, version: str | None, base_url: str) -> ModelPage:
    """The page of `name` at `version` (default: the highest serving, else the highest known).

    Raises `NotFoundError` for an unknown model or version and `BadRequestError` for a
    malformed one, like the API; a version that exists but does not serve gets a page that
    says why.
    """
    manager = services.manager
    if not manager.known(name):
        raise NotFoundError(f"unknown model {name!r}")
    rows = [r for r in index_rows(manager) if r.name == name]
    shown = _pick(manager, rows, name, version)
    entry = manager.entry_or_none(name)
    model = entry.serving.get(int(shown.version)) if entry and shown.version else None
    if model is None:
        return ModelPage(name, shown, rows, None, None, None, None, None, [])
    spec = _spec(model, entry)
    token = services.settings.token() is not None
    top_k = min(DEFAULT_TOP_K, len(model.metadata.labels)) if model.metadata else DEFAULT_TOP_K
    return ModelPage(
        name=name,
        shown=shown,
        versions=rows,
        model=model,
        metadata=model.metadata,
        spec=spec,
        counters=read_counters(services.stats, services.metrics.registry, name, model.version),
        tryout=_tryout(model, spec, top_k, token),
        examples=examples(base_url, model, spec, top_k, token),
    )


def _pick(
    manager: ModelManager, rows: list[VersionRow], name: str, version: str | None
) -> VersionRow:
    if version is not None:
        wanted = str(repository.parse_version(version))
        for row in rows:
            if row.version == wanted:
                return row
        raise NotFoundError(f"unknown version {wanted} of model {name!r}")
    ready = [r for r in rows if r.state == "ready"]
    if ready:
        return max(ready, key=lambda r: int(r.version))
    with_version = [r for r in rows if r.version]
    if with_version:
        return max(with_version, key=lambda r: int(r.version))
    return rows[0] if rows else VersionRow(name, "", "unavailable", manager.not_ready_reason())


def _spec(model: ModelVersion, entry: ModelEntry | None) -> InputSpec | None:
    """The input spec the classify endpoint applies: metadata plus config.json overrides."""
    if model.metadata is None:
        return None
    if entry is None:
        return model.metadata.input
    try:
        return effective_spec(model.metadata.input, entry.config.preprocessing)
    except BadRequestError:
        return model.metadata.input  # classify refuses it too, and says why


def _tryout(model: ModelVersion, spec: InputSpec | None, top_k: int, token: bool) -> TryOut | None:
    if spec is None:
        return None  # no labels or input spec: classify cannot serve it
    image = spec.layout == "NCHW" and len(spec.shape) == 3
    return TryOut(
        classify_url=f"/v2/models/{model.name}/versions/{model.version}/classify",
        kind="image" if image else "array",
        canvas=image and spec.shape[0] == 1,
        top_k=top_k,
        token=token,
        example_array="" if image else _example_array(spec),
    )


def _example_array(spec: InputSpec) -> str:
    if math.prod(spec.shape) > MAX_EXAMPLE_VALUES:
        return ""
    return json.dumps(_filled(spec.shape, spec.value_range[0]))


def _filled(shape: tuple[int, ...], value: float) -> Any:
    """A nested list of `shape` holding `value`: a starting point the user edits."""
    if not shape:
        return value
    return [_filled(shape[1:], value) for _ in range(shape[0])]
