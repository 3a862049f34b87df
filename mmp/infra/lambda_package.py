"""The Lambda zip: mmp's light modules and the libraries they import, nothing else.

Which mmp modules go in is found by reading the import statements (module level
and inside functions) of the handlers and of the backends the Lambdas run, and
following them inside mmp. A module-level import of anything outside the stdlib,
pydantic and boto3 fails the build: that is what keeps mlflow, torch, pulumi,
sagemaker, paramiko, typer and rich off the cold start. Imports inside functions
are the lazy ones the Lambda never takes (e.g. MLflow's client in mmp.tracking.client);
they are not followed outside mmp. boto3/botocore come with the Lambda runtime;
pydantic and its dependencies (pydantic_core is native code) are installed by pip
for the functions' runtime, not for the interpreter that builds: CPython 3.11,
manylinux2014 x86_64, binary wheels only (`TARGET`), whatever the host's Python
version, OS or CPU. That install is cached under build/ by its versions. The zip is deterministic (sorted entries, fixed
timestamps): the same code gives the same hash, so `pulumi up` only updates the
functions when the code changed.
"""

from __future__ import annotations

import ast
import hashlib
import os
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mmp.backends import BUILTIN
from mmp.hosts.base import HOSTS
from mmp.system.filelock import exclusive

MMP_ROOT = Path(__file__).resolve().parents[1]
HANDLERS = {
    "webhook": "mmp.webhook.lambda_handler",
    "prepare": "mmp.pipeline.aws_stages.prepare",
    "launch": "mmp.pipeline.aws_stages.launch",
    "conclude": "mmp.pipeline.aws_stages.conclude",
    "janitor": "mmp.backends.dlami_janitor.handler",
    "codecommit": "mmp.webhook.codecommit_lambda.lambda_handler",
}
# Looked up by name in the backend and host registries, so no import statement names them.
EXTRA_ROOTS = tuple(target.split(":")[0] for registry in (BUILTIN, HOSTS)
                    for name, target in registry.items() if name != "local")
# Distributions installed into the zip (with their own requirements); boto3 is the runtime's.
BUNDLED = ("pydantic",)
BUILD_ROOT = MMP_ROOT.parent / "build" / "lambda-site"
RUNTIME_PROVIDED = {"boto3", "botocore", "s3transfer", "jmespath", "urllib3", "dateutil", "six"}
ALLOWED_TOP_LEVEL = {"mmp", "pydantic", "pydantic_core", "typing_extensions", "annotated_types",
                     "typing_inspection", *RUNTIME_PROVIDED}
NEVER = ("pulumi", "pulumi_aws", "mlflow", "torch", "sagemaker", "paramiko", "typer", "rich", "horovod",
         "numpy", "matplotlib", "sklearn", "psutil")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
# mmp modules that never belong in the Lambda, and ones it only reaches lazily on paths it never takes.
HEAVY_MMP = ("mmp.commands", "mmp.infra", "mmp.cli", "mmp.__main__")
LAZY_ONLY = {"mmp.backends.local", "mmp.pipeline.store", "mmp.pipeline.queue",
             "mmp.webhook.server",
             "mmp.system.procs",  # config.running_stack: the local stack's processes
             "mmp.tuning.study"}  # the study loop: the runner task and the local worker run it


class PackageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    """The Lambda runtime the wheels are for (LAMBDA_RUNTIME python3.11, architectures x86_64)."""

    python_version: str = "3.11"
    platform: str = "manylinux2014_x86_64"
    implementation: str = "cp"

    @property
    def abi_tag(self) -> str:
        """The CPython extension suffix tag its native modules carry, e.g. cpython-311-x86_64-linux-gnu."""
        return f"cpython-{self.python_version.replace('.', '')}-{self.platform.split('_', 1)[1]}-linux-gnu"


TARGET = Target()


@dataclass(frozen=True)
class LambdaPackage:
    path: Path
    sha256: str  # hex
    modules: tuple[str, ...]  # the mmp modules inside

    @property
    def source_code_hash(self) -> str:
        """Lambda's `source_code_hash` form (base64 of the SHA-256)."""
        import base64

        return base64.b64encode(bytes.fromhex(self.sha256)).decode()


def handler_module(handler: str) -> str:
    """`mmp.pipeline.aws_stages.prepare` → `mmp.pipeline.aws_stages` (Lambda's module.function)."""
    return handler.rsplit(".", 1)[0]


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    base = MMP_ROOT.parent.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if base.is_dir() and any(base.glob("*.py")):  # a namespace package (PEP 420): nothing to copy
        return base
    return None


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(n) for n in tree.body}
    for n in tree.body:  # `if TYPE_CHECKING:` blocks are not imports at run time
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            for sub in ast.walk(n):
                top_level.discard(id(sub))
                sub._mmp_skip = True  # type: ignore[attr-defined]
        elif isinstance(n, (ast.If, ast.Try)):
            top_level.update(id(sub) for sub in ast.walk(n))
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if getattr(node, "_mmp_skip", False):
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node, is_package)
            found.append((base, id(node) in top_level))
            for alias in node.names:  # `from . import aws` imports a submodule
                if _module_file(f"{base}.{alias.name}") is not None:
                    found.append((f"{base}.{alias.name}", id(node) in top_level))
    return found


