"""Talking to ``/admin/`` from a test: JSON in and out over a real socket,
and the configs the admin tests share."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

from attrs import frozen
from cryptography.fernet import Fernet
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers

from tests.live import reactor, read_body

ADMIN_KEY = "adm-0123456789abcdef"
#: One store key for every test: a Fernet key, as the config wants.
STORE_KEY = Fernet.generate_key().decode("ascii")


@frozen
class Answer:
    status: int
    body: Any  # the JSON, or the text when it is not JSON
    headers: Headers

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.body["error"]
        return error


class AdminClient:
    """Requests to one daemon's ``/admin/`` with a bearer key."""

    def __init__(self, port: int, key: str | None = ADMIN_KEY) -> None:
        self.base = f"http://127.0.0.1:{port}/admin"
        self.key = key
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
    ) -> Answer:
        """``method`` on ``/admin`` + ``path`` with ``body`` as JSON (or ``raw``)."""
        headers = Headers({b"content-type": [b"application/json"]})
        if self.key is not None:
            headers.setRawHeaders(b"authorization", [b"Bearer " + self.key.encode()])
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        producer: Any = None if data is None else FileBodyProducer(BytesIO(data))
        response = await self.agent.request(
            method.encode(), (self.base + path).encode(), headers, producer
        )
        text = await read_body(response)
        try:
            value = json.loads(text)
        except ValueError:
            value = text.decode("utf-8", "replace")
        return Answer(response.code, value, response.headers)

    async def get(self, path: str) -> Any:
        answer = await self.call("GET", path)
        assert answer.status == 200, (answer.status, answer.body)
        return answer.body

    async def upstream(self, name: str) -> dict[str, Any] | None:
        """The upstream of that name as ``GET /admin/upstreams`` lists it."""
        listed = await self.get("/upstreams")
        return next((u for u in listed["data"] if u["name"] == name), None)
