"""``type: replicate``: chat completions served by Replicate's predictions API,
as openai-api-route did, through an ``IAgent`` the forwarder calls like any
upstream's (so deadlines, failover and the stream relay work unchanged).

1. ``POST {endpoint}/models/{owner}/{name}/predictions`` (or, for a model
   ``owner/name:version``, ``POST {endpoint}/predictions`` with the version)
   creates the prediction (``oaproxy.replicate_format`` says with what).
2. A stream reads the prediction's ``urls.stream`` (SSE ``output``,
   ``done``, ``error``) and answers OpenAI's chunks, ending with
   ``[DONE]``; an error before the first output fails the attempt over.
3. Otherwise ``urls.get`` is polled on the reactor's clock, every 0.5 s at
   first and backing off to 2 s, until the prediction succeeded, failed or
   was canceled; the attempt's deadline covers it all.

Every call carries the Authorization the forwarder gives (``Bearer {sk}``).
A cancelled attempt (its deadline, or the client gone) cancels the
prediction through ``urls.cancel``. Replicate's errors become OpenAI's
(401, 404, 400, 429 with its Retry-After, 502 for 5xx and failed
predictions).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from oaproxy.config import Upstream
from oaproxy.credentials import Words, token_text
from oaproxy.inspection import json_object
from oaproxy.localresponse import (
    EVENT_STREAM,
    SSE_DONE,
    BadBody,
    LocalResponse,
    error_response,
    json_response,
    request_bytes,
    sse_data,
    too_large,
)
from oaproxy.relay import BytesProducer, UpstreamEndedEarly, describe, small_body
from oaproxy.replicate_format import (
    TERMINAL,
    ChatRequest,
    ModelRef,
    chunk,
    completion,
    creation,
    detail,
    mapped_error,
    parse_chat,
    prediction_failed,
    upstream_failed,
    usage,
)
from oaproxy.sse import EventTooLarge, SSESplitter, event_data

POLL_FIRST = 0.5
POLL_LONGEST = 2.0
# Polls that fail in a row (the connection, not Replicate's answer) before
# the attempt fails.
POLL_TRIES = 3
# Deadlines of the calls no attempt's deadline covers.
CANCEL_TIMEOUT = 10.0
USAGE_TIMEOUT = 5.0
# Replicate's JSON answers are small; anything this big is not one.
MAX_ANSWER = 16 * 1024 * 1024


class PredictionUnreachable(UpstreamEndedEarly):
    """Replicate could not be reached about a prediction it already has: the
    attempt fails, and is never retried as a new prediction."""


def _event_name(event: bytes) -> bytes:
    """An SSE event's ``event`` field (``message`` when it has none)."""
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip()
    return b"message"


