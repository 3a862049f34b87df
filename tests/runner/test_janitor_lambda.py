"""The scheduled janitor Lambda (mmp.backends.dlami_janitor.handler): moto EC2 and SNS (server mode) and the
stack's MLflow over REST decide; what it terminates is e-mailed."""

from __future__ import annotations

import json

from mmp import aws
from mmp.backends import JobState
from mmp.backends.dlami_janitor import handler
from mmp.tracking.rest import RestRunTracker


def test_the_janitor_lambda_terminates_instances_of_ended_runs_and_reports_them(cloud, stages_mlflow, monkeypatch,
                                                                              iam_enforced):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stages_mlflow)
    tracker = RestRunTracker(stages_mlflow)
    ended = tracker.start("janitor-lambda", run_name="ended", tags={}, params={})
    tracker.finish(ended, JobState.FAILED, message="runner died")
    live = tracker.start("janitor-lambda", run_name="live", tags={}, params={})
    sns, sqs = aws.client("sns"), aws.client("sqs")
    topic = sns.create_topic(Name="mmp-notify")["TopicArn"]
    queue = sqs.create_queue(QueueName="janitor-mail")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
    monkeypatch.setenv("MMP_NOTIFY_TOPIC_ARN", topic)
    iam_enforced.bind({topic: topic.rsplit(":", 1)[0] + ":NOTIFY_TOPIC"})  # the stack's topic (tests/iam_enforce)

    def launch(run_id: str) -> str:
        return aws.client("ec2").run_instances(ImageId=cloud.image_id, MinCount=1, MaxCount=1, TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "mmp:managed", "Value": "true"},
                                                  {"Key": "mmp:run-id", "Value": run_id},
                                                  {"Key": "mmp:max-runtime-minutes", "Value": "255"}]}],
        )["Instances"][0]["InstanceId"]

    stray, busy = launch(ended), launch(live)
    result = handler({"source": "aws.events", "detail-type": "Scheduled Event"})
    actions = {f["instance_id"]: f["action"] for f in result["findings"]}
    assert actions == {stray: "terminate", busy: "keep"}
    assert [i["InstanceId"] for i in cloud.instances()] == [busy]
    (mail,) = [json.loads(m["Body"]) for m in sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]]
    assert "janitor terminated 1" in mail["Subject"] and stray in mail["Message"] and "concluded by the pipeline (FAILED)" in mail["Message"]
