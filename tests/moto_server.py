"""moto's server mode as the local S3 and CloudFront: real boto3 clients talk HTTP to it, as they would to AWS.

One server per test process (the `moto` fixture); each test uses its own bucket or distribution,
so tests never see each other's objects. Credentials are dummies moto accepts; they are set in the
environment the way a user's deployment would set AWS's (boto3's default chain).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from moto.server import ThreadedMotoServer

from rollback.ports import free_port

REGION = "us-east-1"


@dataclass(frozen=True)
class Moto:
    endpoint_url: str

    def reset(self) -> None:
        httpx.post(f"{self.endpoint_url}/moto-api/reset", timeout=10).raise_for_status()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Moto]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield Moto(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture
def moto(moto_server: Moto, monkeypatch: pytest.MonkeyPatch) -> Moto:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", REGION)):
        monkeypatch.setenv(name, value)
    return moto_server
