"""Filesystems of prompt and output URLs (fsspec), with storage mistakes as one line naming the place.

fsspec and its backends report a typo in `storage_options` as a TypeError deep in
aiobotocore, missing credentials as a botocore traceback and a missing bucket as
"The specified bucket does not exist": `StorageError` says which URL, option or
bucket instead, and what to do.
"""
from __future__ import annotations

from contextlib import contextmanager

import fsspec


class StorageError(ValueError):
    """The storage behind a URL cannot be used as configured; the message names the URL, option or file."""


def open_fs(url: str, storage_options: dict):
    """(filesystem, path) of a URL; a bad option or a missing backend is a StorageError."""
    with storage_errors(url, storage_options):
        return fsspec.core.url_to_fs(url, **storage_options)


@contextmanager
def storage_errors(url: str, storage_options: dict | None = None, what: str = ""):
    """Turn the storage backends' exceptions into one-line StorageErrors about `url` (`what`: the file or key)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend raises its own types; unknown ones pass through below
        message = describe(e, url, storage_options or {}, what)
        if message is None:
            raise
        raise StorageError(message) from e


def describe(e: Exception, url: str, storage_options: dict, what: str = "") -> str | None:
    """A one-line explanation of a storage exception, or None when it is not a storage mistake we know."""
    where = f"{url} ({what})" if what else url
    name = type(e).__name__
    text = str(e)
    if isinstance(e, TypeError) and "unexpected keyword argument" in text:
        option = text.rsplit("argument", 1)[-1].strip().strip("'\"")
        return (f"{url}: storage_options has an option the {_scheme(url)} filesystem does not know: {option!r} "
                f"(given: {', '.join(sorted(storage_options)) or 'none'}; e.g. endpoint_url, key, secret)")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"{url}: no credentials for {_scheme(url)}:// (set key and secret in storage_options, "
                f"or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or give the nodes a role)")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or \
            isinstance(e, ConnectionError):
        endpoint = storage_options.get("endpoint_url") or "the default endpoint"
        return f"{url}: cannot reach {endpoint}: {text.splitlines()[0] if text else name}"
    if isinstance(e, FileNotFoundError) and "bucket does not exist" in text.lower():
        return f"{url}: the bucket {_bucket(url)!r} does not exist (create it, or fix the URL)"
    if isinstance(e, PermissionError) or name in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
        return f"{where}: access denied ({text.splitlines()[0] if text else name}): check the credentials"
    if isinstance(e, ImportError):
        return f"{url}: {e} (the {_scheme(url)}:// filesystem needs its fsspec package, e.g. pip install s3fs)"
    return None


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _bucket(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]
