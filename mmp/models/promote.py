"""Promotion: register the best finished run's model and move an alias onto it.

The best run is MLflow's own ordering of FINISHED runs by the metric. A run counts
only if it logged a model: an MLflow 3 logged model (`log_model(name=...)`, found
through the logged-models API by its source run) or, for older clients, a `model/`
artifact folder. The alias moves last, after any deployment succeeded, so it always
names what is serving. Each move pushes the previous holder onto a registered-model
tag (`mmp.alias.<alias>.history`), which is what `--rollback` pops.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from mmp.tracking import ownership
from mmp.pipeline import run_record
from mmp.tuning.tags import TAG_STUDY
from mmp.models.compare import order_by
from mmp.models.search import CompareError, experiment_id, make_client, search_all

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

log = logging.getLogger("mmp.models")

DEFAULT_ALIAS = "production"
HISTORY_KEEP = 50
LEGACY_MODEL_DIR = "model"

# (model name, version) -> a record of what was deployed; raises to stop the alias move.
Deployer = Callable[[str, "ModelVersion"], dict]


class PromotionError(RuntimeError):
    """A refusal or failure, with a message meant for the person who asked."""


@dataclass
class ModelRef:
    source: str  # what the model version is registered from
    model_id: str | None  # the MLflow 3 logged model, None for a legacy `model/` artifact


@dataclass
class Promotion:
    action: str  # promoted, unchanged, rolled back
    model_name: str
    version: str
    alias: str
    run_id: str | None
    commit: str | None = None
    metric: str | None = None
    value: float | None = None
    previous_version: str | None = None
    skipped: list[str] = field(default_factory=list)  # better runs that logged no model
    deployment: dict | None = None
    foreign: list[str] = field(default_factory=list)  # better runs from a repository that does not own the experiment
    unrecorded: list[str] = field(default_factory=list)  # better runs the pipeline did not create (run_record)

    def summary(self) -> str:
        what = f"{self.model_name} v{self.version} @{self.alias}"
        score = f" ({self.metric}={self.value:.4g})" if self.metric and self.value is not None else ""
        run = f" from run {self.run_id[:12]}" if self.run_id else ""
        commit = f" at {self.commit[:7]}" if self.commit else ""
        before = f"; was v{self.previous_version}" if self.previous_version and self.action != "unchanged" else ""
        verb = {"unchanged": "already holds", "rolled back": "rolled back to"}.get(self.action, "promoted")
        if self.action == "unchanged":
            return f"{what} already holds the best run{run}{score}; nothing changed"
        return f"{verb} {what}{run}{commit}{score}{before}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_name_for(experiment: str) -> str:
    """The registered model's name: `MMP_MODEL_NAME`, else the experiment's name."""
    return os.environ.get("MMP_MODEL_NAME") or experiment


def checked_name(name: str) -> str:
    """A registered-model name safe to put in an MLflow filter string."""
    if not name or any(ch in name for ch in "'\"\\`") or name != name.strip():
        raise PromotionError(f"model name {name!r} is not allowed (no quotes, backslashes or outer spaces); "
                             "set MMP_MODEL_NAME or --model-name")
    return name


def history_tag(alias: str) -> str:
    return f"mmp.alias.{alias}.history"


def find_model(client: "MlflowClient", run: "Run") -> ModelRef | None:
    """The model `run` logged: the newest READY logged model, else a legacy `model/` artifact."""
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    ready = [m for m in models if str(m.status) == "READY"]
    if ready:
        newest = max(ready, key=lambda m: m.creation_timestamp or 0)
        # The artifact location, not `models:/<id>`: MLflow's SQL registry resolves that URI
        # through the process-wide tracking URI instead of this client's (an MLflow TODO).
        return ModelRef(source=newest.artifact_location, model_id=newest.model_id)
    try:
        names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, LEGACY_MODEL_DIR)}
    except Exception:  # an artifact store we cannot list has no model we can register
        names = set()
    if "MLmodel" in names:
        return ModelRef(source=f"{run.info.artifact_uri.rstrip('/')}/{LEGACY_MODEL_DIR}", model_id=None)
    return None


def _beats(value: float, require: float, mode: str) -> bool:
    return value >= require if mode == "max" else value <= require


def experiment_owner(client: "MlflowClient", experiment: str, repository: str | None) -> str | None:
    """The repository owning `experiment` (mmp.tracking.ownership); refuses a `repository` that may not promote it."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None  # choose() says there is no such experiment
    owner = found.tags.get(ownership.OWNER_TAG)
    if repository is not None:
        sources = () if owner is not None else {
            ownership.run_source(r.data.tags) for r in search_all(client, [found.experiment_id])}
        problem = ownership.check(experiment, dict(found.tags), sources, repository)
        if problem:
            raise PromotionError(f"{problem}; nothing promoted")
    return owner


