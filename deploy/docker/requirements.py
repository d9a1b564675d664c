"""Write requirements-<extra>.txt for each extra named, from pyproject.toml.

The Dockerfile installs dependencies from these lists before it copies any code, so a code
change rebuilds only the small layer that installs the project itself.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def main(pyproject: str, *extras: str) -> int:
    optional = tomllib.loads(Path(pyproject).read_text())["project"]["optional-dependencies"]
    for extra in extras:
        Path(f"requirements-{extra}.txt").write_text("\n".join(optional[extra]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
