"""Ask every replica of the api to load (or reload) a model: the last step of the trainer job.

The repository load API (POST /v2/repository/models/NAME/load) loads the new version beside
the one serving, warms it up, then swaps, so nothing restarts. Compose gives each replica of
a scaled service one address under the service's name, so every address the name resolves to
is asked. With FOLDSERVE_WORKERS > 1 inside one replica, a load reaches only the worker that
answers it: restart that replica instead (see the README's deploy section).

    python load_model.py NAME [--api http://api:8000] [--wait 120]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def addresses(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def call(url: str, method: str = "GET", timeout: float = 300) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    token = os.environ.get("FOLDSERVE_API_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def wait_until_live(base: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            if call(f"{base}/v2/health/live", timeout=3)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(2)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--api", default=os.environ.get("FOLDSERVE_API", "http://api:8000"))
    parser.add_argument("--wait", type=float, default=120, help="seconds to wait for the api")
    args = parser.parse_args()
    api = urllib.parse.urlsplit(args.api)
    port = api.port or 80
    deadline = time.monotonic() + args.wait
    try:
        replicas = addresses(api.hostname or "", port)
    except OSError as exc:
        print(f"load: {api.hostname} does not resolve ({exc}): is the api running?")
        return 1
    failed = 0
    for address in replicas:
        base = f"{api.scheme}://{address}:{port}"
        if not wait_until_live(base, deadline):
            print(f"load: {base} not live after {args.wait:.0f} s")
            failed += 1
            continue
        status, body = call(f"{base}/v2/repository/models/{args.name}/load", method="POST")
        print(f"load: {base} {status} {body}")
        failed += status != 200
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
