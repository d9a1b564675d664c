"""Starting the service: `serve(overrides)` for `foldserve serve`, and `python -m service.main`.

Settings come from `FOLDSERVE_*` environment variables with `overrides` (CLI options; None
means not given) on top. An invalid setting raises `SettingsError`, one line, before anything
starts. The service never imports torch.

With `workers > 1` uvicorn's supervisor spawns that many processes on one listening socket
(and restarts one that dies). Each rebuilds the settings from the environment, which `serve`
first completes with the CLI's overrides, and /metrics adds them all up through the
prometheus_client multiprocess folder `serve` prepares before any of them starts
(service.worker_metrics). Every server process, one or many, drains on SIGTERM and exits 0
(service.shutdown).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import SecretStr
from starlette.types import ASGIApp

from service.app import create_app
from service.errors import SettingsError
from service.settings import ENV_PREFIX, Settings, load_settings
from service.shutdown import drained
from service.worker_metrics import ENV as METRICS_DIR_ENV
from service.worker_metrics import clear_directory

# What each worker process imports and calls to build its app (uvicorn needs a string).
WORKER_APP = "service.main:worker_app"

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(settings.log_level.upper())


def serve(overrides: dict[str, Any] | None = None) -> None:
    """Build the settings, then run uvicorn, with one process or several, until stopped."""
    settings = load_settings(overrides)
    configure_logging(settings)
    app = create_app(settings)  # resolves the providers: an invalid list fails here
    if settings.workers == 1:
        _run(functools.partial(drained, app, settings.shutdown_grace_s), settings)
        return
    os.environ.update(settings_environment(settings))
    with metrics_directory():
        _run(WORKER_APP, settings)


def worker_app() -> ASGIApp:
    """The app of one worker process, from the environment `serve` prepared."""
    settings = load_settings()
    configure_logging(settings)
    return drained(create_app(settings), settings.shutdown_grace_s)


def _run(app: str | Callable[[], ASGIApp], settings: Settings) -> None:
    uvicorn.run(
        app,
        factory=True,  # built in the serving process, so the drain can take its signals
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        log_level=settings.log_level,
        access_log=False,  # ours is structured, with request ids (service.access)
        log_config=None,  # keep the logging configured above
        server_header=False,
    )


def settings_environment(settings: Settings) -> dict[str, str]:
    """The FOLDSERVE_* variables from which a worker process rebuilds exactly `settings`."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, tuple | list):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, dict):
            text = json.dumps(value)
        else:
            text = str(value)
        env[ENV_PREFIX + name.upper()] = text
    return env


@contextlib.contextmanager
def metrics_directory() -> Iterator[Path]:
    """The multiprocess folder the workers share: PROMETHEUS_MULTIPROC_DIR, or a temporary one.

    Set in this process's environment before the workers start, so each worker imports
    prometheus_client in multiprocess mode. A given folder is cleared of an earlier run's files
    and kept; a temporary one is removed afterwards.
    """
    given = os.environ.get(METRICS_DIR_ENV)
    if given:
        clear_directory(Path(given))
        yield Path(given)
        return
    path = Path(tempfile.mkdtemp(prefix="foldserve-metrics-"))
    os.environ[METRICS_DIR_ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(METRICS_DIR_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    try:
        serve()
    except SettingsError as exc:
        print(f"foldserve serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
