"""Objects to S3 with aiobotocore: a single PUT below the part size, a multipart upload with
several parts in flight above it. Files are read part by part: never whole in memory."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import stamina
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from cdc_daemon.config import S3Settings
from cdc_daemon.errors import TransientError, first_error, from_aiohttp, from_botocore

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef


class S3Sink:
    def __init__(self, client: S3Client, settings: S3Settings) -> None:
        self._client = client
        self._settings = settings

    @classmethod
    async def open(cls, settings: S3Settings, stack: AsyncExitStack) -> S3Sink:
        config = AioConfig(
            # botocore's own retries take care of single-request blips; the worker retries
            # whole batches on top of them.
            retries={"max_attempts": 3, "mode": "standard"},
            # The daemon sends its own checksum (SHA-256, computed while the object was
            # written) for S3 to verify; botocore need not compute another one per request.
            request_checksum_calculation="when_required",
            # That checksum covers the body, so the signature need not hash it again: what
            # botocore does by itself over https, and over plain http (a local S3 server)
            # saves a SHA-256 pass over every object.
            s3={"payload_signing_enabled": False},
            connect_timeout=min(10, settings.timeout_s),
            read_timeout=settings.timeout_s,
            max_pool_connections=max(10, settings.max_concurrency * 2),
        )
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                region_name=settings.region,
                endpoint_url=settings.endpoint_url,
                config=config,
            )
        )
        return cls(client, settings)

    async def keys_modified_since(self, prefix: str, since: datetime) -> list[tuple[str, datetime]]:
        """The bucket's keys under ``prefix`` last modified at or after ``since``, with that
        time."""
        out: list[tuple[str, datetime]] = []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                out += [
                    (item["Key"], item["LastModified"])
                    for item in page.get("Contents", [])
                    if item["LastModified"] >= since
                ]
        except (BotoCoreError, ClientError) as exc:
            raise from_botocore(exc, f"listing s3://{self.bucket}/{prefix}") from None
        return out

    @property
    def bucket(self) -> str:
        return self._settings.bucket

    async def wait_for_bucket(self, attempts: int, wait_max_s: float) -> None:
        """``check_bucket`` at startup: a bucket that does not answer yet is waited for like any
        transient error; one that does not exist is the user's mistake and ends here."""
        async for attempt in stamina.retry_context(
            on=TransientError, attempts=attempts, wait_max=wait_max_s, timeout=None
        ):
            with attempt:
                await self.check_bucket()

    async def check_bucket(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
                "404",
                "NoSuchBucket",
            ):
                raise from_botocore(
                    ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket"),
                    f"checking bucket {self.bucket!r}",
                ) from None
            raise from_botocore(exc, f"checking bucket {self.bucket!r}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise from_aiohttp(exc, f"checking bucket {self.bucket!r}") from None

    async def create_bucket(self) -> None:
        """For local servers (the demo, tests); production buckets are made by their owners."""
        try:
            await self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise from_botocore(exc, f"creating bucket {self.bucket!r}") from None

    def _extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self._settings.server_side_encryption:
            extra["ServerSideEncryption"] = self._settings.server_side_encryption
            if self._settings.sse_kms_key_id:
                extra["SSEKMSKeyId"] = self._settings.sse_kms_key_id
        return extra

    async def upload_file(
        self,
        key: str,
        path: Path,
        metadata: dict[str, str],
        content_encoding: str | None,
        sha256: str,
    ) -> None:
        size = (await asyncio.to_thread(path.stat)).st_size
        extra = self._extra()
        extra["Metadata"] = metadata
        extra["ContentType"] = "text/csv"
        if content_encoding:
            extra["ContentEncoding"] = content_encoding
        try:
            if size <= self._settings.part_size:
                body = await asyncio.to_thread(path.read_bytes)
                await self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(),
                    **extra,
                )
            else:
                await self._multipart(key, path, size, extra)
        except (BotoCoreError, ClientError) as exc:
            raise from_botocore(exc, f"uploading s3://{self.bucket}/{key}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise from_aiohttp(exc, f"uploading s3://{self.bucket}/{key}") from None

    async def _multipart(self, key: str, path: Path, size: int, extra: dict[str, Any]) -> None:
        part_size = self._settings.part_size
        upload = await self._client.create_multipart_upload(Bucket=self.bucket, Key=key, **extra)
        upload_id = upload["UploadId"]
        limit = asyncio.Semaphore(self._settings.max_concurrency)

        async def send(number: int, offset: int) -> CompletedPartTypeDef:
            async with limit:
                body = await asyncio.to_thread(_read_range, path, offset, part_size)
                answer = await self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode(),  # noqa: S324
                )
                return {"PartNumber": number, "ETag": answer["ETag"]}

        try:
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(send(n + 1, offset))
                        for n, offset in enumerate(range(0, size, part_size))
                    ]
            except BaseExceptionGroup as failed:
                raise first_error(failed) from None
            await self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [t.result() for t in tasks]},
            )
        except BaseException:
            # An unfinished upload is invisible but billed: abort it, whatever stopped us.
            with contextlib.suppress(BotoCoreError, ClientError):
                await asyncio.shield(
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                )
            raise


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(length)
