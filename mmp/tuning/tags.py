"""The MLflow tags a study writes, in one light module: the study loop, `mmp compare`/`promote`
and the Conclude Lambda (which must not import Optuna) all read them from here."""

TAG_STUDY = "mmp.study"  # "true" on the parent run
TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL = "mmp.trial.number"
TAG_TRIAL_STATE = "mmp.trial.state"  # running, complete, pruned, failed, cancelled
