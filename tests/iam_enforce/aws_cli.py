"""A stand-in for the AWS CLI on a DLAMI instance (`aws s3 cp URI -`, `aws s3 sync DIR URI`),
done with boto3 against moto. Its calls are the instance profile's (dlami-host).

    #!/path/to/python
    import sys; sys.path.insert(0, IAM_DIR); import aws_cli; aws_cli.main(ENDPOINT)
"""

from __future__ import annotations

import os
import sys


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def main(endpoint: str) -> None:
    import boto3

    if os.environ.get("MMP_IAM_STATE") and os.path.exists(os.environ["MMP_IAM_STATE"]):
        import iam_calls

        os.environ[iam_calls.AS_ENV] = "DLAMI host: aws CLI=dlami-host"  # the whole process, s3transfer's threads too
        iam_calls.install()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION") or "eu-west-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    if args[:2] == ["s3", "cp"] and args[3] == "-":
        bucket, key = _split(args[2])
        sys.stdout.buffer.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    elif args[:2] == ["s3", "sync"]:
        bucket, prefix = _split(args[3])
        for root, _, files in os.walk(args[2]):
            for name in files:
                path = os.path.join(root, name)
                s3.upload_file(path, bucket, prefix + os.path.relpath(path, args[2]))
    else:
        sys.exit(2)
