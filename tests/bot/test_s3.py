"""The S3 client (bot/s3.py): its Signature Version 4 checked against AWS's published
examples, and its requests against a fake S3-compatible server that checks every
signature (tests/fakes/s3_api.py)."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import pytest

from bot.s3 import EMPTY_SHA256, S3Client, S3Error, Signer, canonical_request, string_to_sign
from tests.fakes.s3_api import ACCESS_KEY_ID, SECRET_ACCESS_KEY, FakeS3

# The examples of "Signature Calculations for the Authorization Header: Transferring
# Payload in a Single Chunk (AWS Signature Version 4)" in the Amazon S3 API reference
# (https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html):
# their keys, time, region and bucket, and for each request the canonical request's
# SHA-256 (the last line of its string to sign) and the resulting signature.
AWS_SIGNER = Signer("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1")
AWS_TIME = datetime(2013, 5, 24, tzinfo=UTC)
AWS_HOST = "examplebucket.s3.amazonaws.com"
AWS_PUT_BODY = b"Welcome to Amazon S3."
AWS_EXAMPLES = {
    "GET Object": dict(
        method="GET",
        path="/test.txt",
        query=(),
        headers={"Range": "bytes=0-9"},
        payload=EMPTY_SHA256,
        canonical_sha256="7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972",
        signed="host;range;x-amz-content-sha256;x-amz-date",
        signature="f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
    ),
    "PUT Object": dict(
        method="PUT",
        path="/test%24file.text",  # the key test$file.text, encoded once
        query=(),
        headers={"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
        payload="44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
        canonical_sha256="9e0e90d9c76de8fa5b200d8c849cd5b8dc7a3be3951ddb7f6a76b4158342019d",
        signed="date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
        signature="98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    ),
    "GET Bucket Lifecycle": dict(
        method="GET",
        path="/",
        query=(("lifecycle", ""),),
        headers={},
        payload=EMPTY_SHA256,
        canonical_sha256="9766c798316ff2757b517bc739a67f6213b4ab36dd5da2f94eaebf79c77395ca",
        signed="host;x-amz-content-sha256;x-amz-date",
        signature="fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
    ),
    "Get Bucket (List Objects)": dict(
        method="GET",
        path="/",
        query=(("prefix", "J"), ("max-keys", "2")),  # out of order: the signer sorts them
        headers={},
        payload=EMPTY_SHA256,
        canonical_sha256="df57d21db20da04d7fa30298dd4488ba3a2b47ca3a489c74750e0f1e7df1b9b7",
        signed="host;x-amz-content-sha256;x-amz-date",
        signature="34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    ),
}
# the canonical request of "GET Object", as the page prints it
AWS_GET_CANONICAL = (
    "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
    "x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n"
    "x-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\n"
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
)


@pytest.mark.parametrize("name", list(AWS_EXAMPLES))
def test_signatures_match_the_aws_s3_examples(name: str) -> None:
    example = AWS_EXAMPLES[name]
    headers = AWS_SIGNER.sign(
        example["method"],
        AWS_HOST,
        example["path"],
        query=example["query"],
        headers=example["headers"],
        payload_sha256=example["payload"],
        now=AWS_TIME,
    )
    assert headers["x-amz-date"] == "20130524T000000Z"
    assert headers["x-amz-content-sha256"] == example["payload"]
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders={example['signed']},Signature={example['signature']}"
    )
    signed = {k: v for k, v in headers.items() if k != "Authorization"}
    canonical, _ = canonical_request(
        example["method"], example["path"], example["query"], signed, example["payload"]
    )
    last = string_to_sign("20130524T000000Z", "20130524/us-east-1/s3/aws4_request", canonical)
    assert last.splitlines()[-1] == example["canonical_sha256"]


def test_the_canonical_request_and_payload_hash_are_the_published_ones() -> None:
    example = AWS_EXAMPLES["GET Object"]
    headers = AWS_SIGNER.sign("GET", AWS_HOST, "/test.txt", headers=example["headers"], now=AWS_TIME)
    signed = {k: v for k, v in headers.items() if k != "Authorization"}
    assert canonical_request("GET", "/test.txt", (), signed, EMPTY_SHA256)[0] == AWS_GET_CANONICAL
    assert hashlib.sha256(AWS_PUT_BODY).hexdigest() == AWS_EXAMPLES["PUT Object"]["payload"]


def test_the_secret_is_never_shown() -> None:
    assert "wJalr" not in repr(AWS_SIGNER)


def client(s3: FakeS3, *, secret: str = SECRET_ACCESS_KEY, bucket: str = "atelier", **kwargs) -> S3Client:
    return S3Client(s3.endpoint_url, bucket, Signer(ACCESS_KEY_ID, secret), backoff=0.01, **kwargs)


async def test_put_get_delete_and_head_a_bucket() -> None:
    async with FakeS3() as s3:
        c = client(s3)
        try:
            await c.head_bucket()
            data = bytes(range(256)) * 40
            await c.put_object("images/2025-01-31/a b$c+d~e.png", data, "image/png")
            assert s3.objects[("atelier", "images/2025-01-31/a b$c+d~e.png")] == data
            assert s3.content_types[("atelier", "images/2025-01-31/a b$c+d~e.png")] == "image/png"
            assert await c.get_object("images/2025-01-31/a b$c+d~e.png") == data
            await c.delete_object("images/2025-01-31/a b$c+d~e.png")
            assert s3.objects == {}
            assert await c.get_object("images/2025-01-31/a b$c+d~e.png") is None
            await c.delete_object("images/never-there.png")  # as in S3: no error
        finally:
            await c.close()
    assert [r.status for r in s3.requests] == [200, 200, 200, 204, 404, 204]


async def test_an_endpoint_with_a_path_prefix_is_kept() -> None:
    async with FakeS3(buckets=("base",)) as s3:
        c = S3Client(s3.endpoint_url + "/", "base", Signer(ACCESS_KEY_ID, SECRET_ACCESS_KEY))
        try:
            await c.put_object("k", b"x")
            assert s3.objects[("base", "k")] == b"x"
        finally:
            await c.close()


async def test_a_wrong_secret_is_refused_once_naming_the_code() -> None:
    async with FakeS3() as s3:
        c = client(s3, secret="not the secret")
        try:
            with pytest.raises(S3Error) as info:
                await c.put_object("k", b"x")
        finally:
            await c.close()
    assert info.value.status == 403 and info.value.code == "SignatureDoesNotMatch"
    assert f"PUT {s3.endpoint_url}/atelier/k: 403 SignatureDoesNotMatch" in str(info.value)
    assert len(s3.requests) == 1 and not s3.objects  # a refusal is not tried again


async def test_a_missing_bucket_is_no_such_bucket() -> None:
    async with FakeS3() as s3:
        c = client(s3, bucket="elsewhere")
        try:
            with pytest.raises(S3Error) as head:
                await c.head_bucket()
            with pytest.raises(S3Error) as get:
                await c.get_object("k")  # a missing bucket is not a missing object
        finally:
            await c.close()
    assert (head.value.status, get.value.code) == (404, "NoSuchBucket")


async def test_transient_failures_are_tried_again_and_then_given_up() -> None:
    async with FakeS3() as s3:
        c = client(s3, attempts=4)
        try:
            s3.fail_next(2, 503)
            await c.put_object("k", b"once")
            s3.fail_next(1, 500)
            assert await c.get_object("k") == b"once"
            s3.fail_next(4, 500)
            with pytest.raises(S3Error) as info:
                await c.put_object("k2", b"never")
        finally:
            await c.close()
    assert [r.status for r in s3.of("PUT")] == [503, 503, 200, 500, 500, 500, 500]
    assert info.value.status == 500 and info.value.transient and ("atelier", "k2") not in s3.objects


async def test_no_answer_is_tried_again_then_named() -> None:
    async with FakeS3() as s3:
        endpoint = s3.endpoint_url
    c = S3Client(endpoint, "atelier", Signer(ACCESS_KEY_ID, SECRET_ACCESS_KEY), attempts=3, backoff=0.01)
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(S3Error) as info:
            await c.head_bucket()
    finally:
        await c.close()
    assert info.value.status is None and info.value.code == "NoAnswer"
    assert str(info.value).startswith(f"HEAD {endpoint}/atelier: NoAnswer")
    assert asyncio.get_running_loop().time() - started < 5


async def test_checking_a_bucket_names_what_the_service_said() -> None:
    async with FakeS3() as s3:
        s3.objects[("atelier", "images/a.png")] = b"a"
        good, wrong_secret, wrong_key, elsewhere = (
            client(s3),
            client(s3, secret="nope"),
            S3Client(s3.endpoint_url, "atelier", Signer("UNKNOWN", SECRET_ACCESS_KEY)),
            client(s3, bucket="elsewhere"),
        )
        codes = []
        try:
            await good.check_bucket("images/")
            for c in (wrong_secret, wrong_key, elsewhere):
                with pytest.raises(S3Error) as info:
                    await c.check_bucket("images/")
                codes.append((info.value.status, info.value.code))
        finally:
            for c in (good, wrong_secret, wrong_key, elsewhere):
                await c.close()
    assert codes == [(403, "SignatureDoesNotMatch"), (403, "InvalidAccessKeyId"), (404, "NoSuchBucket")]
    assert [r.status for r in s3.requests] == [200, 403, 403, 404]  # a refusal is final at once
