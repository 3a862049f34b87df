"""DataStore: the datasets and artifacts buckets, the dataset catalogue, optional FSx.

Both buckets are versioned, encrypted (SSE-S3; no per-key KMS cost), block all
public access and enforce bucket-owner object ownership. The catalogue is the JSON
the backends read from `MMP_DATASETS`: digits and fashion plus `mmp:datasets`, each
with its S3 prefix and, when FSx is on, its path inside the file system
(`/datasets/<name>`: SageMaker's DirectoryPath is `/<MountName>/datasets/<name>`,
a DLAMI host mounting at `/fsx` sees `/fsx/datasets/<name>`). FSx for Lustre
(`mmp:fsx`, off by default: it is the stack's most expensive resource at rest) is
PERSISTENT_2, linked to `s3://<datasets>/datasets/` by a data repository
association at `/datasets` (so a dataset is at `/fsx/datasets/<name>` when mounted
at `/fsx`). A configured dataset in another bucket (`datasets.<name>.s3`, no `fsx`)
gets an import-only association of its own at `/shared/<name>`, and that path in
the catalogue: the `/datasets` association never holds it.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from mmp.contract.datasets import BUILTIN
from mmp.infra.network import Network
from mmp.infra.settings import Settings

FSX_MOUNT_POINT = "/fsx"
FSX_DATASETS_PATH = "/datasets"
FSX_SHARED_PATH = "/shared"  # datasets in other buckets, one association each


def secure_bucket(name: str, parent: pulumi.Resource, *, force_destroy: bool, tags: dict) -> aws.s3.Bucket:
    """A private, versioned, encrypted bucket."""
    opts = pulumi.ResourceOptions(parent=parent)
    bucket = aws.s3.Bucket(name, force_destroy=force_destroy, tags=tags, opts=opts)
    aws.s3.BucketPublicAccessBlock(name, bucket=bucket.id, block_public_acls=True, block_public_policy=True,
                                   ignore_public_acls=True, restrict_public_buckets=True, opts=opts)
    aws.s3.BucketVersioning(name, bucket=bucket.id, versioning_configuration={"status": "Enabled"}, opts=opts)
    aws.s3.BucketServerSideEncryptionConfiguration(name, bucket=bucket.id, rules=[{
        "apply_server_side_encryption_by_default": {"sse_algorithm": "AES256"}, "bucket_key_enabled": True}],
        opts=opts)
    aws.s3.BucketOwnershipControls(name, bucket=bucket.id, rule={"object_ownership": "BucketOwnerEnforced"},
                                   opts=opts)
    return bucket


def catalogue(bucket: str, settings: Settings) -> dict[str, dict[str, str]]:
    """name → {s3, fsx?} for the built-in datasets and the configured ones."""
    entries: dict[str, dict[str, str]] = {}
    for name in (*BUILTIN, *settings.datasets):
        configured = settings.datasets.get(name)
        entry = {"s3": (configured.s3 if configured and configured.s3 else f"s3://{bucket}/datasets/{name}/")}
        if configured and configured.fsx:
            entry["fsx"] = configured.fsx
        elif settings.fsx:  # the path inside the file system: SageMaker reads /<MountName><path>
            linked = name in settings.fsx_linked_datasets  # another bucket: its own association
            entry["fsx"] = f"{FSX_SHARED_PATH if linked else FSX_DATASETS_PATH}/{name}"
        entries[name] = entry
    return entries


class DataStore(pulumi.ComponentResource):
    def __init__(self, name: str, settings: Settings, network: Network, opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:DataStore", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"mmp:deployment": settings.prefix}
        keep = settings.production  # prod buckets survive `pulumi destroy` unless emptied by hand
        self.datasets_bucket = secure_bucket(f"{name}-datasets", self, force_destroy=not keep, tags=tags)
        self.artifacts_bucket = secure_bucket(f"{name}-artifacts", self, force_destroy=not keep, tags=tags)
        self.catalogue_json = self.datasets_bucket.bucket.apply(lambda b: json.dumps(catalogue(b, settings),
                                                                                     sort_keys=True))
        aws.s3.BucketObjectv2(f"{name}-catalogue", bucket=self.datasets_bucket.id, key="catalogue/datasets.json",
                              content=self.catalogue_json, content_type="application/json", opts=child)

        self.fsx: aws.fsx.LustreFileSystem | None = None
        self.fsx_id: pulumi.Output[str] | str = ""
        self.fsx_dns_name: pulumi.Output[str] | str = ""
        self.fsx_mount_name: pulumi.Output[str] | str = ""
        if settings.fsx:
            self.fsx = aws.fsx.LustreFileSystem(
                f"{name}-fsx", deployment_type="PERSISTENT_2", storage_type="SSD",
                storage_capacity=settings.fsx_storage_gb, per_unit_storage_throughput=settings.fsx_throughput,
                file_system_type_version="2.15", data_compression_type="LZ4",
                subnet_ids=network.private_subnet_ids.apply(lambda ids: ids[0]),  # one subnet (a string in v7)
                security_group_ids=[network.fsx_sg.id], automatic_backup_retention_days=0,
                tags={**tags, "Name": f"{settings.prefix}-datasets"}, opts=child)
            aws.fsx.DataRepositoryAssociation(
                f"{name}-fsx-datasets", file_system_id=self.fsx.id, file_system_path=FSX_DATASETS_PATH,
                data_repository_path=pulumi.Output.concat("s3://", self.datasets_bucket.bucket, "/datasets/"),
                batch_import_meta_data_on_create=True,
                s3={"auto_import_policy": {"events": ["NEW", "CHANGED", "DELETED"]},
                    "auto_export_policy": {"events": ["NEW", "CHANGED", "DELETED"]}},
                opts=child)
            for dataset, prefix in settings.fsx_linked_datasets.items():  # import only: never write to their bucket
                aws.fsx.DataRepositoryAssociation(
                    f"{name}-fsx-{dataset}", file_system_id=self.fsx.id,
                    file_system_path=f"{FSX_SHARED_PATH}/{dataset}", data_repository_path=prefix.rstrip("/") + "/",
                    batch_import_meta_data_on_create=True,
                    s3={"auto_import_policy": {"events": ["NEW", "CHANGED", "DELETED"]}}, opts=child)
            self.fsx_id = self.fsx.id
            self.fsx_dns_name = self.fsx.dns_name
            self.fsx_mount_name = self.fsx.mount_name

        self.register_outputs({
            "datasetsBucket": self.datasets_bucket.bucket, "artifactsBucket": self.artifacts_bucket.bucket,
            "catalogue": self.catalogue_json, "fsxId": self.fsx_id, "fsxMountName": self.fsx_mount_name,
        })
