"""The version a release tag stands for: ``v`` + the package's ``__version__``, or exit 1.

Run by .github/workflows/release.yml before anything is built, so every artefact and image
tag of a release carries the version written once, in exporter/__init__.py.
Usage: python3 .github/release_version.py TAG   (prints the version)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

INIT = Path(__file__).resolve().parent.parent / "exporter" / "__init__.py"


def package_version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"$', INIT.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"{INIT}: no __version__")
    return match[1]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    tag, version = argv[1], package_version()
    if tag != f"v{version}":
        print(f"tag {tag} is not v{version}, the version in exporter/__init__.py",
              file=sys.stderr)
        return 1
    print(version)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
