"""Entry point of the `mmp` console script: the app, with every command module loaded."""

from __future__ import annotations

from .commands import app
from .commands import datasets as _datasets  # noqa: F401  (registers commands)
from .commands import experiments as _experiments  # noqa: F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