def mmp_modules(roots: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The mmp modules the handlers need, closed over their imports; checks the light rule."""
    roots = roots or tuple(dict.fromkeys([*(handler_module(h) for h in HANDLERS.values()), *EXTRA_ROOTS]))
    seen: dict[str, Path] = {}
    todo = list(roots)
    problems = []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_file(module)
        if path is None:
            raise PackageError(f"{module}: no such module in {MMP_ROOT} (a Lambda handler or backend needs it)")
        seen[module] = path
        if path.is_dir():
            continue
        parents = module.split(".")
        for i in range(1, len(parents)):  # importing a.b.c runs a/__init__ and a/b/__init__
            todo.append(".".join(parents[:i]))
        for name, at_top in _imports(module, path):
            top = name.split(".")[0]
            if top == "mmp":
                heavy = name.startswith(HEAVY_MMP)
                if heavy and at_top:
                    problems.append(f"{module} imports {name} at module level")
                elif not heavy and (at_top or name not in LAZY_ONLY) and _module_file(name) is not None:
                    todo.append(name)
            elif at_top and top not in sys.stdlib_module_names and top not in ALLOWED_TOP_LEVEL and top != "__future__":
                problems.append(f"{module} imports {name} at module level (not allowed in the Lambda)")
    if problems:
        raise PackageError("the Lambda code must stay light:\n  " + "\n  ".join(sorted(set(problems))))
    return tuple(sorted(seen))


def _requirements() -> list[str]:
    """BUNDLED pinned to the versions this checkout runs and tests with."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in BUNDLED]


def site_packages(target: Target = TARGET, *, root: Path | None = None) -> Path:
    """pip's install of BUNDLED for `target` (binary wheels only), cached by versions and target."""
    requirements = _requirements()
    key = hashlib.sha256(repr((requirements, target)).encode()).hexdigest()[:12]
    dest = (root or BUILD_ROOT) / f"py{target.python_version}-{target.platform}-{key}"
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(dest.with_name(dest.name + ".lock")):  # two builds at once (two stacks, two test workers)
        if (dest / ".complete").is_file():  # the other one installed it while this one waited
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                   "--target", str(tmp), "--only-binary=:all:", "--platform", target.platform,
                   "--python-version", target.python_version, "--implementation", target.implementation,
                   *requirements]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise PackageError(f"pip could not install {', '.join(requirements)} for {target}:\n"
                               f"{done.stderr[-2000:]}")
        (tmp / ".complete").write_text("\n".join(requirements) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.replace(dest)
    return dest


def _site_files(site: Path) -> list[tuple[str, Path]]:
    out = []
    for path in sorted(site.rglob("*")):
        rel = path.relative_to(site).as_posix()
        top = rel.split("/")[0]
        if (not path.is_file() or top.endswith(".dist-info") or top in ("bin", ".complete")
                or "__pycache__" in rel or rel.endswith(".pyc") or top.split(".")[0] in RUNTIME_PROVIDED):
            continue
        out.append((rel, path))
    return out


def contents(target: Target = TARGET, *, site_root: Path | None = None) -> tuple[list[tuple[str, Path]], tuple[str, ...]]:
    modules = mmp_modules()
    files = [("/".join(m.split(".")) + ("/__init__.py" if p.name == "__init__.py" else ".py"), p)
             for m, p in ((m, _module_file(m)) for m in modules) if p is not None and p.is_file()]
    files += _site_files(site_packages(target, root=site_root))
    bad = sorted({name for name, _ in files if name.split("/")[0].split(".")[0] in NEVER})
    if bad:
        raise PackageError(f"heavy packages would enter the Lambda zip: {bad[:5]}")
    return sorted(dict(files).items()), modules


def build(dest: Path | str, target: Target = TARGET, *, site_root: Path | None = None) -> LambdaPackage:
    """Write the zip for `target` to `dest` (a file path) and say what is in it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    files, modules = contents(target, site_root=site_root)
    tmp = dest.with_suffix(f".{os.getpid()}.tmp")  # two programs building at once must not share it
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    tmp.replace(dest)
    return LambdaPackage(path=dest, sha256=hashlib.sha256(dest.read_bytes()).hexdigest(), modules=modules)
