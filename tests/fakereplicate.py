"""A fake Replicate predictions API on a real socket, scripted by the test.

``FakeReplicate.next`` says how the next prediction goes (``Prediction``):
what its creation answers, its output, whether it fails, and how its SSE
stream ends. Every request is recorded, as by ``FakeUpstream``.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.web import server
from twisted.web.resource import Resource

from tests.fakeupstream import ConnectionTracker, RecordedRequest


@frozen
class Prediction:
    """How the fake runs one prediction."""

    output: tuple[str, ...] = ("Hel", "lo", "!")
    # The status the creation answers with: "succeeded" (as with Replicate's
    # "Prefer: wait"), or "starting" for a prediction to poll.
    status: str = "succeeded"
    # Polls answered "processing" before the prediction is done.
    processing_polls: int = 0
    # A failed prediction's error.
    error: str | None = None
    # An SSE error event after this many outputs (None: none).
    stream_error_after: int | None = None
    # The creation's own status and body, for Replicate's errors.
    create_status: int = 201
    create_body: bytes | None = None
    create_headers: tuple[tuple[bytes, bytes], ...] = ()


class _Resource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeReplicate) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: server.Request) -> bytes | int:
        return self._fake._render(request)


class FakeReplicate:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.next = Prediction()
        self.requests: list[RecordedRequest] = []
        self._predictions: dict[str, Prediction] = {}
        self._polls: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._site = server.Site(_Resource(self))
        self._site.noisy = False
        self.connections = ConnectionTracker(self._site)
        self._port: Any = None

    async def start(self) -> FakeReplicate:
        self._port = await serverFromString(self.reactor, "tcp:0:interface=127.0.0.1").listen(
            self._site
        )
        return self

    def stop(self) -> Deferred[Any]:
        port, self._port = self._port, None

        async def stop() -> None:
            if port is not None:
                await port.stopListening()
            await self.connections.close_all()

        return Deferred.fromCoroutine(stop())

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}"

    @property
    def endpoint(self) -> str:
        return self.base + "/v1"

    def paths(self) -> list[tuple[bytes, bytes]]:
        return [(r.method, r.path) for r in self.requests]

    def _render(self, request: server.Request) -> bytes | int:
        assert request.content is not None
        recorded = RecordedRequest(
            request.method, request.uri, request.requestHeaders.copy(), request.content.read()
        )
        self.requests.append(recorded)
        path = request.path.decode()
        parts = path.strip("/").split("/")
        if request.method == b"POST" and path.endswith("/predictions"):
            return self._create(request)
        if request.method == b"POST" and path.endswith("/cancel"):
            return self._json(request, 200, {"id": parts[-2], "status": "canceled"})
        if request.method == b"GET" and parts[:2] == ["v1", "predictions"]:
            polled = self._polls[parts[2]] = self._polls.get(parts[2], 0) + 1
            done = polled > self._predictions[parts[2]].processing_polls
            return self._json(request, 200, self._state(parts[2], final=done))
        if request.method == b"GET" and parts[:1] == ["stream"]:
            return self._stream(request, parts[1])
        return self._json(request, 404, {"detail": "Not found."})

    def _json(self, request: server.Request, code: int, payload: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(payload).encode()

    def _create(self, request: server.Request) -> bytes:
        script = self.next
        if script.create_status >= 400:
            request.setResponseCode(script.create_status)
            for name, value in script.create_headers:
                request.setHeader(name, value)
            request.setHeader(b"content-type", b"application/json")
            return script.create_body or b'{"detail": "refused"}'
        prediction_id = f"p{next(self._ids)}"
        self._predictions[prediction_id] = script
        return self._json(request, script.create_status, self._state(prediction_id, final=False))

    def _state(self, prediction_id: str, *, final: bool) -> dict[str, Any]:
        script = self._predictions[prediction_id]
        if final:
            status = "failed" if script.status == "failed" else "succeeded"
        else:
            status = script.status if prediction_id not in self._polls else "processing"
        done = status in ("succeeded", "failed", "canceled")
        return {
            "id": prediction_id,
            "status": status,
            "output": list(script.output) if status == "succeeded" else None,
            "error": script.error if status == "failed" else None,
            "metrics": {"input_token_count": 9, "output_token_count": 3} if done else {},
            "urls": {
                "get": f"{self.endpoint}/predictions/{prediction_id}",
                "cancel": f"{self.endpoint}/predictions/{prediction_id}/cancel",
                "stream": f"{self.base}/stream/{prediction_id}",
            },
        }

    def _stream(self, request: server.Request, prediction_id: str) -> bytes:
        script = self._predictions[prediction_id]
        request.setHeader(b"content-type", b"text/event-stream")
        events = []
        for index, text in enumerate(script.output):
            if index == script.stream_error_after:
                break
            data = "\n".join(f"data: {line}" for line in text.split("\n"))
            events.append(f"event: output\nid: {prediction_id}:{index}\n{data}\n\n")
        if script.stream_error_after is not None:
            events.append('event: error\ndata: {"detail": "CUDA out of memory"}\n\n')
        else:
            events.append("event: done\ndata: {}\n\n")
        return "".join(events).encode()
