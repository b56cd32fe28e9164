"""The built-in echo upstream (``type: echo``): OpenAI's API answered in the
process, without network or key, for trying oaproxy out and for tests.

- ``POST /chat/completions``: the last user message's text back, verbatim
  (word by word when streaming, usage in the last chunk when asked), with
  the ``model`` as asked and ``system_fingerprint: "oaproxy-echo"``;
- ``POST /completions``: each prompt back;
- ``POST /embeddings``: for each input a unit vector drawn from the
  SHA-256 of its text (``dimensions`` of them, 256 by default), as floats
  or base64 (the SDK asks for base64);
- ``GET /models`` and ``/models/{id}``: the model ``echo``, or the one asked.

Usage counts words, not tokens. Anything else is a 404, so that a request
the echo upstream does not serve fails over to the next upstream.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import re
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from oaproxy.inspection import content_texts
from oaproxy.localresponse import (
    EVENT_STREAM,
    SSE_DONE,
    BadBody,
    LocalResponse,
    error_response,
    json_response,
    request_bytes,
    request_object,
    sse_data,
    too_large,
)

FINGERPRINT = "oaproxy-echo"
DEFAULT_DIMENSIONS = 256
MAX_DIMENSIONS = 3072
# Inputs times dimensions: what one request may make the reactor compute.
MAX_EMBEDDING_VALUES = 1 << 18

_PIECES = re.compile(r"\s*\S+")


def _words(text: str) -> int:
    return len(text.split())


def pieces(text: str) -> list[str]:
    """``text`` cut before each word, whitespace kept: joined, they are ``text``."""
    found = _PIECES.findall(text)
    tail = text[sum(len(piece) for piece in found) :]
    return [*found, tail] if tail else found


def embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector (float32 values) from the SHA-256 of ``text``."""
    seed = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    words: list[int] = []
    for block in itertools.count():
        if len(words) >= dimensions:
            break
        words.extend(
            struct.unpack("<8I", hashlib.sha256(seed + block.to_bytes(4, "little")).digest())
        )
    values = [word / 2**31 - 1.0 for word in words[:dimensions]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


@implementer(IAgent)
class EchoAgent:
    """An ``IAgent`` whose every answer is made here, at once."""

    def __init__(self, wall_clock: Callable[[], float]) -> None:
        self._wall_clock = wall_clock
        self._serial = itertools.count(1)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        path = urlsplit(uri).path.decode("utf-8", "replace").rstrip("/")
        refused = too_large(bodyProducer, "The echo upstream")
        if refused is not None:
            return succeed(refused)
        d = request_bytes(bodyProducer)
        return d.addCallback(lambda body: self._answer(method, path, body))

    def _answer(self, method: bytes, path: str, body: bytes) -> IResponse:
        try:
            if method == b"GET" and path == "/models":
                return json_response(200, {"object": "list", "data": [self._model("echo")]})
            if method == b"GET" and path.startswith("/models/"):
                return json_response(200, self._model(path[len("/models/") :]))
            if method == b"POST" and path in ("/chat/completions", "/completions", "/embeddings"):
                request = request_object(body)
                if path == "/chat/completions":
                    return self._chat(request)
                if path == "/completions":
                    return self._completion(request)
                return json_response(200, self._embeddings(request))
        except BadBody as e:
            return error_response(400, str(e))
        return error_response(
            404,
            f"The echo upstream does not serve {method.decode('ascii', 'replace')} {path}.",
            error_code="not_found",
        )

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "oaproxy"}

    def _head(self, kind: str, request: dict[str, Any]) -> dict[str, Any]:
        model = request.get("model")
        return {
            "id": f"{kind}-echo-{next(self._serial)}",
            "created": int(self._wall_clock()),
            "model": model if isinstance(model, str) else "echo",
            "system_fingerprint": FINGERPRINT,
        }

    def _chat(self, request: dict[str, Any]) -> IResponse:
        messages = request.get("messages")
        if not isinstance(messages, list):
            raise BadBody("'messages' must be a list of messages.")
        said = [m for m in messages if isinstance(m, dict)]
        users = [m for m in said if m.get("role") == "user"]
        answer = "".join(content_texts(users[-1].get("content"))) if users else ""
        prompt = sum(_words("".join(content_texts(m.get("content")))) for m in said)
        head = self._head("chatcmpl", request)
        if request.get("stream") is True:
            return self._stream(head, "chat.completion.chunk", request, answer, prompt, chat=True)
        return json_response(
            200,
            {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(prompt, _words(answer)),
            },
        )

    def _completion(self, request: dict[str, Any]) -> IResponse:
        prompts = _inputs(request.get("prompt"), "prompt")
        head = self._head("cmpl", request)
        prompt = sum(_words(text) for text in prompts)
        if request.get("stream") is True:
            text = prompts[0] if prompts else ""
            return self._stream(head, "text_completion", request, text, prompt, chat=False)
        return json_response(
            200,
            {
                **head,
                "object": "text_completion",
                "choices": [
                    {"index": i, "text": text, "logprobs": None, "finish_reason": "stop"}
                    for i, text in enumerate(prompts)
                ],
                "usage": _usage(prompt, prompt),
            },
        )

    def _stream(
        self,
        head: dict[str, Any],
        kind: str,
        request: dict[str, Any],
        text: str,
        prompt: int,
        *,
        chat: bool,
    ) -> IResponse:
        response = LocalResponse(200, EVENT_STREAM)

        def chunk(content: str | None, finish: str | None = None) -> None:
            if chat:
                delta: dict[str, Any] = {} if content is None else {"content": content}
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": content or ""}
            choice.update(logprobs=None, finish_reason=finish)
            response.write(sse_data({**head, "object": kind, "choices": [choice]}))

        if chat:
            response.write(
                sse_data(
                    {
                        **head,
                        "object": kind,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            )
        for piece in pieces(text):
            chunk(piece)
        chunk(None, "stop")
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            usage = _usage(prompt, _words(text))
            response.write(sse_data({**head, "object": kind, "choices": [], "usage": usage}))
        response.write(SSE_DONE)
        response.finish()
        return response

    def _embeddings(self, request: dict[str, Any]) -> dict[str, Any]:
        inputs = _inputs(request.get("input"), "input")
        dimensions = request.get("dimensions", DEFAULT_DIMENSIONS)
        if (
            not isinstance(dimensions, int)
            or isinstance(dimensions, bool)
            or not 1 <= dimensions <= MAX_DIMENSIONS
        ):
            raise BadBody(f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}.")
        if len(inputs) * dimensions > MAX_EMBEDDING_VALUES:
            raise BadBody(
                f"The echo upstream makes at most {MAX_EMBEDDING_VALUES} values per request."
            )
        as_base64 = request.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = embedding(text, dimensions)
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        model = request.get("model")
        tokens = sum(_words(text) for text in inputs)
        return {
            "object": "list",
            "data": data,
            "model": model if isinstance(model, str) else "echo",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _inputs(value: Any, name: str) -> list[str]:
    """A prompt or input as texts: a string, a list of strings, or tokens
    (a list of integers, or of lists of them), whose text is their JSON."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value):
            return [json.dumps(value)]
        if all(isinstance(item, (str, list)) for item in value):
            return [item if isinstance(item, str) else json.dumps(item) for item in value]
    raise BadBody(f"'{name}' must be a string or a list of strings or tokens.")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