@implementer(IAgent)
class ReplicateAgent:
    """One replicate upstream's agent, over ``http`` (the upstream pool)."""

    log = Logger()

    def __init__(
        self,
        upstream: Upstream,
        http: IAgent,
        clock: IReactorTime,
        wall_clock: Callable[[], float],
        *,
        max_event_bytes: int,
        words: Words,
    ) -> None:
        assert upstream.endpoint is not None
        self._endpoint = upstream.endpoint
        self._name = upstream.name
        self._http = http
        self._clock = clock
        self._wall_clock = wall_clock
        # Replicate's stream events, like an upstream's, are capped.
        self.max_event_bytes = max_event_bytes
        # What makes Replicate's texts about a failure fit for the log.
        self.words = words

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        authorization = (headers or Headers()).getRawHeaders(b"authorization")
        auth = authorization[0] if authorization else None
        path = uri[len(self._endpoint.encode("utf-8")) :].split(b"?", 1)[0].rstrip(b"/")
        return Deferred.fromCoroutine(self._serve(method, path, auth, bodyProducer))

    async def _serve(
        self, method: bytes, path: bytes, auth: bytes | None, body: IBodyProducer | None
    ) -> IResponse:
        if method != b"POST" or path != b"/chat/completions":
            return error_response(
                404,
                "A replicate upstream serves POST /v1/chat/completions only.",
                error_code="not_found",
            )
        refused = too_large(body, "A replicate upstream")
        if refused is not None:
            return refused
        try:
            chat = parse_chat(await request_bytes(body))
        except BadBody as e:
            return error_response(400, str(e))
        ref = ModelRef.parse(chat.model)
        if ref is None:
            return error_response(
                404,
                f"`{chat.model}` is not a Replicate model (owner/name or owner/name:version).",
                error_code="model_not_found",
            )
        url, payload = creation(self._endpoint, ref, chat)
        # Failures of this first call are the forwarder's to judge (a stale
        # pooled connection is retried once): nothing was created yet.
        code, headers, answer = await self._call(b"POST", url, auth, payload)
        if code not in (200, 201):
            return mapped_error(code, answer, headers)
        prediction = json_object(answer)
        urls = prediction.get("urls")
        if not isinstance(urls, dict):
            return upstream_failed("Replicate: the new prediction has no urls")
        if chat.stream:
            return await self._stream(prediction, urls, chat, auth)
        return await self._poll(prediction, urls, chat, auth)

    # -- non-stream: polling -------------------------------------------------------------

    async def _poll(
        self,
        prediction: dict[str, Any],
        urls: Mapping[str, Any],
        chat: ChatRequest,
        auth: bytes | None,
    ) -> IResponse:
        delay = POLL_FIRST
        failures = 0
        try:
            while prediction.get("status") not in TERMINAL:
                await deferLater(self._clock, delay, lambda: None)
                delay = min(delay * 2, POLL_LONGEST)
                try:
                    code, headers, answer = await self._call(b"GET", _url(urls, "get"), auth)
                except CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - a poll that failed is tried again
                    failures += 1
                    if failures >= POLL_TRIES:
                        raise PredictionUnreachable(f"Replicate: polling failed: {e}") from None
                    continue
                failures = 0
                if code != 200:
                    return mapped_error(code, answer, headers)
                prediction = json_object(answer)
        finally:
            if prediction.get("status") not in TERMINAL:
                self._cancel(urls, auth)
        if prediction.get("status") != "succeeded":
            return prediction_failed(prediction)
        return json_response(200, completion(prediction, chat.model, int(self._wall_clock())))

    # -- stream: the prediction's SSE, translated --------------------------------------

    async def _stream(
        self,
        prediction: dict[str, Any],
        urls: Mapping[str, Any],
        chat: ChatRequest,
        auth: bytes | None,
    ) -> IResponse:
        stream_url = urls.get("stream")
        if not isinstance(stream_url, str):
            self._cancel(urls, auth)
            return upstream_failed("Replicate: this model gives no stream")
        headers = _headers(auth, accept=EVENT_STREAM)
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        try:
            response = await self._http.request(b"GET", stream_url.encode(), headers, None)
        except CancelledError:
            self._cancel(urls, auth)
            raise
        except Exception as e:  # noqa: BLE001 - the prediction exists: never retried as new
            self._cancel(urls, auth)
            raise PredictionUnreachable(f"Replicate: the stream failed: {e}") from None
        if response.code != 200:
            self._cancel(urls, auth)
            return mapped_error(
                response.code, await small_body(response, MAX_ANSWER), response.headers
            )
        translator = _StreamTranslator(
            self, chat, str(prediction.get("id", "replicate")), urls, auth, int(self._wall_clock())
        )
        response.deliverBody(translator)
        return translator.answer

    async def stream_usage(
        self, urls: Mapping[str, Any], auth: bytes | None
    ) -> dict[str, int] | None:
        """The usage of a finished prediction, or None if it cannot be had soon."""
        try:
            call = Deferred.fromCoroutine(self._call(b"GET", _url(urls, "get"), auth))
            code, _, answer = await call.addTimeout(USAGE_TIMEOUT, self._clock)
        except CancelledError:
            raise
        except Exception:  # noqa: BLE001 - usage is worth a try, not a failed answer
            return None
        return usage(json_object(answer)) if code == 200 else None

    # -- calls ------------------------------------------------------------------------------

    async def _call(
        self, method: bytes, url: bytes, auth: bytes | None, payload: Any = None
    ) -> tuple[int, Headers, bytes]:
        headers = _headers(auth, accept=b"application/json")
        producer = None
        if payload is not None:
            headers.setRawHeaders(b"content-type", [b"application/json"])
            producer = BytesProducer(json.dumps(payload).encode("utf-8"))
        response = await self._http.request(method, url, headers, producer)
        return response.code, response.headers, await small_body(response, MAX_ANSWER)

    def _cancel(self, urls: Mapping[str, Any], auth: bytes | None) -> None:
        """Ask Replicate to stop the prediction, in the background."""
        url = urls.get("cancel")
        if not isinstance(url, str):
            return
        call = Deferred.fromCoroutine(self._call(b"POST", url.encode(), auth))
        call.addTimeout(CANCEL_TIMEOUT, self._clock)

        def failed(failure: Failure) -> None:
            self.log.warn(
                "upstream {upstream}: cancelling a prediction failed: {error}",
                upstream=self._name,
                error=describe(failure, self.words)[1],
            )

        call.addErrback(failed)


