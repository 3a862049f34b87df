"""Entry point of the `mmp` console script: the app, with every command module loaded."""

from __future__ import annotations

from .commands import app
from .commands import datasets as _datasets  # noqa: F401  (each import registers commands)
from .commands import deploy as _deploy  # noqa: F401
from .commands import experiments as _experiments  # noqa: F401
from .commands import gitops as _gitops  # noqa: F401
from .commands import janitor as _janitor  # noqa: F401
from .commands import models as _models  # noqa: F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
