"""OpenAI's chat completions in Replicate's terms and back, as plain data:
the prompt (Mistral's instruction template), the prediction's input, the
answer and its chunks, and Replicate's errors as OpenAI's.

``oaproxy.replicate`` does the HTTP; nothing here does any I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.web.http_headers import Headers

from oaproxy.inspection import content_texts
from oaproxy.localresponse import BadBody, LocalResponse, error_response, request_object

# A prediction's states that do not change any more.
TERMINAL = frozenset({"succeeded", "failed", "canceled"})

# Replicate's messages are passed on; a page of HTML is not.
_MAX_MESSAGE = 500

_MODEL = re.compile(r"(?P<owner>[\w.-]+)/(?P<name>[\w.-]+)(?::(?P<version>[\w.-]+))?\Z")

# OpenAI's request field -> the prediction input's (their meaning is alike).
_INPUT_FIELDS = (
    ("max_tokens", "max_new_tokens"),
    ("max_completion_tokens", "max_new_tokens"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
)


@frozen
class ModelRef:
    """A Replicate model: ``owner/name``, or a version of it (``owner/name:version``)."""

    owner: str
    name: str
    version: str | None

    @classmethod
    def parse(cls, model: str) -> ModelRef | None:
        match = _MODEL.match(model)
        if match is None:
            return None
        return cls(match["owner"], match["name"], match["version"])


@frozen
class ChatRequest:
    """What a chat completion request asks, as far as Replicate can do it."""

    model: str
    stream: bool
    include_usage: bool
    input: Mapping[str, Any]


def mistral_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The conversation in Mistral's instruction template:
    ``<s>[INST] user [/INST] answer</s>[INST] next [/INST]``. System text is
    folded into the first user turn; other roles count as the user's."""
    system: list[str] = []
    turns: list[tuple[str, str | None]] = []
    asked: list[str] = []
    for message in messages:
        role, text = message.get("role"), "".join(content_texts(message.get("content")))
        if role in ("system", "developer"):
            system.append(text)
        elif role == "assistant":
            turns.append(("\n".join(asked), text))
            asked = []
        else:
            asked.append(text)
    if asked or not turns:
        turns.append(("\n".join(asked), None))
    if system:
        first, answer = turns[0]
        turns[0] = ("\n".join(system) + ("\n\n" + first if first else ""), answer)
    prompt = "<s>"
    for instruction, answer in turns:
        prompt += f"[INST] {instruction} [/INST]"
        if answer is not None:
            prompt += f" {answer}</s>"
    return prompt


def parse_chat(body: bytes) -> ChatRequest:
    request = request_object(body)
    model, messages = request.get("model"), request.get("messages")
    if not isinstance(model, str):
        raise BadBody("'model' must be a string.")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadBody("'messages' must be a list of messages.")
    values: dict[str, Any] = {
        # Without it Replicate's Mistral models wrap the prompt in the
        # template again.
        "prompt": mistral_prompt(messages),
        "prompt_template": "{prompt}",
    }
    for ours, theirs in _INPUT_FIELDS:
        value = request.get(ours)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[theirs] = value
    stop = request.get("stop")
    if isinstance(stop, str):
        values["stop_sequences"] = stop
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and stop:
        values["stop_sequences"] = ",".join(stop)
    options = request.get("stream_options")
    return ChatRequest(
        model=model,
        stream=request.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        input=values,
    )


def creation(endpoint: str, ref: ModelRef, chat: ChatRequest) -> tuple[bytes, dict[str, Any]]:
    """Where a prediction of ``chat`` is created, and with what."""
    payload: dict[str, Any] = {"stream": chat.stream, "input": dict(chat.input)}
    if ref.version is not None:
        payload["version"] = ref.version
        return f"{endpoint}/predictions".encode(), payload
    return f"{endpoint}/models/{ref.owner}/{ref.name}/predictions".encode(), payload


def output_text(prediction: Mapping[str, Any]) -> str:
    output = prediction.get("output")
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(part for part in output if isinstance(part, str))
    return ""


def usage(prediction: Mapping[str, Any]) -> dict[str, int] | None:
    """OpenAI's usage from a prediction's metrics, if it has them."""
    metrics = prediction.get("metrics")
    if not isinstance(metrics, dict):
        return None
    prompt, completion = metrics.get("input_token_count"), metrics.get("output_token_count")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion(prediction: Mapping[str, Any], model: str, created: int) -> dict[str, Any]:
    """A succeeded prediction as a chat completion."""
    answer: dict[str, Any] = {
        "id": f"chatcmpl-{prediction.get('id', 'replicate')}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": output_text(prediction)},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }
    counted = usage(prediction)
    if counted is not None:
        answer["usage"] = counted
    return answer


def chunk(
    prediction_id: str,
    model: str,
    created: int,
    delta: Mapping[str, Any] | None,
    finish: str | None = None,
) -> dict[str, Any]:
    """One chunk of a streamed chat completion (no choice when ``delta`` is None)."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish}]
    )
    return {
        "id": f"chatcmpl-{prediction_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }


def detail(body: bytes) -> str:
    """What an error body of Replicate's says, short."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    text = None
    if isinstance(document, dict):
        text = document.get("detail") or document.get("title") or document.get("error")
    elif isinstance(document, str):
        text = document
    if not isinstance(text, str):
        text = body.decode("utf-8", "replace").strip() or "no detail"
    return text[:_MAX_MESSAGE]


def mapped_error(status: int, body: bytes, headers: Headers) -> LocalResponse:
    """Replicate's error answer as OpenAI's, with the status that makes
    failover and the SDK's exception classes work."""
    message = f"Replicate: {detail(body)}"
    if status in (401, 403):
        return error_response(401, message, error_code="invalid_api_key")
    if status == 404:
        return error_response(404, message, error_code="model_not_found")
    if status in (402, 429):
        # 402 is Replicate's "out of credit": OpenAI's insufficient_quota.
        kept = Headers()
        retry_after = headers.getRawHeaders(b"retry-after")
        if retry_after:
            kept.setRawHeaders(b"retry-after", retry_after[:1])
        code = "insufficient_quota" if status == 402 else "rate_limit_exceeded"
        return error_response(429, message, type="rate_limit_error", error_code=code, headers=kept)
    if status >= 500:
        return upstream_failed(message)
    return error_response(400, message)


def upstream_failed(message: str) -> LocalResponse:
    """502: Replicate failed (a failed prediction, its 5xx)."""
    return error_response(502, message, type="upstream_error", error_code="upstream_unavailable")


def prediction_failed(prediction: Mapping[str, Any]) -> LocalResponse:
    """502 for a prediction that failed or was canceled."""
    message = f"Replicate: the prediction {prediction.get('status')}"
    error = prediction.get("error")
    if isinstance(error, str) and error:
        message += f": {error}"
    return upstream_failed(message[:_MAX_MESSAGE])
