"""The one place that builds train.py's command line and horovodrun around it.

The contract (DESIGN.md): `--dataset-path P --output-path O --dataset NAME` then one
`--key value` per hyperparameter, in the file's order, as a list, never a shell
string. A boolean follows argparse's `store_true` convention: true → a bare `--key`,
false → nothing. Backends only supply paths, hosts and a way to run the list; where
a list must cross a shell (SSH), `shell_join` quotes it, here and nowhere else.
"""

from __future__ import annotations

import json
import shlex
from typing import Mapping, Sequence

TRAIN_SCRIPT = "train.py"
# The flags the pipeline sets; train.py declares them (DESIGN.md "Contract with train.py").
CONTRACT_FLAGS = ("--dataset-path", "--output-path", "--dataset")

# horovodrun (gloo) hands each rank's whole command, exported environment included, to
# `sh -c` as ONE argument, and Linux caps one argument at MAX_ARG_STRLEN (32 pages,
# 128 KiB): past it exec fails with "Argument list too long". train.py's part may
# use half, leaving the rest for the environment and the paths.
MAX_ARG_STRLEN = 32 * 4096
COMMAND_LINE_BUDGET = MAX_ARG_STRLEN // 2

# horovodrun (0.28.1) runs argparse over its whole command line, train.py's part
# included, and stops with "ambiguous option" on any token that is a prefix of two
# of its own options (`--a`, `--log`). Such tokens are refused at validation time;
# tests/spine checks this list against the installed horovodrun's parser.
HOROVODRUN_OPTIONS = (
    "--autotune", "--autotune-bayes-opt-max-samples", "--autotune-gaussian-process-noise", "--autotune-log-file",
    "--autotune-steps-per-sample", "--autotune-warmup-samples", "--binding-args", "--blacklist-cooldown-range",
    "--cache-capacity", "--check-build", "--config-file", "--cycle-time-ms", "--disable-cache",
    "--elastic-timeout", "--fusion-threshold-mb", "--gloo", "--gloo-timeout-seconds", "--help",
    "--hierarchical-allgather", "--hierarchical-allreduce", "--host-discovery-script", "--hostfile", "--hosts",
    "--jsrun", "--log-hide-timestamp", "--log-level", "--log-with-timestamp", "--log-without-timestamp",
    "--max-np", "--max-num-proc", "--min-np", "--min-num-proc", "--mpi", "--mpi-args", "--mpi-threads-disable",
    "--network-interface", "--network-interfaces", "--no-autotune", "--no-hierarchical-allgather",
    "--no-hierarchical-allreduce", "--no-log-hide-timestamp", "--no-mpi-threads-disable", "--no-stall-check",
    "--no-timeline-mark-cycles", "--no-torus-allreduce", "--num-nccl-streams", "--num-proc", "--output-filename",
    "--prefix-output-with-timestamp", "--reset-limit", "--slots-per-host", "--ssh-identity-file", "--ssh-port",
    "--stall-check", "--stall-check-shutdown-time-seconds", "--stall-check-warning-time-seconds",
    "--start-timeout", "--tcp", "--thread-affinity", "--timeline-filename", "--timeline-mark-cycles",
    "--torus-allreduce", "--verbose", "--version",
    "-H", "-cb", "-h", "-hostfile", "-i", "-np", "-p", "-prefix-timestamp", "-v",
)


def horovodrun_ambiguity(token: str) -> list[str]:
    """horovodrun options `token` is an ambiguous prefix of (empty when it is safe)."""
    if not token.startswith("-") or " " in token or token in HOROVODRUN_OPTIONS:
        return []
    prefix = token.split("=", 1)[0]
    if prefix in HOROVODRUN_OPTIONS:
        return []
    matches = [o for o in HOROVODRUN_OPTIONS if o.startswith(prefix) and o.startswith("--") == prefix.startswith("--")]
    return matches if len(matches) > 1 else []


def contract_flag_clash(token: str) -> list[str]:
    """The contract flags `token` is a prefix of (empty when none).

    argparse takes any unique prefix of a declared option (`--output` for
    `--output-path`), so a hyperparameter named like that would override the path
    the pipeline chose in a train.py that declares only the contract's flags.
    """
    if not token.startswith("--") or token == "--":
        return []
    prefix = token.split("=", 1)[0]
    return [flag for flag in CONTRACT_FLAGS if flag.startswith(prefix)]


