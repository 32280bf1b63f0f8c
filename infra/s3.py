"""S3 through boto3 against the configured endpoint (SeaweedFS embedded, AWS S3 in production)."""

from __future__ import annotations

from typing import Any

from infra.config import S3Settings


def s3_client(settings: S3Settings, timeout_s: float = 10, max_pool: int = 16, attempts: int = 3) -> Any:
    """A boto3 S3 client with path-style addressing and SigV4 (presigned URLs work on any endpoint),
    making ``attempts`` in all for a request (botocore's ``max_attempts`` counts the retries only)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.effective_s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"total_max_attempts": attempts, "mode": "standard"},
            max_pool_connections=max_pool,
        ),
    )


def answered_status(error: BaseException) -> int | None:
    """The HTTP status of the S3 answer ``error`` carries (botocore's ClientError), None where no
    answer came (a read timed out: botocore's response is None then) or ``error`` is no S3 error."""
    response = getattr(error, "response", None)
    meta = response.get("ResponseMetadata") if isinstance(response, dict) else None
    status = meta.get("HTTPStatusCode") if isinstance(meta, dict) else None
    return status if isinstance(status, int) else None