class _StreamTranslator(Protocol):
    """Reads a prediction's SSE and writes OpenAI's chunks to ``answer``."""

    def __init__(
        self,
        agent: ReplicateAgent,
        chat: ChatRequest,
        prediction_id: str,
        urls: Mapping[str, Any],
        auth: bytes | None,
        created: int,
    ) -> None:
        self.answer = LocalResponse(200, EVENT_STREAM, on_stop=self._reader_gone)
        self._agent = agent
        self._chat = chat
        self._id = prediction_id
        self._urls = urls
        self._auth = auth
        self._created = created
        self._splitter = SSESplitter(agent.max_event_bytes)
        self._spoke = False
        self._over = False

    def connectionMade(self) -> None:
        self.answer.behind = self.transport  # type: ignore[assignment]

    def _chunk(self, delta: Mapping[str, Any] | None, finish: str | None = None) -> None:
        payload = chunk(self._id, self._chat.model, self._created, delta, finish)
        self.answer.write(sse_data(payload))

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self._splitter.feed(data)
        except EventTooLarge as e:
            cast(IPushProducer, self.transport).stopProducing()
            self._end(f"Replicate: {e}")
            return
        for event in events:
            if self._over:
                return
            name, text = _event_name(event), event_data(event)
            if name == b"output" and text is not None:
                delta: dict[str, Any] = {"content": text.decode("utf-8", "replace")}
                if not self._spoke:
                    delta = {"role": "assistant", **delta}
                    self._spoke = True
                self._chunk(delta)
            elif name == b"error":
                # Replicate's words reach the client: the key it may quote
                # (the client's own, passed on as is) hidden.
                words = self._agent.words(
                    f"Replicate: {detail(text or b'')}", token_text(self._auth)
                )
                self._end(words)
            elif name == b"done":
                reason = json_object(text or b"{}").get("reason")
                if reason in ("error", "canceled"):
                    self._end(f"Replicate: the prediction ended: {reason}")
                else:
                    self._done()

    def _done(self) -> None:
        self._over = True
        self._chunk({} if self._spoke else {"role": "assistant", "content": ""}, "stop")
        if not self._chat.include_usage:
            self._close()
            return
        counted = Deferred.fromCoroutine(self._agent.stream_usage(self._urls, self._auth))

        def then(found: dict[str, int] | None) -> None:
            if found is not None:
                self.answer.write(
                    sse_data(
                        {**chunk(self._id, self._chat.model, self._created, None), "usage": found}
                    )
                )
            self._close()

        counted.addCallback(then)

    def _close(self) -> None:
        self.answer.write(SSE_DONE)
        self.answer.finish()

    def _end(self, why: str) -> None:
        self._over = True
        self.answer.fail(UpstreamEndedEarly(why))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._over:
            self._end("Replicate's stream ended before the prediction was done")

    def _reader_gone(self) -> None:
        if not self._over:
            self._over = True
            self._agent._cancel(self._urls, self._auth)


def _headers(auth: bytes | None, *, accept: bytes) -> Headers:
    headers = Headers({b"accept": [accept]})
    if auth is not None:
        headers.setRawHeaders(b"authorization", [auth])
    return headers


def _url(urls: Mapping[str, Any], name: str) -> bytes:
    url = urls.get(name)
    if not isinstance(url, str):
        raise PredictionUnreachable(f"Replicate: the prediction has no {name} url")
    return url.encode("utf-8")
