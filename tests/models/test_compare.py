"""The leaderboard and its plot, on synthetic runs and on real runs of the example train.py."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mmp.cli import app
from mmp.models.compare import CompareError, leaderboard, search_all, table
from mmp.models.plot import PlotError, plot_leaderboard

from .conftest import Synthetic

runner = CliRunner()


def test_best_first_with_only_varied_params_duration_and_instance_hours(synthetic):
    low = synthetic.run(metrics={"acc": 0.5, "loss": 1.0}, params={"lr": "0.1", "epochs": "3"}, seconds=1800)
    high = synthetic.run(metrics={"acc": 0.9, "loss": 0.2}, params={"lr": "0.01", "epochs": "3"}, seconds=3600,
                         instance_count=4, commit="b" * 40)
    none = synthetic.run(metrics={"loss": 0.1}, params={"lr": "0.001", "epochs": "3"}, status="FAILED")

    board = leaderboard("synthetic", "acc", mode="max")

    assert [r.run_id for r in board.rows] == [high, low, none]  # a run without the metric sorts last
    assert board.best().run_id == high
    assert board.varied_params == ["lr"]  # epochs is 3 everywhere: noise, not shown
    assert board.rows[0].params == {"lr": "0.01"}
    top = board.rows[0]
    assert (top.commit, top.platform, top.instances) == ("b" * 40, "sagemaker", "ml.p3.2xlarge × 4")
    assert top.duration_s == pytest.approx(3600, abs=1)
    assert top.instance_hours == pytest.approx(4.0, abs=0.01)
    assert board.rows[1].instance_hours == pytest.approx(1.0, abs=0.01)
    assert board.rows[2].status == "FAILED" and board.rows[2].metrics == {}

    assert [r.run_id for r in leaderboard("synthetic", ["loss", "acc"], mode="min").rows] == [none, high, low]
    assert leaderboard("synthetic", ["loss", "acc"], mode="min").metrics == ["loss", "acc"]


def test_without_a_metric_newest_first_and_every_metric_shown(synthetic):
    first = synthetic.run(metrics={"acc": 0.9})
    second = synthetic.run(metrics={"loss": 0.3})
    board = leaderboard("synthetic")
    assert board.metric is None and board.metrics == ["acc", "loss"]
    assert {r.run_id for r in board.rows} == {first, second}


def test_pages_are_followed_and_keep_the_order(synthetic, client):
    ids = [synthetic.run(metrics={"acc": i / 10}, model=False) for i in range(7)]
    runs = search_all(client, [synthetic.experiment_id], order=["metrics.`acc` DESC"], page_size=3)
    assert [r.info.run_id for r in runs] == ids[::-1]
    assert len(search_all(client, [synthetic.experiment_id], order=["metrics.`acc` DESC"], page_size=3,
                          limit=5)) == 5


def test_unknown_experiment_and_bad_mode_are_clear(synthetic):
    synthetic.run(metrics={"acc": 1})
    with pytest.raises(CompareError, match="no MLflow experiment named 'nope'.*synthetic"):
        leaderboard("nope", "acc")
    with pytest.raises(CompareError, match="--mode must be one of max, min"):
        leaderboard("synthetic", "acc", mode="best")


def test_real_runs_leaderboard_table_json_and_plot(real_runs, tmp_path):
    board = leaderboard("digits-demo", "val_accuracy")
    assert {r.run_id for r in board.rows} == set(real_runs["run_ids"])
    assert board.varied_params == ["batch-size", "lr"]
    values = [r.metrics["val_accuracy"] for r in board.rows]
    assert values == sorted(values, reverse=True) and all(0 <= v <= 1 for v in values)
    for row in board.rows:
        assert row.status == "FINISHED" and row.platform == "local" and len(row.commit) == 40
        assert row.duration_s > 0 and row.instance_hours == pytest.approx(row.duration_s / 3600)

    result = runner.invoke(app, ["compare", "digits-demo", "--metric", "val_accuracy", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["run_id"] for r in data["rows"]] == [r.run_id for r in board.rows]
    assert data["varied_params"] == ["batch-size", "lr"] and data["rows"][0]["instances"] == "local × 1"

    png = tmp_path / "out" / "board.png"
    result = runner.invoke(app, ["compare", "digits-demo", "-m", "val_accuracy", "-m", "val_loss", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    for column in ("status", "commit", "platform", "instances", "batch-size", "lr", "val_accuracy", "val_loss",
                   "duration", "inst-h", board.rows[0].run_id[:8], board.rows[0].commit[:7]):
        assert column in result.stdout
    from matplotlib.image import imread

    image = imread(png)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] * 2  # three panels side by side
    assert image.std() > 0.01  # something was drawn


def test_plot_categorical_param_and_errors(synthetic, tmp_path):
    for opt, acc in (("adam", 0.8), ("sgd", 0.7), ("adam", 0.85)):
        synthetic.run(metrics={"acc": acc}, params={"optimizer": opt, "lr": "0.1"})
    path = plot_leaderboard(leaderboard("synthetic", "acc"), tmp_path / "p.png")
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 600
    with pytest.raises(PlotError, match="--plot needs --metric"):
        plot_leaderboard(leaderboard("synthetic"), tmp_path / "q.png")
    with pytest.raises(PlotError, match="logged the metric 'nope'"):
        plot_leaderboard(leaderboard("synthetic", "nope"), tmp_path / "q.png")
    result = runner.invoke(app, ["compare", "synthetic", "--plot", str(tmp_path / "q.png")])
    assert result.exit_code == 1 and "--plot needs --metric" in result.output
    assert not (tmp_path / "q.png").exists()


def test_table_marks_failed_and_missing_values(synthetic):
    from rich.console import Console

    synthetic.run(metrics={"acc": 0.9}, params={"lr": "0.1"})
    synthetic.run(metrics={}, params={"lr": "0.2"}, status="FAILED")
    out = Console(record=True, width=200)
    out.print(table(leaderboard("synthetic", "acc")))
    text = out.export_text()
    assert "FAILED" in text and "—" in text and "0.9" in text and "best by acc (max)" in text


def test_table_shows_run_data_as_text_not_markup():
    from io import StringIO

    from rich.console import Console

    from mmp.models.compare import Leaderboard, Row

    row = Row(rank=1, run_id="a" * 32, run_name="r", status="FINISHED", commit="c" * 40, platform="local[/x]",
              instance_type="[bold]local", instance_count=1, processes="1", processes_per_host="1",
              params={"opt": "[/x] [red]"}, metrics={"acc": 0.5}, start_time=None, duration_s=None,
              instance_hours=None)
    board = Leaderboard(experiment="e", experiment_id="1", metric="acc", mode="max", metrics=["acc"],
                        varied_params=["opt"], rows=[row])
    out = StringIO()
    Console(file=out, width=200).print(table(board))  # markup would raise MarkupError on "[/x]"
    assert "[/x] [red]" in out.getvalue() and "local[/x]" in out.getvalue() and "[bold]local" in out.getvalue()


def test_compare_and_plot_show_markup_and_dollars_in_run_data_literally(client, tmp_path):
    """Issue 20, finding 12: rich markup in any tag (commit, processes, the experiment's name) and a
    `$…$` in a value or name crashed `mmp compare` and `--plot`; both are shown as written."""
    name = "e$x_$[/y]"  # `$x_$` is broken mathtext: drawn as math, savefig raises ValueError
    runs = Synthetic(client, experiment=name)
    first = runs.run(metrics={"acc": 0.9}, params={"opt": "$\\undefined$"}, commit="[/x]abcdef")
    runs.run(metrics={"acc": 0.8}, params={"opt": "[red]$"}, commit="[bold]12")
    client.set_tag(first, "mmp.processes", "[/b]")
    result = runner.invoke(app, ["compare", name, "--metric", "acc", "--plot", str(tmp_path / "p.png")],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in (name, "[/x]abc", "[bold]1", "[/b]", "$\\undefined$", "[red]$"):
        assert text in result.output
    from PIL import Image

    with Image.open(tmp_path / "p.png") as image:
        image.verify()


# -- a study's trials: pruned ones are partial (issue 24, gap 4) ---------------------------------------
def _study(synthetic, trials):
    """A study parent (lr sampled on a log scale, momentum linearly) and its trials: (state, acc, lr, momentum)."""
    ranges = {"lr": {"Type": "float", "Min": 1e-4, "Max": 0.5, "Scale": "log"},
              "momentum": {"Type": "float", "Min": 0.001, "Max": 0.99, "Scale": "linear"}}
    parent = synthetic.run(metrics={"acc": 0.8}, model=False, tags={
        "mmp.study": "true", "mmp.tuning.objective": "acc", "mmp.tuning.direction": "maximize",
        "mmp.tuning.ranges": json.dumps(ranges)})
    ids = {}
    for number, (state, acc, lr, momentum) in enumerate(trials):
        ids[number] = synthetic.run(
            metrics={"acc": acc}, params={"lr": lr, "momentum": momentum}, model=False,
            status={"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED"),
            tags={"mlflow.parentRunId": parent, "mmp.trial.number": str(number), "mmp.trial.state": state})
    return parent, ids


# A pruned trial with the highest partial score; momentum's values span 1000× (a spread that once drew a log axis).
TRIALS = [("complete", 0.80, "0.001", "0.001"), ("pruned", 0.95, "0.1", "0.9"), ("complete", 0.85, "0.01", "0.5"),
          ("failed", 0.99, "0.0001", "0.99")]


def test_a_study_ranks_completed_trials_first_and_marks_pruned_ones(synthetic):
    parent, ids = _study(synthetic, TRIALS)
    board = leaderboard("synthetic", study=parent[:10])
    assert [r.run_id for r in board.rows] == [ids[2], ids[0], ids[1], ids[3]]
    assert [r.rank for r in board.rows] == [1, 2, 3, 4]
    assert board.best().run_id == ids[2]  # not the pruned trial's partial 0.95, nor the failed one's 0.99
    assert [r.partial for r in board.rows] == [False, False, True, False]
    assert json.loads(json.dumps(board.to_dict()))["rows"][2]["partial"] is True

    from rich.console import Console

    out = Console(width=250, record=True)
    out.print(table(board))
    text = out.export_text()
    assert "0.95†" in text and "KILLED (pruned)" in text and "not comparable" in text
    assert "0.85†" not in text and "FAILED (failed)" not in text

    whole = leaderboard("synthetic", "acc")  # every run: the study's trials grouped under it, completed first
    assert [r.run_id for r in whole.rows] == [parent, ids[2], ids[0], ids[1], ids[3]]


def test_the_study_plot_draws_pruned_trials_apart_and_follows_each_range_s_scale(synthetic, tmp_path):
    from mmp.models.plot import PARTIAL_LABEL, figure

    parent, ids = _study(synthetic, TRIALS)
    board = leaderboard("synthetic", study=parent)
    assert board.scales == {"lr": "log", "momentum": "linear"}
    fig = figure(board)
    per_trial, *panels = fig.axes
    by_name = {ax.get_xlabel(): ax for ax in panels}
    assert by_name["lr"].get_xscale() == "log"
    assert by_name["momentum"].get_xscale() == "linear"  # sampled linearly: a linear axis, whatever the spread
    for ax in (per_trial, by_name["lr"], by_name["momentum"]):
        labels = [c.get_label() for c in ax.collections]
        assert PARTIAL_LABEL in labels, labels
    partial = next(c for c in per_trial.collections if c.get_label() == PARTIAL_LABEL)
    assert [tuple(p) for p in partial.get_offsets()] == [(1.0, 0.95)]
    best_line = next(line for line in per_trial.lines if line.get_label() == "best so far")
    assert list(best_line.get_ydata()) == [0.80, 0.85]  # completed trials only: 0.95 and 0.99 are not a best
    assert plot_leaderboard(board, tmp_path / "study.png").stat().st_size > 0
