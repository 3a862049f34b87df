"""Print the stack's role policies, as the Pulumi program renders them under mocks, as JSON.

Run as a subprocess once per test session (tests/conftest.py `iam_policies`): Pulumi's mocks
are process-wide state, kept out of the tests that only need the result. Every optional part
is on (FSx, DLAMI, Kubernetes, the Docker Hub pull-through cache, GitLab, the CodeCommit trigger for
`fashion-demo`), so every role the program can make is here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.infra import conftest as h  # noqa: E402

SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
CONFIG = {**h.DEV_CONFIG, "mmp:fsx": "true", "mmp:dlami": "true", "mmp:sshPublicKey": "ssh-ed25519 AAAA test",
          "mmp:sshPrivateKey": SSH_KEY, "mmp:kubernetes": "true", "mmp:gitlabToken": "glpat-TESTTOKENthatmustnotleak",
          "mmp:gitlabWebhookSecret": "gitlab-webhook-secret-thatmustnotleak",
          "mmp:codecommitRepositories": json.dumps(["fashion-demo"]),
          "mmp:dockerHubSecretArn": f"arn:aws:secretsmanager:{h.REGION}:{h.ACCOUNT}:secret:ecr-pullthroughcache/hub-AbCdEf"}


def main() -> None:
    run = h.run_stack("dev", CONFIG)
    # The mocks give every ARN a region; IAM's have none (arn:aws:iam::ACCOUNT:role/NAME).
    policies = {p.name: json.loads(p.inputs["policy"].replace(f"arn:aws:iam:{h.REGION}:", "arn:aws:iam::"))
                for p in run.of_type("aws:iam/rolePolicy:RolePolicy")}
    json.dump(policies, sys.stdout)


if __name__ == "__main__":
    main()