def foreign_source(experiment: str, owner: str | None, run: "Run") -> str | None:
    """The repository a run came from when it may not be promoted in `owner`'s experiment, else None."""
    if owner is None:
        return None  # an experiment made before ownership: every run counts, as before
    source = ownership.run_source(run.data.tags) or "(unknown)"
    return None if ownership.may_use(experiment, owner, source) else source


def created_by_pipeline(record: run_record.RunRecord, run_id: str) -> bool:
    try:
        return record.has(run_id)
    except Exception as exc:  # the record is the proof: unreadable, nothing is promoted
        raise PromotionError(f"could not read the pipeline's record of run {run_id}: {exc}; nothing promoted") from None


def choose(client: "MlflowClient", experiment: str, metric: str, mode: str, run_id: str | None = None,
           owner: str | None = None, record: run_record.RunRecord | None = None,
           ) -> tuple["Run", ModelRef, list[str], list[str], list[str]]:
    """The run to promote, its model, the better runs skipped for having no model, those skipped
    for coming from a repository other than the experiment's `owner` (unless shared), and those
    skipped because the pipeline did not create them (any train.py can make a run anywhere)."""
    record = record or run_record.for_promotion()
    clauses = order_by(metric, mode)
    exp_id = experiment_id(client, experiment)
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            raise PromotionError(f"no run {run_id!r}: {exc}") from None
        if run.info.experiment_id != exp_id:
            raise PromotionError(f"run {run_id} belongs to another experiment than {experiment!r}")
        if run.info.status != "FINISHED":
            raise PromotionError(f"run {run_id} is {run.info.status}; only FINISHED runs are promoted")
        if metric not in run.data.metrics:
            raise PromotionError(f"run {run_id} has no metric {metric!r}")
        source = foreign_source(experiment, owner, run)
        if source is not None:
            raise PromotionError(f"run {run_id} came from repository {source!r}, but experiment {experiment!r} "
                                 f"belongs to {owner!r}; nothing promoted")
        if not created_by_pipeline(record, run_id):
            raise PromotionError(f"run {run_id} was not created by the pipeline (no record of it), so it is never "
                                 "promoted; nothing promoted")
        ref = find_model(client, run)
        if ref is None:
            raise PromotionError(f"run {run_id} logged no model (train.py must call mlflow.<flavor>.log_model); "
                                 "nothing promoted")
        return run, ref, [], [], []
    finished = search_all(client, [exp_id], filter_string="attributes.status = 'FINISHED'", order=clauses)
    runs = [r for r in finished if metric in r.data.metrics
            and r.data.tags.get(TAG_STUDY) != "true"]  # a study's parent holds no model: its trials do
    if not runs:
        raise PromotionError(f"no FINISHED run of {experiment!r} logged the metric {metric!r}; nothing promoted")
    skipped: list[str] = []
    foreign: list[str] = []
    unrecorded: list[str] = []
    for run in runs:
        source = foreign_source(experiment, owner, run)
        if source is not None:
            log.warning("run %s ranks higher on %s but came from repository %r, not %r (the owner); skipped",
                        run.info.run_id, metric, source, owner)
            foreign.append(run.info.run_id)
            continue
        if not created_by_pipeline(record, run.info.run_id):
            log.warning("run %s ranks higher on %s but the pipeline did not create it (no record of it); skipped",
                        run.info.run_id, metric)
            unrecorded.append(run.info.run_id)
            continue
        ref = find_model(client, run)
        if ref is not None:
            return run, ref, skipped, foreign, unrecorded
        skipped.append(run.info.run_id)
    if unrecorded:
        raise PromotionError(f"none of the {len(runs)} FINISHED run(s) of {experiment!r} with {metric!r} is both "
                             f"created by the pipeline and has a model (not created by it: "
                             f"{', '.join(unrecorded)}); nothing promoted")
    if foreign:
        raise PromotionError(f"none of the {len(runs)} FINISHED run(s) of {experiment!r} with {metric!r} is both "
                             f"from its owner {owner!r} (or a shared repository) and has a model; nothing promoted")
    raise PromotionError(
        f"none of the {len(runs)} FINISHED run(s) of {experiment!r} with {metric!r} logged a model "
        "(train.py must call mlflow.<flavor>.log_model); nothing promoted")


