"""The Tuning block's ranges as Optuna's search space, and how a trial draws from it.

Without conditional ranges, every range is a distribution given to `study.ask` at once. With them
(`When`), a trial is drawn define-by-run, as Optuna's own conditional spaces are written
(`if trial.suggest_categorical(...) == "sgd": trial.suggest_float(...)`): the ranges in the order
they are listed, each one suggested only when its When holds for the values already drawn. Optuna's
samplers handle parameters that only some trials have (TPE models each on the trials that used it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmp.contract.tuning import Tuning

if TYPE_CHECKING:  # pragma: no cover
    import optuna


def distributions(tuning: Tuning) -> dict[str, Any]:
    """Optuna distributions for the ranges (a stepped float range is FloatDistribution(step=…))."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    result: dict[str, Any] = {}
    for name, r in tuning.ranges.items():
        if r.kind == "categorical":
            result[name] = CategoricalDistribution(list(r.values or []))
        elif r.kind == "integer":
            result[name] = IntDistribution(int(r.min), int(r.max), log=r.scale == "log", step=int(r.step or 1))
        else:
            result[name] = FloatDistribution(float(r.min), float(r.max), log=r.scale == "log",
                                             step=None if r.step is None else float(r.step))
    return result


def ask(study: "optuna.Study", tuning: Tuning, dists: dict[str, Any]) -> "optuna.Trial":
    """A new trial with a value for each range it uses (every range, unless some are conditional)."""
    if not tuning.conditional:
        return study.ask(dists)
    trial = study.ask()
    try:
        for name, r in tuning.ranges.items():
            if r.active(trial.params):
                _suggest(trial, name, dists[name])
    except BaseException:
        from optuna.trial import TrialState

        study.tell(trial, state=TrialState.FAIL)  # never a trial left RUNNING with half its values
        raise
    return trial


def _suggest(trial: "optuna.Trial", name: str, dist: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
