"""The Tuning block: every problem at once, each naming its field; plain files unchanged; the schema."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmp.contract.experiment import ExperimentError, json_schema, parse_experiment
from mmp.contract.tuning import parallel_limit

BASE = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local",
        "Hyperparameters": "{'epochs': '3', 'batch-size': '32'}"}


def parse(tuning: dict, **base):
    return parse_experiment(json.dumps({**BASE, **base, "Tuning": tuning}), datasets=["digits"])


def problems(tuning: dict, **base) -> dict[str, str]:
    with pytest.raises(ExperimentError) as info:
        parse(tuning, **base)
    return {p.field: p.message for p in info.value.problems}


def test_plain_experiment_files_are_unchanged():
    experiment = parse_experiment(json.dumps(BASE), datasets=["digits"])
    assert experiment.tuning is None
    assert experiment.hyperparameters == {"epochs": "3", "batch-size": "32"}


def test_a_full_block_is_read_with_inferred_types():
    tuning = parse({
        "Objective_Metric": "val_accuracy", "Direction": "maximize", "Strategy": "bayesian", "Max_Runs": "12",
        "Parallel": 2, "Early_Stopping": True,
        "Ranges": {"lr": {"Min": 0.0001, "Max": 0.1, "Scale": "log"}, "epochs": {"Min": 2, "Max": 8},
                   "optimizer": {"Values": ["sgd", "adam"]}, "momentum": {"Min": "0.5", "Max": "0.99"}},
    }).tuning
    assert tuning.max_runs == 12 and tuning.total_runs == 12 and tuning.parallel == 2
    kinds = {name: r.kind for name, r in tuning.ranges.items()}
    assert kinds == {"lr": "float", "epochs": "integer", "optimizer": "categorical", "momentum": "float"}


def test_every_problem_is_reported_at_once_naming_the_field():
    found = problems({
        "Objective_Metric": "val acc!", "Strategy": "random", "Max_Runs": 3, "Parallel": 4,
        "Ranges": {"lr": {"Min": 0.1, "Max": 0.01}, "wd": {"Min": 0.0, "Max": 1.0, "Scale": "log"},
                   "opt": {"Values": []}},
    })
    assert "not a valid MLflow metric key" in found["Tuning.Objective_Metric"]
    assert found["Tuning.Ranges.lr"] == "Min (0.1) must be below Max (0.01)"
    assert "log scale needs Min above 0" in found["Tuning.Ranges.wd"]
    assert "non-empty Values" in found["Tuning.Ranges.opt"]
    assert "more than the 3 trial(s)" in found["Tuning.Parallel"]


def test_grid_refuses_float_ranges_and_a_budget_that_is_not_the_grid():
    found = problems({"Objective_Metric": "loss", "Strategy": "grid", "Max_Runs": 3,
                      "Ranges": {"lr": {"Min": 0.01, "Max": 0.1}, "n": {"Values": [1, 2]}}})
    assert "lr is a float range" in found["Tuning.Ranges"]
    found = problems({"Objective_Metric": "loss", "Strategy": "grid", "Max_Runs": 3,
                      "Ranges": {"bs": {"Min": 1, "Max": 2}, "opt": {"Values": ["x", "y"]}}})
    assert "each of the 4 combinations once" in found["Tuning.Max_Runs"]


def test_random_and_bayesian_need_a_budget():
    assert "is required for Strategy random" in problems(
        {"Objective_Metric": "loss", "Strategy": "random", "Ranges": {"bs": {"Min": 1, "Max": 2}}})["Tuning.Max_Runs"]


def test_parallel_is_capped_by_the_platform():
    limit = parallel_limit("local")
    found = problems({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 100, "Parallel": limit + 1,
                      "Ranges": {"bs": {"Min": 1, "Max": 2}}})
    assert f"above the local limit of {limit}" in found["Tuning.Parallel"]
    assert parallel_limit("dlami") == 4 and parallel_limit("some-plugin") == 1


@pytest.mark.parametrize("name, message", [
    ("--lr", "bad name"), ("a", "ambiguous abbreviation to horovodrun"),
])
def test_range_names_follow_the_hyperparameter_rules(name, message):
    found = problems({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 2,
                      "Ranges": {name: {"Min": 1, "Max": 2}}})
    assert message in found["Tuning.Ranges"]


def test_unknown_tuning_fields_are_named():
    found = problems({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 2, "Trials": 5,
                      "Ranges": {"lr": {"Min": 1, "Max": 2, "Scaling": "log"}}})
    assert set(found) == {"Tuning.Trials", "Tuning.Ranges.lr.Scaling"}


def test_schema_describes_the_block_and_validate_names_fields(tmp_path):
    schema = json_schema()
    assert "Tuning" in schema["properties"] and {"Tuning", "Range"} <= set(schema["$defs"])
    assert set(schema["$defs"]["Tuning"]["properties"]) >= {"Objective_Metric", "Strategy", "Ranges", "Parallel"}
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({**BASE, "Tuning": {"Objective_Metric": "loss", "Strategy": "grid",
                                                   "Ranges": {"x": {"Min": 0.5, "Max": 1.5}}}}))
    out = subprocess.run([sys.executable, "-m", "mmp", "validate", str(path), "--no-catalogue", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    fields = {p["field"] for p in json.loads(out.stdout)["problems"]}
    assert fields == {"Tuning.Ranges"}


def test_the_readme_example_block_validates():
    from pathlib import Path

    from mmp.contract.experiment import load_experiment

    path = Path(__file__).resolve().parents[2] / "examples" / "fashion" / "experiment.tuning.json"
    tuning = load_experiment(path, datasets=["digits"]).tuning
    assert tuning.strategy == "bayesian" and set(tuning.ranges) == {"lr", "batch-size"}
    assert tuning.ranges["lr"].scale == "log" and tuning.ranges["batch-size"].kind == "categorical"


def test_early_stopping_is_a_plain_flag():
    block = {"Objective_Metric": "acc", "Strategy": "grid", "Ranges": {"lr": {"Values": [0.1, 0.01]}}}
    assert parse({**block, "Early_Stopping": "true"}).tuning.early_stopping is True
    found = problems({**block, "Early_Stopping": "yes"})
    assert "must be true or false" in found["Tuning.Early_Stopping"]


# -- issue 20, findings 8 to 10 ---------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("a\0b", "contains a NUL byte"),
    ("x" * 2501, "is longer than 2500 characters"),
    ("--output-path=/tmp/elsewhere", "is a prefix of --output-path, which the pipeline sets"),
    ("--log", "ambiguous abbreviation to horovodrun"),
])
def test_tuning_values_get_the_same_checks_as_fixed_hyperparameters(value, message):
    found = problems({"Objective_Metric": "loss", "Strategy": "grid", "Ranges": {"opt": {"Values": ["sgd", value]}}})
    assert found["Tuning.Ranges.opt"].startswith("Values[1] ") and message in found["Tuning.Ranges.opt"]
    fixed = problems({"Objective_Metric": "loss", "Strategy": "grid", "Ranges": {"opt": {"Values": ["sgd"]}}},
                     Hyperparameters={"opt": value})
    assert found["Tuning.Ranges.opt"] == "Values[1] " + fixed["Hyperparameters.opt"]  # one check, one message


def test_a_trial_cannot_make_a_longer_command_line_than_horovodrun_takes():
    fixed = {f"p{i}": "v" * 2400 for i in range(27)}  # about 63.5 KiB: fits on its own
    parse_experiment(json.dumps({**BASE, "Hyperparameters": fixed}), datasets=["digits"])
    found = problems({"Objective_Metric": "loss", "Strategy": "grid",
                      "Ranges": {"opt": {"Values": ["sgd", "w" * 2400]}}}, Hyperparameters=fixed)
    assert "each range's longest value make a command line of" in found["Tuning"]


def test_a_trial_experiment_checks_its_values_like_a_fixed_hyperparameter():
    experiment = parse({"Objective_Metric": "loss", "Strategy": "grid", "Ranges": {"opt": {"Values": ["sgd"]}}})
    trial = experiment.for_trial({"opt": "adam", "epochs": 4})
    assert trial.tuning is None and trial.hyperparameters == {"epochs": 4, "batch-size": "32", "opt": "adam"}
    for bad in ("--output-path=/elsewhere", "a\0b"):  # e.g. a study stored by an older MMP
        with pytest.raises(ValueError, match="Tuning.Ranges.opt"):
            experiment.for_trial({"opt": bad})


def test_duplicate_keys_inside_tuning_are_named():
    text = ('{"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Tuning": '
            '{"Objective_Metric": "loss", "Strategy": "grid", "Strategy": "random", "Max_Runs": 2, '
            '"Ranges": {"lr": {"Min": 1, "Max": 2, "Max": 9}, "bs": {"Values": [1, 2]}, "bs": {"Values": [3]}}}}')
    with pytest.raises(ExperimentError) as info:
        parse_experiment(text, datasets=["digits"])
    repeated = {p.field for p in info.value.problems if "appears more than once" in p.message}
    assert repeated == {"Tuning.Strategy", "Tuning.Ranges.lr.Max", "Tuning.Ranges.bs"}


@pytest.mark.parametrize("values", [[1, True], [1, 1.0], [0, False], [1, "1"], ["a", "a"]])
def test_values_that_make_one_trial_are_refused(values):
    found = problems({"Objective_Metric": "loss", "Strategy": "grid", "Ranges": {"units": {"Values": values}}})
    assert "are the same trial" in found["Tuning.Ranges.units"]


def test_distinct_values_stay_distinct_grid_points():
    tuning = parse({"Objective_Metric": "loss", "Strategy": "grid",
                    "Ranges": {"units": {"Values": [2, 2.5, True, False, "true", "x"]}}}).tuning
    assert [p["units"] for p in tuning.grid()] == [2, 2.5, True, False, "true", "x"]


HUGE_GRID = {**BASE, "Tuning": {"Objective_Metric": "loss", "Strategy": "grid",
                                "Ranges": {"units": {"Min": 0, "Max": 10**9}, "width": {"Values": [1, 2]}}}}


def _limited_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a built grid needs tens of GiB


def test_a_huge_grid_is_counted_not_built(tmp_path):
    """`mmp validate` answers in bounded memory (before: every point was built, MemoryError or OOM)."""
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(HUGE_GRID))
    out = subprocess.run([sys.executable, "-m", "mmp", "validate", str(path), "--no-catalogue", "--json"],
                         capture_output=True, text=True, timeout=120, preexec_fn=_limited_memory)
    assert out.returncode == 1, out.stderr[-2000:]
    found = {p["field"]: p["message"] for p in json.loads(out.stdout)["problems"]}
    assert found == {"Tuning": "the grid has 2000000002 combinations; at most 1000"}


@pytest.mark.parametrize("bounds, message", [
    ({"Min": -1e308, "Max": 1e308}, "Max - Min must be a finite float"),
    ({"Min": 0, "Max": "1e309"}, "must be finite numbers"),
    ({"Type": "integer", "Min": 0, "Max": 1e18}, "within ±2**53"),
])
def test_a_range_optuna_cannot_sample_is_refused_by_validate(bounds, message):
    """Issue 20, finding 2: these passed `mmp validate`, and the study then failed inside Optuna."""
    found = problems({"Objective_Metric": "score", "Strategy": "random", "Max_Runs": 2, "Ranges": {"shift": bounds}})
    assert message in found["Tuning.Ranges.shift"], found


# -- issue 24: integer inference, field lists, stepped floats, conditional ranges --------------------------
def test_whole_number_bounds_stay_an_integer_range_and_validate_says_so(tmp_path):
    """`"Min": 0, "Max": 1` is still {0, 1} (existing files keep working), but no longer silently."""
    ranges = {"momentum": {"Min": 0, "Max": 1}, "epochs": {"Type": "integer", "Min": 2, "Max": 8},
              "layers": {"Type": "int", "Min": 1, "Max": 3}, "units": {"Min": 8, "Max": 64, "Step": 8},
              "dropout": {"Min": 0.0, "Max": 1.0}}
    experiment = parse({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 2, "Ranges": ranges})
    kinds = {name: r.kind for name, r in experiment.tuning.ranges.items()}
    assert kinds == {"momentum": "integer", "epochs": "integer", "layers": "integer", "units": "integer",
                     "dropout": "float"}
    notes = [n for n in experiment.notes() if n.startswith("Tuning.")]
    assert len(notes) == 1 and notes[0].startswith("Tuning.Ranges.momentum: whole-number Min and Max make an "
                                                   "integer range ({0, 1})"), notes
    assert '"Type": "float"' in notes[0]
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({**BASE, "Tuning": {"Objective_Metric": "loss", "Strategy": "random",
                                                   "Max_Runs": 2, "Ranges": ranges}}))
    out = subprocess.run([sys.executable, "-m", "mmp", "validate", str(path), "--no-catalogue", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert notes[0] in json.loads(out.stdout)["notes"]


def test_an_unknown_field_in_a_range_lists_a_range_s_fields():
    found = problems({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 2,
                      "Ranges": {"lr": {"Min": 0.1, "Max": 0.2, "If": {"opt": "sgd"}}}})
    message = found["Tuning.Ranges.lr.If"]
    assert message == "unknown field; allowed fields are Type, Min, Max, Scale, Step, Values, When"
    assert "Platform" not in message
    block = problems({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 2, "Trials": 3,
                      "Ranges": {"lr": {"Min": 0.1, "Max": 0.2}}})["Tuning.Trials"]
    assert "Objective_Metric" in block and "Ranges" in block and "Platform" not in block


@pytest.mark.parametrize("bounds, points", [
    ({"Min": 0.1, "Max": 1.0, "Step": 0.1}, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
    ({"Min": 0, "Max": 1, "Step": 0.25}, [0.0, 0.25, 0.5, 0.75, 1.0]),
    ({"Min": 0.0, "Max": 1.0, "Step": 0.3}, [0.0, 0.3, 0.6, 0.9]),  # Max off the grid: not a point (as Optuna)
    ({"Type": "float", "Min": 1, "Max": 3, "Step": 1}, [1.0, 2.0, 3.0]),
])
@pytest.mark.filterwarnings("ignore:The distribution is specified by")  # Optuna's own note on the off-grid Max
def test_a_float_range_with_a_step_is_counted_as_optuna_samples_it(bounds, points):
    from optuna.distributions import FloatDistribution

    tuning = parse({"Objective_Metric": "loss", "Strategy": "grid",
                    "Ranges": {"x": bounds, "opt": {"Values": ["a", "b"]}}}).tuning
    assert tuning.ranges["x"].kind == "float"
    assert tuning.total_runs == 2 * len(points)
    assert [p["x"] for p in tuning.grid()][::2] == points
    dist = FloatDistribution(float(bounds["Min"]), float(bounds["Max"]), step=float(bounds["Step"]))
    assert dist.high == pytest.approx(points[-1])  # Optuna's own last point
    assert all(dist._contains(p) and tuning.ranges["x"].contains(p) for p in points)
    assert not tuning.ranges["x"].contains(points[0] + bounds["Step"] / 2)
    off_grid = [n for n in parse({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 2,
                                  "Ranges": {"x": bounds}}).notes() if n.startswith("Tuning.")]
    assert off_grid == ([] if points[-1] == bounds["Max"] else
                        [f"Tuning.Ranges.x: Max 1 is not Min plus a whole number of Steps; the last value is 0.9 "
                         "(as Optuna samples it)"])


def test_stepped_float_problems_are_named():
    found = problems({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 2, "Ranges": {
        "a": {"Min": 0.1, "Max": 1.0, "Step": 0.1, "Scale": "log"}, "b": {"Min": 0.1, "Max": 0.2, "Step": 0.5},
        "c": {"Type": "integer", "Min": 1, "Max": 5, "Step": 0.5}, "d": {"Min": 0.5, "Max": 1.0, "Step": -0.1}}})
    assert found["Tuning.Ranges.a"] == "Step cannot be combined with a log scale"
    assert "wider than Max - Min" in found["Tuning.Ranges.b"]
    assert "integer range's Step must be a whole number" in found["Tuning.Ranges.c"]
    assert "Step must be a number above 0" in found["Tuning.Ranges.d"]
    grid = problems({"Objective_Metric": "loss", "Strategy": "grid", "Ranges": {"lr": {"Min": 0.1, "Max": 0.2}}})
    assert "lr is a float range without Step" in grid["Tuning.Ranges"]


CONDITIONAL = {"opt": {"Values": ["sgd", "adam", "rms"]},
               "momentum": {"Min": 0.0, "Max": 0.9, "Step": 0.3, "When": {"opt": "sgd"}},
               "nesterov": {"Values": [True, False], "When": {"opt": "sgd"}},
               "beta": {"Values": [0.9, 0.99], "When": {"opt": ["adam", "rms"]}},
               "units": {"Values": [16, 32]}}


def test_conditional_ranges_are_counted_and_gridded_only_where_their_when_holds():
    tuning = parse({"Objective_Metric": "loss", "Strategy": "grid", "Ranges": CONDITIONAL}).tuning
    # sgd: 4 momentum × 2 nesterov; adam, rms: 2 beta each; all × 2 units
    assert tuning.total_runs == (4 * 2 + 2 + 2) * 2 == 24
    grid = tuning.grid()
    assert len(grid) == 24 and len({json.dumps(p, sort_keys=True) for p in grid}) == 24
    assert grid[0] == {"opt": "sgd", "momentum": 0.0, "nesterov": True, "units": 16}
    assert all(("momentum" in p) == ("nesterov" in p) == (p["opt"] == "sgd") == ("beta" not in p) for p in grid)
    wrong = problems({"Objective_Metric": "loss", "Strategy": "grid", "Max_Runs": 48, "Ranges": CONDITIONAL})
    assert wrong["Tuning.Max_Runs"].startswith("grid search runs each of the 24 combinations once")


def test_a_conditional_grid_past_the_cap_is_refused_without_being_built():
    ranges = {"opt": {"Values": ["a", "b"]}, "units": {"Min": 0, "Max": 10**9, "When": {"opt": "a"}}}
    found = problems({"Objective_Metric": "loss", "Strategy": "grid", "Ranges": ranges})
    assert found == {"Tuning": "the grid has more than 1000 combinations; at most 1000"}


def test_when_problems_name_the_range_and_what_is_allowed():
    found = problems({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 2, "Ranges": {
        "lr": {"Min": 0.1, "Max": 0.2, "When": {"opt": "sgd"}}, "opt": {"Values": ["sgd", "adam"]},
        "m": {"Min": 0.1, "Max": 0.2, "When": {"opt": "rms"}}, "w": {"Min": 0.1, "Max": 0.2, "When": {"lr": 0.1}},
        "z": {"Min": 0.1, "Max": 0.2, "When": {"nope": 1}}, "e": {"Values": [1, 2], "When": {}}}})
    assert found["Tuning.Ranges.e"] == "When needs at least one range and the value(s) it must take"
    found = problems({"Objective_Metric": "loss", "Strategy": "random", "Max_Runs": 2, "Ranges": {
        "lr": {"Min": 0.1, "Max": 0.2, "When": {"opt": "sgd"}}, "opt": {"Values": ["sgd", "adam"]},
        "mom": {"Min": 0.1, "Max": 0.2, "When": {"opt": "rms"}}, "wd": {"Min": 0.1, "Max": 0.2, "When": {"lr": 0.1}},
        "zz": {"Min": 0.1, "Max": 0.2, "When": {"nope": 1}}}})
    message = found["Tuning.Ranges"]
    assert "'lr': When 'opt' must name a range listed before 'lr' in Ranges" in message
    assert "'mom': When 'opt': \"rms\" is not one of its Values (\"sgd\", \"adam\")" in message
    assert "'wd': When 'lr' must name a categorical range (one with Values); 'lr' is float" in message
    assert "'zz': When 'nope' is not a range" in message


def test_the_schema_describes_when_and_a_float_step():
    props = json_schema()["$defs"]["Range"]["properties"]
    assert "When" in props and "float" in props["Step"]["description"]
