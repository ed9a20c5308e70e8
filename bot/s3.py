"""A small async client for S3-compatible object stores (AWS S3, MinIO, Cloudflare R2,
Backblaze B2 ...): put, get and delete an object, and check that a bucket answers.

Requests are signed with AWS Signature Version 4 in the ``Authorization`` header, the
payload's SHA-256 signed too (``x-amz-content-sha256``), and addressed path-style
(``<endpoint>/<bucket>/<key>``), which every S3-compatible service accepts. Transient
failures (no connection, a timeout, 5xx, 429, S3's ``SlowDown``) are tried again a few
times with a growing, jittered pause; any other refusal is final at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# S3 error codes worth another try whatever their status
TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"})


# signing ------------------------------------------------------------------------------------------


def uri_encode(text: str, *, keep_slash: bool = False) -> str:
    """Percent-encode every byte of ``text`` (UTF-8) but the unreserved characters
    ``A-Z a-z 0-9 - _ . ~`` (and ``/`` with ``keep_slash``), hex digits in upper case."""
    return quote(text, safe="/" if keep_slash else "")


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    """Names and values encoded, then sorted by name (and value); ``?lifecycle`` is
    ``lifecycle=``."""
    pairs = sorted((uri_encode(name), uri_encode(value)) for name, value in query)
    return "&".join(f"{name}={value}" for name, value in pairs)


def canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """The canonical header lines (names in lower case, values trimmed, inner runs of
    spaces made one) and the signed header names, both sorted by name."""
    lines = sorted((name.lower().strip(), " ".join(value.split())) for name, value in headers.items())
    return "".join(f"{name}:{value}\n" for name, value in lines), ";".join(name for name, _ in lines)


def canonical_request(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    payload_sha256: str,
) -> tuple[str, str]:
    """The canonical request of ``method`` on the encoded ``path`` (as it is sent), and
    its signed header names. Every header in ``headers`` is signed."""
    lines, signed = canonical_headers(headers)
    text = "\n".join((method, path or "/", canonical_query(query), lines, signed, payload_sha256))
    return text, signed


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def signing_key(secret_access_key: str, date: str, region: str, service: str = "s3") -> bytes:
    key = ("AWS4" + secret_access_key).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


@dataclass(frozen=True)
class Signer:
    """Signs requests for one set of keys and one region."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str = "us-east-1"
    service: str = "s3"

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        payload_sha256: str = EMPTY_SHA256,
        now: datetime | None = None,
    ) -> dict[str, str]:
        """``headers`` plus ``Host``, ``x-amz-date``, ``x-amz-content-sha256`` and the
        ``Authorization`` that signs them all. ``path`` is the encoded path as sent."""
        when = (now or datetime.now(UTC)).astimezone(UTC)
        amz_date = when.strftime("%Y%m%dT%H%M%SZ")
        date = amz_date[:8]
        signed_headers = {
            **(headers or {}),
            "Host": host,
            "x-amz-content-sha256": payload_sha256,
            "x-amz-date": amz_date,
        }
        canonical, names = canonical_request(method, path, query, signed_headers, payload_sha256)
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        key = signing_key(self.secret_access_key, date, self.region, self.service)
        signature = hmac.new(
            key, string_to_sign(amz_date, scope, canonical).encode("utf-8"), hashlib.sha256
        ).hexdigest()
        signed_headers["Authorization"] = (
            f"{ALGORITHM} Credential={self.access_key_id}/{scope},SignedHeaders={names},Signature={signature}"
        )
        return signed_headers


# the client ---------------------------------------------------------------------------------------


class S3Error(Exception):
    """A request the store refused or that never got an answer (``status`` None)."""

    def __init__(self, operation: str, status: int | None, code: str, message: str = "") -> None:
        self.operation = operation
        self.status = status
        self.code = code
        self.message = message
        answer = f"{status} {code}" if status is not None else code
        super().__init__(f"{operation}: {answer}" + (f": {message}" if message else ""))

    @property
    def transient(self) -> bool:
        """Worth another try: no answer, a server error, throttling."""
        return self.status is None or self.status >= 500 or self.status == 429 or self.code in TRANSIENT_CODES


