"""Entry point of the `mmp` console script: the app, with every command module loaded."""

from __future__ import annotations

from mmp.commands import app
from mmp.commands import datasets as _datasets  # noqa: F401  (each import registers commands)
from mmp.commands import deploy as _deploy  # noqa: F401
from mmp.commands import experiments as _experiments  # noqa: F401
from mmp.commands import gitops as _gitops  # noqa: F401
from mmp.commands import janitor as _janitor  # noqa: F401
from mmp.commands import models as _models  # noqa: F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
