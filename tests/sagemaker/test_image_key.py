"""mmp.contract.image: the image tag is a function of what the build reads, and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mmp.contract.image import (ImageError, code_key, context_digest, context_files, image_tag, requirements_text,
                       TAG_RE)

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = "c" * 64


def reader(files: dict[str, str]):
    return lambda name: files[name].encode() if name in files else None


def test_the_tag_ignores_the_code_and_follows_the_requirements():
    base = {"requirements.txt": "mlflow>=3.1,<4\nnumpy\n", "train.py": "print(1)", "experiment.json": "{}"}
    tag = image_tag(requirements_text(reader(base)), CONTEXT)
    assert TAG_RE.fullmatch(tag)
    for other in ({**base, "train.py": "print(2)"}, {**base, "experiment.json": '{"Platform": "sagemaker"}'},
                  {**base, "requirements.txt": "mlflow>=3.1,<4\r\nnumpy  \n\n"}):  # CRLF, trailing blanks
        assert image_tag(requirements_text(reader(other)), CONTEXT) == tag
    assert image_tag(requirements_text(reader({**base, "requirements.txt": "mlflow>=3.1,<4\nnumpy\nscipy\n"})),
                     CONTEXT) != tag
    assert image_tag(requirements_text(reader(base)), "d" * 64) != tag  # horovod_docker/ or mmp changed


def test_pyproject_dependencies_are_read_statically():
    pyproject = '[project]\nname = "x"\nversion = "1"\ndependencies = ["mlflow>=3.1", "numpy"]\n'
    assert requirements_text(reader({"pyproject.toml": pyproject})) == b"mlflow>=3.1\nnumpy\n"
    tool_only = '[tool.ruff]\nline-length = 120\n'
    assert requirements_text(reader({"pyproject.toml": tool_only})) == b""
    assert requirements_text(reader({})) == b""


@pytest.mark.parametrize("files, words", [
    ({"setup.py": "from setuptools import setup\nsetup()"}, "setup.py without requirements.txt"),
    ({"pyproject.toml": '[project]\nname = "x"\ndynamic = ["dependencies"]\n'}, "dynamic"),
    ({"pyproject.toml": "[project\n"}, "pyproject.toml is not valid TOML"),
    ({"requirements.txt": "numpy\n-r more.txt\n"}, "requirements.txt line 2"),
    ({"requirements.txt": "-e .\n"}, "requirements.txt line 1"),
])
def test_dependency_files_the_build_cannot_use_are_refused_by_name(files, words):
    with pytest.raises(ImageError, match=words):
        requirements_text(reader(files))


def test_the_context_digest_covers_horovod_docker_and_mmp_but_not_caches(tmp_path):
    for folder in ("horovod_docker", "mmp"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = context_digest(tmp_path)
    assert before == context_digest(ROOT)
    (tmp_path / "mmp" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "mmp" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert context_digest(tmp_path) == before
    (tmp_path / "horovod_docker" / "Dockerfile").write_text("FROM scratch\n")
    assert context_digest(tmp_path) != before
    names = {str(p.relative_to(tmp_path)) for p in context_files(tmp_path)}
    assert "horovod_docker/Dockerfile" in names and "mmp/runtime/sagemaker_entrypoint.py" in names


def test_code_keys_are_per_commit_and_refuse_odd_input():
    sha = "a" * 40
    assert code_key("octo-org/fashion-demo", sha) == f"code/octo-org/fashion-demo/{sha}.tar.gz"
    assert code_key("fashion-demo", sha) == f"code/fashion-demo/{sha}.tar.gz"  # a CodeCommit repository's name
    assert code_key("group/sub/project", sha) == f"code/group/sub/project/{sha}.tar.gz"  # a GitLab subgroup's
    for repository, commit in (("octo-org/fashion-demo", "main"), ("../x", sha), ("a//b", sha), ("", sha),
                               ("a/b c", sha), ("a/./b", sha)):
        with pytest.raises(ImageError):
            code_key(repository, commit)