MAX_VALUE_CHARS = 2500  # one value's cap, so that a hundred of them fit COMMAND_LINE_BUDGET


def checked_value(value: object) -> object:
    """A value train.py gets after `--name`, or ValueError saying why it cannot be passed.

    The one check for every value on train.py's command line: a fixed hyperparameter
    and each of a Tuning range's Values (a trial passes them the same way)."""
    if not isinstance(value, str):
        return value
    if "\0" in value:
        raise ValueError("contains a NUL byte, which no command line can carry")
    if len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"is longer than {MAX_VALUE_CHARS} characters")
    flags = contract_flag_clash(value)
    if flags:
        raise ValueError(f"{value!r} is a prefix of {' and '.join(flags)}, which the pipeline sets (argparse "
                         "takes a prefix of an option for that option)")
    clash = horovodrun_ambiguity(value)
    if clash:
        raise ValueError(f"{value!r} is an ambiguous abbreviation to horovodrun (could be {', '.join(clash[:3])}, …)")
    return value


def command_line_problem(hyperparameters: Mapping[str, object]) -> str | None:
    """Why these hyperparameters make too long a command line for horovodrun, or None."""
    size = len(shell_join(hyperparameter_args(hyperparameters)).encode())
    if size <= COMMAND_LINE_BUDGET:
        return None
    return (f"make a command line of {size} bytes; the limit is {COMMAND_LINE_BUDGET} (horovodrun runs each "
            "rank through `sh -c` with one argument, which Linux caps at 128 KiB: 'Argument list too long')")


def hyperparameter_text(value: object) -> str:
    """How a value is written where only text fits (MLflow params, SageMaker's map)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return str(value)


def hyperparameter_args(hyperparameters: Mapping[str, object]) -> list[str]:
    """`--key value` per hyperparameter in order; true → bare `--key`, false → nothing."""
    argv: list[str] = []
    for name, value in hyperparameters.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not False:
            argv += [f"--{name}", hyperparameter_text(value)]
    return argv


def train_args(
    dataset_path: str, output_path: str, dataset: str, hyperparameters: Mapping[str, object]
) -> list[str]:
    """train.py's arguments: the three mandatory flags, then the hyperparameters."""
    argv = [CONTRACT_FLAGS[0], str(dataset_path), CONTRACT_FLAGS[1], str(output_path), CONTRACT_FLAGS[2], dataset]
    return argv + hyperparameter_args(hyperparameters)


def boolean_names(hyperparameters: Mapping[str, object]) -> str:
    """The boolean hyperparameters' names, comma-separated: how they survive a
    string-only channel (SageMaker's HyperParameters) as booleans."""
    return ",".join(name for name, value in hyperparameters.items() if isinstance(value, bool))


def restore_booleans(values: Mapping[str, str], names: str | None) -> dict[str, object]:
    """Undo `hyperparameter_text` for the names `boolean_names` listed."""
    flags = set((names or "").split(",")) - {""}
    return {k: (v == "true") if k in flags else v for k, v in values.items()}


def hosts_spec(hosts: Sequence[tuple[str, int]]) -> str:
    """horovodrun's -H value: `host1:slots,host2:slots`."""
    return ",".join(f"{host}:{slots}" for host, slots in hosts)


def horovodrun_argv(
    hosts: Sequence[tuple[str, int]],
    train_arguments: Sequence[str],
    *,
    python: str = "python",
    horovodrun: str = "horovodrun",
    script: str = TRAIN_SCRIPT,
    extra: Sequence[str] = (),
    launcher: Sequence[str] = (),
) -> list[str]:
    """`horovodrun -np N -H h:s,… --gloo [extra] python [launcher] train.py …` as a list
    (launcher: e.g. mmp.runtime.rank's `-m mmp.runtime.rank`, which reads the MLflow secret in each rank)."""
    total = sum(slots for _, slots in hosts)
    return [horovodrun, "-np", str(total), "-H", hosts_spec(hosts), "--gloo", *extra, python, *launcher, script,
            *train_arguments]


def mlflow_env(tracking_uri: str, experiment_name: str, run_id: str) -> dict[str, str]:
    """How train.py reaches the run the pipeline made (MLflow's own variables)."""
    return {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": experiment_name,
        "MLFLOW_RUN_ID": run_id,
    }


def shell_join(argv: Sequence[str]) -> str:
    """Quote a list for a POSIX shell so every element arrives literally."""
    return shlex.join([str(a) for a in argv])