def model_owner_problem(name: str, model: Any, requester: str | None) -> str | None:
    """Why `requester` may not move an alias of registered model `name`, or None."""
    owner = (model.tags or {}).get(ownership.OWNER_TAG) if model is not None else None
    if owner is None or requester is None or ownership.may_use(name, owner, requester):
        return None
    return ownership.refusal(f"registered model {name!r}", owner, requester) + "; nothing promoted"


def _ensure_registered(client: "MlflowClient", name: str, owner: str | None) -> Any:
    """The registered model, made (tagged with its owner repository) if missing; a foreign owner is refused."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
    else:
        problem = model_owner_problem(name, model, owner)
        if problem:
            raise PromotionError(problem)
        if owner is not None and ownership.OWNER_TAG not in (model.tags or {}):
            client.set_registered_model_tag(name, ownership.OWNER_TAG, owner)  # made before ownership: claim it
        return model
    try:
        client.create_registered_model(name, tags={ownership.OWNER_TAG: owner} if owner else None,
                                       description="Registered by mmp promote")
    except MlflowException as exc:  # registered concurrently
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    return _ensure_registered(client, name, owner)


def _existing_version(client: "MlflowClient", name: str, run_id: str, ref: ModelRef) -> "ModelVersion | None":
    for mv in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
        if mv.source == ref.source or (ref.model_id and getattr(mv, "model_id", None) == ref.model_id):
            return mv
    return None


def _history(model: Any, alias: str) -> list[str]:
    try:
        return [str(v) for v in json.loads(model.tags.get(history_tag(alias), "[]"))]
    except ValueError:
        return []


def _move_alias(client: "MlflowClient", name: str, alias: str, version: str, history: list[str]) -> None:
    client.set_registered_model_alias(name, alias, version)
    client.set_registered_model_tag(name, history_tag(alias), json.dumps(history[-HISTORY_KEEP:]))


def promote(experiment: str, metric: str, *, mode: str = "max", alias: str = DEFAULT_ALIAS,
            require: float | None = None, model_name: str | None = None, run_id: str | None = None,
            client: "MlflowClient | None" = None, deployer: Deployer | None | str = "auto",
            repository: str | None = None, record: run_record.RunRecord | None = None) -> Promotion:
    """Register the best FINISHED run's model as a version and point `alias` at it.

    `deployer="auto"` deploys a SageMaker endpoint when configured for this alias
    (see mmp.models.endpoint); pass None to never deploy. Only runs from the
    experiment's owner repository (or one it is shared with) are candidates; with
    `repository` (a promote.json's), that repository must own or share the experiment
    and the registered model too. Only runs in the pipeline's `record` (default:
    run_record.for_promotion()) count: train.py can create runs, but cannot record them.
    """
    from mlflow.exceptions import MlflowException

    if not metric:
        raise PromotionError("--metric is required: say which metric decides the best run")
    try:
        order_by(metric, mode)
    except CompareError as exc:
        raise PromotionError(str(exc)) from None
    deployer = resolve_deployer(deployer, alias)  # bad endpoint settings stop us before any write
    client = client or make_client()
    name = checked_name(model_name or model_name_for(experiment))
    try:
        owner = experiment_owner(client, experiment, repository)
        run, ref, skipped, foreign, unrecorded = choose(client, experiment, metric, mode, run_id, owner, record)
    except (CompareError, ownership.OwnershipError) as exc:
        raise PromotionError(str(exc)) from None
    value = run.data.metrics[metric]
    commit = run.data.tags.get("mlflow.source.git.commit")
    if require is not None and not _beats(value, require, mode):
        word = "below" if mode == "max" else "above"
        raise PromotionError(f"the best run {run.info.run_id} has {metric}={value:.4g}, {word} the required "
                             f"{require:g}; nothing promoted")
    for other in skipped:
        log.warning("run %s ranks higher on %s but logged no model; skipped", other, metric)
    try:
        model = _ensure_registered(client, name, repository or owner)
        previous = model.aliases.get(alias)
        mv = _existing_version(client, name, run.info.run_id, ref)
        if mv is not None and previous is not None and str(previous) == str(mv.version):
            return Promotion("unchanged", name, str(mv.version), alias, run.info.run_id, commit, metric, value,
                             str(previous), skipped, foreign=foreign, unrecorded=unrecorded)
        if mv is None:
            tags = {"mmp.contract.experiment": experiment, "mmp.run_id": run.info.run_id, "mmp.commit": commit or "",
                    "mmp.metric": metric, f"mmp.metric.{metric}": repr(value), "mmp.mode": mode}
            if ref.model_id:  # MLflow's SQL registry does not keep model_id itself
                tags["mmp.model_id"] = ref.model_id
            mv = client.create_model_version(name, ref.source, run_id=run.info.run_id, tags=tags,
                                             model_id=ref.model_id)
        version = str(mv.version)
        deployment = _deploy(deployer, alias, name, mv)
        history = _history(model, alias) + ([str(previous)] if previous is not None else [])
        _move_alias(client, name, alias, version, history)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        client.set_model_version_tag(name, version, "mmp.promoted_at", stamp)
    except MlflowException as exc:
        raise PromotionError(f"MLflow refused: {exc.message}") from None
    return Promotion("promoted", name, version, alias, run.info.run_id, commit, metric, value,
                     None if previous is None else str(previous), skipped, deployment, foreign, unrecorded)


def rollback(experiment: str, *, alias: str = DEFAULT_ALIAS, model_name: str | None = None,
             client: "MlflowClient | None" = None, deployer: Deployer | None | str = "auto",
             repository: str | None = None) -> Promotion:
    """Point `alias` back at the version that held it before the last promotion (for `repository`,
    only if it owns or shares the experiment and the model)."""
    from mlflow.exceptions import MlflowException

    deployer = resolve_deployer(deployer, alias)
    client = client or make_client()
    name = model_name or model_name_for(experiment)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise PromotionError(f"no registered model {name!r}; nothing to roll back") from None
    if repository is not None:
        try:
            experiment_owner(client, experiment, repository)
        except ownership.OwnershipError as exc:
            raise PromotionError(str(exc)) from None
        problem = model_owner_problem(name, model, repository)
        if problem:
            raise PromotionError(problem.replace("nothing promoted", "nothing rolled back"))
    history = _history(model, alias)
    holder = model.aliases.get(alias)
    while history and holder is not None and history[-1] == str(holder):
        history.pop()  # a holder equal to the current one is no step back
    if not history:
        raise PromotionError(f"{name} @{alias} has no earlier holder to roll back to")
    target = history.pop()
    try:
        mv = client.get_model_version(name, target)
        deployment = _deploy(deployer, alias, name, mv)
        client.set_registered_model_alias(name, alias, target)
        client.set_registered_model_tag(name, history_tag(alias), json.dumps(history))
    except MlflowException as exc:
        raise PromotionError(f"MLflow refused: {exc.message}") from None
    tags = mv.tags or {}
    metric = tags.get("mmp.metric")
    value = tags.get(f"mmp.metric.{metric}") if metric else None
    return Promotion("rolled back", name, target, alias, mv.run_id, tags.get("mmp.commit") or None, metric,
                     float(value) if value else None, None if holder is None else str(holder),
                     deployment=deployment)


def current(model_name: str, alias: str = DEFAULT_ALIAS, client: "MlflowClient | None" = None) -> "ModelVersion | None":
    """The version `alias` names now, or None."""
    from mlflow.exceptions import MlflowException

    client = client or make_client()
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def resolve_deployer(deployer: Deployer | None | str, alias: str) -> Deployer | None:
    """`"auto"`: the SageMaker endpoint deployer when the environment configures one for `alias`."""
    if deployer != "auto":
        return deployer  # type: ignore[return-value]
    from mmp.models.endpoint import EndpointError, deployer_for

    try:
        return deployer_for(alias)
    except EndpointError as exc:
        raise PromotionError(str(exc)) from None


def _deploy(deployer: Deployer | None, alias: str, name: str, mv: "ModelVersion") -> dict | None:
    if deployer is None:
        return None
    try:
        return deployer(name, mv)
    except PromotionError:
        raise
    except Exception as exc:
        raise PromotionError(f"deploying {name} v{mv.version} failed, so @{alias} did not move: {exc}") from exc
