"""Running one trigger on this machine with the local record and reporters wired in."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmp import config
from mmp.hosts import localgit as gitutil
from mmp.pipeline.runner import Outcome, Pipeline, Prepared
from mmp.pipeline.sources import LocalGitSource, Trigger


@dataclass
class OverrideSource:
    """A commit, except for the experiment file, which comes from the user's disk."""

    base: LocalGitSource
    experiment_text: bytes

    def read_file(self, path: str) -> bytes | None:
        if path in config.EXPERIMENT_FILES:
            return self.experiment_text if path == config.EXPERIMENT_FILES[0] else None
        return self.base.read_file(path)

    def entry_type(self, path: str) -> str | None:
        return self.base.entry_type(path)


def local_trigger(repo: str | Path, commit: str, *, experiment_file: Path | None = None,
                  delivery_id: str | None = None, ref: str | None = None) -> Trigger:
    """A trigger for `mmp run`: the repository at `commit`, optionally another experiment file.

    Each manual launch gets its own id (`manual-…`), so backends that derive job
    names from the delivery (SageMaker) train again instead of following an old job.
    """
    repo_path = Path(repo).resolve()
    source = LocalGitSource(repo_path, commit)
    if experiment_file is not None:
        source = OverrideSource(source, Path(experiment_file).read_bytes())
    return Trigger(repository=gitutil.repository_name(repo_path), clone_url=str(repo_path), commit=commit,
                   source=source, delivery_id=delivery_id or f"manual-{uuid.uuid4().hex[:12]}", ref=ref,
                   local_root=str(repo_path), host="local")


class LocalPipeline(Pipeline):
    """The pipeline for launches made here (`mmp run`, the local worker): SageMaker platforms get
    Prepare's image step before the MLflow run, so the job runs the dependency set's image
    (`:deps-…`) with this commit's `git archive` as its `mmp-code` channel."""

    def prepare(self, trigger: Trigger) -> Prepared | Outcome:
        from mmp.backends.sagemaker import SageMakerBackend
        from mmp.contract.image import ImageError
        from mmp.pipeline.image_stage import ImageNotBuilt, plan_run_image

        prepared = super().prepare(trigger)
        if isinstance(prepared, Outcome) or not isinstance(prepared.backend, SageMakerBackend):
            return prepared
        s = prepared.backend.settings
        try:
            plan = plan_run_image(trigger, bucket=s.artifacts_bucket, ecr_repository_uri=s.ecr_repository_uri,
                                  context=s.image_context_digest)
        except ImageError as exc:  # dependency files the build cannot use, or a missing setting
            return self.reject(trigger, [str(exc)])
        except ImageNotBuilt as exc:
            return self.reject(trigger, [str(exc)], state="ERROR")
        except Exception as exc:  # S3/ECR refused, git failed
            return self.reject(trigger, [f"could not stage the code or image: {exc}"], state="ERROR")
        prepared.stage(plan.tag, plan.code_uri)
        return prepared


def run_trigger(trigger: Trigger, *, on_log: Callable[[str], None] | None = None, on_launch=None):
    """The pipeline with the local run record, status reporter and notifier."""
    from mmp.pipeline.store import RunStore

    from mmp.tuning.dispatch import run_commit

    return run_commit(LocalPipeline(store=RunStore(), on_log=on_log, on_launch=on_launch), trigger)


def ui_answers(base_url: str, timeout: float = 2.0) -> bool:
    """Whether an MLflow server answers /health at `base_url` (links elsewhere lead nowhere)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def mlflow_link(run_url: str) -> str:
    """`MLflow run: URL` when a UI answers there; otherwise the command that starts one
    (a link to a port where nothing listens is a dead end)."""
    base = run_url.split("/#", 1)[0]
    if ui_answers(base):
        return f"MLflow run: {run_url}"
    return (f"MLflow: no UI answers at {base}; start one with `mmp up` (it serves $MMP_HOME's runs there), "
            f"then open {run_url.removeprefix(base)}")


def cancel_run(record) -> tuple[bool, str]:
    """Cancel a recorded run's job and say what really happened: (stopped something, message).

    A record can say RUNNING after its job ended (its worker died, or could not write
    the end): the backend's own status decides, before and after the cancel.
    """
    from mmp.backends import JobHandle, get_backend

    handle = JobHandle.from_dict(record.handle)
    backend = get_backend(handle.platform)
    before = backend.status(handle)
    if before.state.terminal:
        return False, (f"run {record.run_id} was not running: its job had already ended "
                       f"({before.state.value}{': ' + before.message if before.message else ''}); nothing cancelled")
    backend.cancel(handle)
    after = backend.status(handle)
    if after.state.terminal:
        return True, f"cancelled run {record.run_id}: its job stopped ({after.state.value})"
    return True, (f"cancel sent to run {record.run_id}; its job is still {after.state.value} on {handle.platform} "
                  "(the pipeline marks it CANCELLED once it stops)")
