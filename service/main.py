"""Starting the service: `serve(overrides)` for `foldserve serve`, and `python -m service.main`.

Settings come from `FOLDSERVE_*` environment variables with `overrides` (CLI options; None
means not given) on top. An invalid setting raises `SettingsError`, one line, before anything
starts. The service never imports torch.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import uvicorn

from service.app import create_app
from service.settings import Settings, SettingsError, load_settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(settings.log_level.upper())


def serve(overrides: dict[str, Any] | None = None) -> None:
    """Build the settings, then run uvicorn until interrupted."""
    settings = load_settings(overrides)
    configure_logging(settings)
    app = create_app(settings)  # resolves the providers: an invalid list fails here
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # ours is structured, with request ids (service.access)
        log_config=None,  # keep the logging configured above
        server_header=False,
    )


def main() -> int:
    try:
        serve()
    except SettingsError as exc:
        print(f"foldserve serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
