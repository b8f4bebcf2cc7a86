"""A real S3 server for the test session (moto's, in a thread) and a fresh bucket per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 ships no type hints
import pytest

from cdc_daemon.local.services import LocalS3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    server = LocalS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_client(s3_server: LocalS3) -> Any:
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"cdc-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name
