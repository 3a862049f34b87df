"""Drawing trials from the ranges with Optuna's samplers (no training): stepped floats and conditional ranges."""

from __future__ import annotations

import optuna
import pytest

from mmp.contract.tuning import Tuning
from mmp.tuning.space import ask, distributions
from mmp.tuning.study import make_sampler

CONDITIONAL = {"opt": {"Values": ["sgd", "adam"]},
               "momentum": {"Min": 0.0, "Max": 0.9, "Step": 0.1, "When": {"opt": "sgd"}},
               "beta": {"Min": 0.8, "Max": 0.999, "When": {"opt": "adam"}},
               "lr": {"Min": 1e-4, "Max": 1e-1, "Scale": "log"}}


@pytest.mark.parametrize("strategy", ["random", "bayesian"])
def test_a_trial_draws_a_conditional_range_only_when_its_when_holds(strategy):
    tuning = Tuning.model_validate({"Objective_Metric": "score", "Strategy": strategy, "Max_Runs": 30, "Seed": 3,
                                    "Ranges": CONDITIONAL})
    study = optuna.create_study(direction="maximize", sampler=make_sampler(tuning))
    dists = distributions(tuning)
    seen = []
    for _ in range(30):
        trial = ask(study, tuning, dists)
        params = trial.params
        seen.append(params)
        assert ("momentum" in params) == (params["opt"] == "sgd") and ("beta" in params) == (params["opt"] == "adam")
        assert "lr" in params
        for name, value in params.items():
            assert tuning.ranges[name].contains(value), (name, value)
        study.tell(trial, params.get("momentum", 0.0) - abs(params["lr"] - 0.01))
    assert {p["opt"] for p in seen} == {"sgd", "adam"}
    assert len({round(p["momentum"], 6) for p in seen if "momentum" in p}) > 1


def test_a_grid_trial_takes_its_enqueued_point_with_only_its_active_ranges():
    ranges = {"opt": {"Values": ["sgd", "adam"]}, "momentum": {"Min": 0.0, "Max": 0.2, "Step": 0.1,
                                                               "When": {"opt": "sgd"}}}
    tuning = Tuning.model_validate({"Objective_Metric": "score", "Strategy": "grid", "Ranges": ranges})
    study = optuna.create_study(sampler=make_sampler(tuning))
    for params in tuning.grid():
        study.enqueue_trial(params)
    dists = distributions(tuning)
    drawn = []
    for _ in range(tuning.total_runs):
        trial = ask(study, tuning, dists)
        drawn.append(trial.params)
        study.tell(trial, 0.0)
    assert drawn == [{"opt": "sgd", "momentum": 0.0}, {"opt": "sgd", "momentum": 0.1},
                     {"opt": "sgd", "momentum": 0.2}, {"opt": "adam"}]


def test_a_stepped_float_is_optuna_s_stepped_float():
    tuning = Tuning.model_validate({"Objective_Metric": "score", "Strategy": "random", "Max_Runs": 5,
                                    "Ranges": {"drop": {"Min": 0.0, "Max": 0.5, "Step": 0.1}}})
    dist = distributions(tuning)["drop"]
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.step == 0.1 and not dist.log
    study = optuna.create_study(sampler=make_sampler(tuning))
    for _ in range(20):
        trial = ask(study, tuning, distributions(tuning))
        assert tuning.ranges["drop"].contains(trial.params["drop"])
        study.tell(trial, 0.0)
