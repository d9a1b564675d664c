"""The image's HEALTHCHECK: exit 0 when /v2/health/ready answers 200 on the container's port.

Python rather than curl: the slim base image has no curl, and the interpreter is there anyway.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("FOLDSERVE_PORT", "8000")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=3) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
