"""Checkpoint mirroring to S3, so a job whose local disk is gone (a new pod, a new node) still resumes.

boto3 reads credentials from the standard AWS environment / profile and the endpoint of S3-compatible
servers from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; nothing is configured here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"checkpoint uri {uri!r} must look like s3://bucket/prefix")
    return parsed.netloc, parsed.path.lstrip("/")


def _client() -> Any:  # boto3 ships no type stubs
    import boto3

    return boto3.client("s3")


def upload(local: Path, uri: str, name: str | None = None) -> str:
    bucket, prefix = _split(uri)
    key = f"{prefix.rstrip('/')}/{name or local.name}".lstrip("/")
    _client().upload_file(str(local), bucket, key)
    return f"s3://{bucket}/{key}"


def download_if_exists(uri: str, name: str, local: Path) -> bool:
    """Fetch ``<uri>/<name>`` to ``local`` (atomically); False if there is no such object."""
    from botocore.exceptions import ClientError

    bucket, prefix = _split(uri)
    key = f"{prefix.rstrip('/')}/{name}".lstrip("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.download")  # nodes may share the directory
    try:
        _client().download_file(bucket, key, str(tmp))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    tmp.replace(local)
    return True