def error_of(operation: str, status: int, body: bytes) -> S3Error:
    """The S3 error of a refused request, from its XML body (``<Code>``, ``<Message>``);
    a body without them (HEAD has none) is named by its status."""
    text = body[:4096].decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]*)</Code>", text)
    message = re.search(r"<Message>([^<]*)</Message>", text)
    fallback = {403: "Forbidden", 404: "NotFound"}.get(status, "Error")
    return S3Error(
        operation,
        status,
        html.unescape(code.group(1)) if code else fallback,
        html.unescape(message.group(1)) if message else "",
    )


class S3Client:
    """One bucket of one S3-compatible service. Its HTTP session opens on the first
    request (in the running loop) and ends with ``close``."""

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        signer: Signer,
        *,
        attempts: int = 4,
        backoff: float = 0.25,
        timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint: {endpoint_url!r}")
        default_port = {"http": 80, "https": 443}[parts.scheme]
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        self.host = host if parts.port in (None, default_port) else f"{host}:{parts.port}"
        self.scheme = parts.scheme
        self.base_path = parts.path.rstrip("/")
        self.endpoint_url = endpoint_url.rstrip("/")
        self.bucket = bucket
        self.signer = signer
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def where(self, key: str = "") -> str:
        """The bucket (or an object) as a person reads it in a message."""
        return f"{self.endpoint_url}/{self.bucket}" + (f"/{key}" if key else "")

    async def head_bucket(self) -> None:
        """The bucket exists and these keys may use it, else ``S3Error`` (named by its
        status alone: an answer to HEAD has no body)."""
        await self._request("HEAD", "", operation=f"HEAD {self.where()}")

    async def check_bucket(self, prefix: str = "") -> None:
        """Like ``head_bucket``, but by listing at most one key under ``prefix``
        (ListObjectsV2), whose refusal names S3's error code (``NoSuchBucket``,
        ``InvalidAccessKeyId``, ``SignatureDoesNotMatch`` ...)."""
        query = (("list-type", "2"), ("max-keys", "1"), ("prefix", prefix))
        await self._request("GET", "", query=query, operation=f"GET {self.where()}")

    async def put_object(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        await self._request(
            "PUT", key, body=data, headers={"Content-Type": content_type}, operation=f"PUT {self.where(key)}"
        )

    async def get_object(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such key."""
        try:
            return await self._request("GET", key, operation=f"GET {self.where(key)}")
        except S3Error as exc:
            if exc.status == 404 and exc.code in ("NoSuchKey", "NotFound"):
                return None
            raise

    async def delete_object(self, key: str) -> None:
        """Delete ``key``; deleting a key that is not there succeeds too (as in S3)."""
        try:
            await self._request("DELETE", key, operation=f"DELETE {self.where(key)}", ok=(200, 204))
        except S3Error as exc:
            if not (exc.status == 404 and exc.code == "NoSuchKey"):
                raise

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _request(
        self,
        method: str,
        key: str,
        *,
        operation: str,
        query: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> bytes:
        """Send one request, signed afresh for each try; returns the answer's body."""
        path = uri_encode(f"{self.base_path}/{self.bucket}" + (f"/{key}" if key else ""), keep_slash=True)
        target = path + (f"?{canonical_query(query)}" if query else "")
        payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        for attempt in range(1, self.attempts + 1):
            signed = self.signer.sign(
                method, self.host, path, query=query, headers=headers, payload_sha256=payload
            )
            try:
                status, answer = await self._send(method, target, signed, body if method == "PUT" else None)
            except (OSError, TimeoutError, _client_errors()) as exc:
                error = S3Error(operation, None, "NoAnswer", str(exc) or type(exc).__name__)
            else:
                if status in ok:
                    return answer
                error = error_of(operation, status, answer)
            if not error.transient or attempt == self.attempts:
                raise error
            pause = self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            log.info("%s (try %d of %d); again in %.2fs", error, attempt, self.attempts, pause)
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def _send(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, bytes]:
        import aiohttp
        from yarl import URL

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=10),
                auto_decompress=False,
            )
        url = URL(f"{self.scheme}://{self.host}{target}", encoded=True)
        # a redirect (S3 answers a wrong region with 301) is reported, never followed unsigned
        request: dict[str, Any] = {"headers": headers, "allow_redirects": False}
        if body is not None:
            request["data"] = body
        async with self._session.request(method, url, **request) as response:
            return response.status, await response.read()


def _client_errors() -> type[Exception]:
    import aiohttp

    return aiohttp.ClientError
