"""/metrics across worker processes, through prometheus_client's multiprocess mode.

With `workers > 1` each request lands on one of several processes, each with its own StatsBook
and histograms, while a scrape reaches only one of them. prometheus_client's multiprocess mode
is the standard answer: every process writes its samples to memory-mapped files in
`PROMETHEUS_MULTIPROC_DIR`, and a scrape adds up the files of all of them.

- The `foldserve_*` histograms are prometheus_client objects and write their files themselves,
  provided the variable is set before prometheus_client is imported; `service.main` sets it
  before it starts the workers.
- The `nv_*` families are rendered from the StatsBook at scrape time (`metrics.render_triton`),
  so each process mirrors that text into multiprocess gauges: once a second, when it is
  scraped, and when it exits. Counters go to 'sum' gauges, which keep the last values of a
  worker that exited so totals never go back; gauges go to 'livesum', which forget them. A
  scrape writes them back with Triton's names and types. Mirroring the rendered text rather
  than the StatsBook keeps every family `render_triton` emits, today's and tomorrow's.
  Another worker's counts may be up to a second old, well inside a scrape interval.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest, values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

ENV = "PROMETHEUS_MULTIPROC_DIR"
SYNC_INTERVAL_S = 1.0


def multiprocess_dir() -> Path | None:
    """The shared folder when this process runs in multiprocess mode, else None.

    prometheus_client picks its mode when it is imported: a variable set later (as in the
    process that starts the workers) leaves this process's metrics its own.
    """
    value = os.environ.get(ENV)
    if not value or values.ValueClass is values.MutexValue:
        return None
    return Path(value)


def clear_directory(path: Path) -> None:
    """Remove the files of an earlier run: prometheus_client would add them to this one's."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


class SharedMetrics:
    """One process's share of /metrics in multiprocess mode, and the scrape that adds them up."""

    def __init__(self, render_local: Callable[[], str], path: Path) -> None:
        self._render_local = render_local
        self._path = path
        self._gauges: dict[tuple[str, tuple[str, ...]], Gauge] = {}
        self._families: dict[str, tuple[str, str]] = {}  # name → (type, help)
        self._ticking = False
        self._pid = os.getpid()
        atexit.register(self.close)
        self.start_syncing()

    def start_syncing(self) -> None:
        """Sync once a second on the running event loop; a no-op without one or once started."""
        if self._ticking:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._ticking = True
        loop.call_later(SYNC_INTERVAL_S, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sync()
        loop.call_later(SYNC_INTERVAL_S, self._tick, loop)

    def sync(self) -> None:
        """Write this process's nv_* values into its multiprocess files."""
        for family in text_string_to_metric_families(self._render_local()):
            self._families[family.name] = (family.type, family.documentation)
            for sample in family.samples:
                gauge = self._gauge(family.name, family.type, family.documentation, sample)
                gauge.labels(**sample.labels).set(sample.value)

    def _gauge(self, name: str, kind: str, doc: str, sample: Sample) -> Gauge:
        labelnames = tuple(sample.labels)  # render_triton's order, kept in the output
        key = (name, labelnames)
        if key not in self._gauges:
            self._gauges[key] = Gauge(
                name,
                doc,
                labelnames,
                multiprocess_mode="livesum" if kind == "gauge" else "sum",
                registry=None,  # collected from the files, never from this process's registry
            )
        return self._gauges[key]

    def render(self) -> bytes:
        """Every process's metrics added up: nv_* as Triton writes them, then the rest."""
        self.start_syncing()
        self.sync()
        collected = list(MultiProcessCollector(None, path=str(self._path)).collect())
        triton = [m for m in collected if m.name in self._families]
        others = CollectorRegistry(auto_describe=True)
        others.register(_Fixed([m for m in collected if m.name not in self._families]))
        return _render_triton_families(triton, self._families).encode() + generate_latest(others)

    def close(self) -> None:
        """At exit: a last sync, then drop this process's live gauges (pending requests)."""
        if os.getpid() != self._pid:
            return
        self.sync()
        mark_process_dead(self._pid, str(self._path))


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def _render_triton_families(metrics: list[Metric], families: dict[str, tuple[str, str]]) -> str:
    """Triton's exact names (no `_total`), in render_triton's order, integers where whole."""
    by_name = {m.name: m for m in metrics}
    lines: list[str] = []
    for name, (kind, doc) in families.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        metric = by_name.get(name)
        for sample in sorted(metric.samples if metric else [], key=_label_order):
            value = int(sample.value) if float(sample.value).is_integer() else sample.value
            lines.append(f"{name}{{{_label_text(sample.labels)}}} {value}")
    return "\n".join(lines) + "\n"


def _label_order(sample: Sample) -> tuple[tuple[int, str], ...]:
    """Label values in order, numbers by value, so version 10 comes after version 9."""
    return tuple((0, v.zfill(20)) if v.isdigit() else (1, v) for v in sample.labels.values())


_ESCAPE = re.compile(r'[\\\n"]')


def _label_text(labels: dict[str, str]) -> str:
    def escape(value: str) -> str:
        return _ESCAPE.sub(lambda m: {"\\": "\\\\", "\n": "\\n", '"': '\\"'}[m.group()], value)

    return ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
