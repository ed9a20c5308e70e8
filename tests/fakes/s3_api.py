"""A fake S3-compatible object store on 127.0.0.1 for the real S3 client (bot/s3.py).

Buckets are addressed path-style (``/<bucket>/<key>``): HEAD a bucket; PUT, GET, HEAD
and DELETE an object; objects live in memory. Every request must carry a valid AWS
Signature Version 4 ``Authorization`` header: the fake computes it again from what it
received (its own implementation of the algorithm, independent of the client's), and
answers as S3 does, in XML: 403 ``InvalidAccessKeyId`` or ``SignatureDoesNotMatch``,
400 ``XAmzContentSHA256Mismatch`` when the body is not what was signed, 404
``NoSuchBucket`` / ``NoSuchKey``. It records every request, and can be told to fail the
next N requests (500, or 503 ``SlowDown``) to show the client tries again.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, unquote
from xml.sax.saxutils import escape

from aiohttp import web

from tests.fakes.serving import serve

ACCESS_KEY_ID = "ATELIERTESTKEY"
SECRET_ACCESS_KEY = "atelier/test+secret"
SKEW_SECONDS = 15 * 60  # S3 refuses a request signed further from its clock than this


@dataclass(frozen=True)
class Request:
    method: str
    bucket: str
    key: str
    status: int
    size: int  # bytes of the request's body
    content_type: str | None


@dataclass
class Failure:
    status: int
    code: str


class FakeS3:
    """``async with FakeS3() as s3:`` -> ``s3.endpoint_url``; ``s3.objects[(bucket, key)]``."""

    def __init__(
        self,
        *,
        buckets: tuple[str, ...] = ("atelier",),
        keys: dict[str, str] | None = None,
        region: str = "us-east-1",
    ) -> None:
        self.buckets = set(buckets)
        self.keys = dict(keys or {ACCESS_KEY_ID: SECRET_ACCESS_KEY})
        self.region = region
        self.objects: dict[tuple[str, str], bytes] = {}
        self.content_types: dict[tuple[str, str], str] = {}
        self.requests: list[Request] = []
        self._failures: list[Failure] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> FakeS3:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what tests do -------------------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 503) -> None:
        """The next ``count`` requests fail with ``status`` (503: ``SlowDown``)."""
        code = "SlowDown" if status == 503 else "InternalError"
        self._failures.extend(Failure(status, code) for _ in range(count))

    def of(self, method: str, status: int | None = None) -> list[Request]:
        return [r for r in self.requests if r.method == method and (status is None or r.status == status)]

    # -- the API -------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path.split("?", 1)[0].lstrip("/")
        bucket, _, key = (unquote(part) for part in raw.partition("/"))
        body = await request.read()
        response = self._answer(request, bucket, key, body)
        self.requests.append(
            Request(
                request.method, bucket, key, response.status, len(body), request.headers.get("Content-Type")
            )
        )
        return response

    def _answer(self, request: web.Request, bucket: str, key: str, body: bytes) -> web.Response:
        head = request.method == "HEAD"
        if self._failures:
            failure = self._failures.pop(0)
            return _error(failure.status, failure.code, "the fake was told to fail", head=head)
        refused = self._check_signature(request, body)
        if refused is not None:
            return _error(*refused, head=head)
        if bucket not in self.buckets:
            return _error(404, "NoSuchBucket", "The specified bucket does not exist", head=head)
        if not key:
            if head:
                return web.Response(status=200)
            if request.method == "GET" and request.query.get("list-type") == "2":
                return self._list(
                    bucket, request.query.get("prefix", ""), int(request.query.get("max-keys", 1000))
                )
            return _error(405, "MethodNotAllowed", "only HEAD and ListObjectsV2 are served on a bucket")
        where = (bucket, key)
        if request.method == "PUT":
            self.objects[where] = body
            self.content_types[where] = request.headers.get("Content-Type", "binary/octet-stream")
            return web.Response(status=200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        if request.method == "DELETE":
            self.objects.pop(where, None)
            self.content_types.pop(where, None)
            return web.Response(status=204)
        if request.method in ("GET", "HEAD"):
            if where not in self.objects:
                return _error(404, "NoSuchKey", "The specified key does not exist.", head=head)
            data = self.objects[where]
            content_type = self.content_types[where]
            if head:
                return web.Response(status=200, headers={"Content-Length": str(len(data))})
            return web.Response(status=200, body=data, content_type=content_type)
        return _error(405, "MethodNotAllowed", f"{request.method} is not served here")

    def _list(self, bucket: str, prefix: str, max_keys: int) -> web.Response:
        """ListObjectsV2: the first ``max_keys`` keys under ``prefix``, in order."""
        keys = sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix))
        shown = keys[:max_keys]
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><Size>{len(self.objects[(bucket, k)])}</Size></Contents>"
            for k in shown
        )
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult>'
            f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(shown)}</KeyCount>"
            f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{str(len(keys) > max_keys).lower()}</IsTruncated>"
            f"{contents}</ListBucketResult>"
        )
        return web.Response(status=200, body=xml.encode(), content_type="application/xml")

    def _check_signature(self, request: web.Request, body: bytes) -> tuple[int, str, str] | None:
        """None when the request is signed right, else (status, code, message)."""
        header = request.headers.get("Authorization", "")
        fields = _auth_fields(header)
        if fields is None:
            return 403, "AccessDenied", "Access Denied"
        credential, signed_names, signature = fields
        access_key, date, region, service, terminal = (credential.split("/") + [""] * 5)[:5]
        if access_key not in self.keys:
            return (
                403,
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
            )
        if (region, service, terminal) != (self.region, "s3", "aws4_request"):
            return (
                400,
                "AuthorizationHeaderMalformed",
                f"the region {region!r} is wrong; expecting {self.region!r}",
            )
        amz_date = request.headers.get("x-amz-date", "")
        try:
            when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return 403, "AccessDenied", "x-amz-date is missing or malformed"
        if abs((datetime.now(UTC) - when).total_seconds()) > SKEW_SECONDS or amz_date[:8] != date:
            return (
                403,
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
            )
        payload = request.headers.get("x-amz-content-sha256", "")
        if payload != "UNSIGNED-PAYLOAD" and payload != hashlib.sha256(body).hexdigest():
            return (
                400,
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )
        names = signed_names.split(";")
        if "host" not in names or "x-amz-date" not in names:
            return 403, "AccessDenied", "host and x-amz-date must be signed"
        headers = "".join(
            f"{name}:{' '.join(','.join(request.headers.getall(name, [])).split())}\n" for name in names
        )
        path = quote(unquote(request.raw_path.split("?", 1)[0]), safe="/")
        query = "&".join(
            f"{quote(k, safe='')}={quote(v, safe='')}"
            for k, v in sorted(parse_qsl(request.query_string, keep_blank_values=True))
        )
        canonical = f"{request.method}\n{path}\n{query}\n{headers}\n{signed_names}\n{payload}"
        to_sign = "\n".join(
            ("AWS4-HMAC-SHA256", amz_date, "/".join((date, region, service, terminal)),
             hashlib.sha256(canonical.encode()).hexdigest())
        )  # fmt: skip
        key = ("AWS4" + self.keys[access_key]).encode()
        for part in (date, region, service, terminal):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return (
                403,
                "SignatureDoesNotMatch",
                (
                    "The request signature we calculated does not match the signature you provided. "
                    "Check your key and signing method."
                ),
            )
        return None


def _auth_fields(header: str) -> tuple[str, str, str] | None:
    """Credential, SignedHeaders and Signature of a SigV4 Authorization header."""
    algorithm, _, rest = header.partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        return None
    fields = dict(part.strip().partition("=")[::2] for part in rest.split(","))
    try:
        return fields["Credential"], fields["SignedHeaders"], fields["Signature"]
    except KeyError:
        return None


def _error(status: int, code: str, message: str, *, head: bool = False) -> web.Response:
    if head:  # a HEAD answer has no body: only the status tells
        return web.Response(status=status)
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fake</RequestId></Error>"
    )
    return web.Response(status=status, body=xml.encode(), content_type="application/xml")
