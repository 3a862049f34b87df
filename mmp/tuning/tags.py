"""The MLflow tags a study writes, in one light module: the study loop, `mmp compare`/`promote`
and the Conclude Lambda (which must not import Optuna) all read them from here.

The TAG_TRIAL_* tags below TAG_TRIAL_STATE are what a study tells train.py through its run (it reads
them with MLflow alone; examples/fashion/train.py shows how): whether to wait for the pruner's verdict
after each step, the verdict, and the best objective before the trial started (a trial that does not
beat it need not pay for log_model)."""

TAG_STUDY = "mmp.study"  # "true" on the parent run
TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL = "mmp.trial.number"
TAG_TRIAL_STATE = "mmp.trial.state"  # running, complete, pruned, failed, cancelled
TAG_TRIAL_PRUNING = "mmp.trial.pruning"  # "wait": Early_Stopping is on; train.py may wait for each verdict
TAG_TRIAL_JUDGED = "mmp.trial.judged"  # "<step>": every step up to it was judged and passed; "pruned:<step>"
TAG_TRIAL_OBJECTIVE = "mmp.trial.objective"  # the study's Objective_Metric
TAG_TRIAL_DIRECTION = "mmp.trial.direction"  # maximize or minimize
TAG_TRIAL_BEST_BEFORE = "mmp.trial.best_before"  # repr(float): the best complete value when it started; absent: none
