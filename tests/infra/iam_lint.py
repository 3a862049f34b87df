"""parliament (an IAM linter), importable on today's setuptools.

parliament 1.6 finds its data files with pkg_resources, which setuptools ≥ 81 no longer
ships: hand it the one function it calls, from importlib.resources, plus the one pytest's
syspath_prepend calls when a pkg_resources module is present.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import sys
import types


def parliament():
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)
        shim.fixup_namespace_packages = lambda *args: None
        sys.modules["pkg_resources"] = shim
    import parliament as linter

    return linter
