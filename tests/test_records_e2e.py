"""End to end: the record trail of the real service into real sinks.

The service is built as twistd builds it (``Options`` then ``makeService``)
with every sink on: the JSON-lines file, Redis (the shared server at
127.0.0.1:6379, a unique stream key per test; the outage test runs a private
``redis-server`` and stops it mid-run) and the SQL store (sqlite in the temp
dir, or PostgreSQL at 127.0.0.1:5432 in a fresh schema). Known traffic goes
through it, the service is stopped (which flushes the sinks), and what each
sink holds is read back: the same records everywhere, with the right fields,
and no secret anywhere — nor in any log event or the daemon's log file.

Redis usage hashes sit beside the stream key (``usage_prefix``), which carries
a per-test tag; the shared server is used in database ``REDIS_DB``, not 0.
"""

from __future__ import annotations

import io
import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import openai
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent
from twisted.web import server

from oaproxy.generation import usage_prefix
from oaproxy.record import record_from_document
from oaproxy.sinks.redis import usage_date
from tests.doubles import capture_log, dechunk, run_cli
from tests.fakeupstream import FakeUpstream, RecordedRequest, Status, Stream
from tests.live import (
    SHARED_POSTGRES,
    SHARED_REDIS,
    PrivateRedis,
    ProxyCase,
    RawClient,
    RunningProxy,
    collect_stream,
    postgres_schema,
    reachable,
    reactor,
    redis_client,
    sql_rows,
    unavailable,
    wait_for,
)
from tests.payloads import (
    chat_payload,
    proxy_config,
    raw_chat_request,
    sse,
    sse_event,
    stream_chunk,
    upstream,
    usage_chunk,
)
from tests.records import read_json_lines

#: The shared server's database the tests write to (not the default 0).
REDIS_DB = 11

# The secrets: none of them may appear in any sink, log event or log file.
_SECRET = uuid.uuid4().hex[:12]
CLIENT_SECRET = f"sk-client-secret-alice-{_SECRET}"
OTHER_SECRET = f"sk-client-secret-bob-{_SECRET}"
WRONG_SECRET = f"sk-client-secret-wrong-{_SECRET}"
UPSTREAM_SK = f"sk-upstream-secret-main-{_SECRET}"
FAILING_SK = f"sk-upstream-secret-bad-{_SECRET}"
COOKIE_SECRET = f"cookie-secret-{_SECRET}"
API_KEY_SECRET = f"api-key-secret-{_SECRET}"
#: The private Redis's password (in the redis: URL), for the outage test.
REDIS_PASSWORD = f"redis-password-{_SECRET}"
SECRETS = (
    CLIENT_SECRET,
    OTHER_SECRET,
    WRONG_SECRET,
    UPSTREAM_SK,
    FAILING_SK,
    COOKIE_SECRET,
    API_KEY_SECRET,
)
#: In the uploaded audio: file contents are described, never stored.
AUDIO_MARKER = f"AUDIO-CONTENT-{_SECRET}".encode()

CHAT_USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
TOOL_USAGE = {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}
PRICE = {"input": 2.5, "output": 10.0}
TOOL_PRICE = {"input": 1.0, "output": 4.0}
CHAT_MESSAGES: list[Any] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Say hello."},
]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": {arg: {"type": "string"}}},
        },
    }
    for name, arg in (("get_weather", "city"), ("get_time", "tz"))
]
EXPECTED_TOOL_CALLS = [
    {
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    },
    {
        "id": "call_b",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz":"CET"}'},
    },
]


def cost(usage: dict[str, int], price: dict[str, float]) -> float:
    return (
        usage["prompt_tokens"] * price["input"] + usage["completion_tokens"] * price["output"]
    ) / 1e6


# -- the upstream -------------------------------------------------------------


def tool_call_events(model: str, include_usage: bool) -> list[bytes]:
    """A stream of two tool calls, each split over several chunks."""
    calls: list[dict[str, Any]] = [
        {
            "index": 0,
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": '{"city":'}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
        {
            "index": 1,
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz":'},
        },
        {"index": 1, "function": {"arguments": '"CET"}'}},
    ]
    chunk_id = "chatcmpl-tools"
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None}]
    deltas += [{"tool_calls": [call]} for call in calls]
    events = [sse_event(stream_chunk(0, delta, None, model, chunk_id)) for delta in deltas]
    events.append(sse_event(stream_chunk(0, {}, "tool_calls", model, chunk_id)))
    if include_usage:
        events.append(sse_event(usage_chunk(TOOL_USAGE, model, chunk_id)))
    events.append(sse("[DONE]"))
    return events


class ToolCallUpstream(FakeUpstream):
    """The fake upstream, streaming tool calls for one model (``tool_model``)."""

    tool_model = ""

    def _answer(
        self, request: server.Request, recorded: RecordedRequest, behaviour: Any
    ) -> bytes | int:
        try:
            asked = recorded.json()
        except ValueError:
            asked = None
        if (
            isinstance(asked, dict)
            and asked.get("model") == self.tool_model
            and asked.get("stream")
        ):
            options = asked.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            request.setHeader(b"content-type", b"text/event-stream")
            for event in tool_call_events(self.tool_model, include_usage):
                request.write(event)
            request.finish()
            return server.NOT_DONE_YET
        return super()._answer(request, recorded, behaviour)


# -- the service ---------------------------------------------------------------


class _Tee(io.StringIO):
    """stderr during a test: kept for the secrets grep, and passed on."""

    def __init__(self, through: Any) -> None:
        super().__init__()
        self._through = through

    def write(self, text: str) -> int:
        self._through.write(text)
        return super().write(text)


class RecordTrailBase(ProxyCase):
    """Starts the real service with every sink and reads the sinks back."""

    timeout = 120
    client_key = CLIENT_SECRET

    def setUp(self) -> None:
        if not reachable(*SHARED_REDIS):
            unavailable("Redis is not running at 127.0.0.1:6379")
        self.tag = uuid.uuid4().hex[:10]
        self.alice = f"alice-{self.tag}"
        self.bob = f"bob-{self.tag}"
        self.model = f"gpt-rec-{self.tag}"
        self.tool_model = f"gpt-tools-{self.tag}"
        self.fail_model = f"gpt-fail-{self.tag}"
        self.redis_key = f"oaproxy-test:{self.tag}:records"
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.jsonl = os.path.join(self.directory, "records.jsonl")
        self.spool_dir = os.path.join(self.directory, "spool")
        self.log_file = os.path.join(self.directory, "oaproxy.log")
        self.sqlite = os.path.join(self.directory, "db.sqlite")
        self.dbtype = "sqlite"
        self.dbaddr = self.sqlite
        self.events = capture_log(self)
        self.stderr = _Tee(sys.stderr)
        self.patch(sys, "stderr", self.stderr)

    # -- starting and driving -------------------------------------------------

    def config(self, upstreams: list[dict[str, Any]], redis_url: str, **top: Any) -> dict[str, Any]:
        more: dict[str, Any] = {
            "dbtype": self.dbtype,
            "dbaddr": self.dbaddr,
            "redis": redis_url,
            "log_file": self.log_file,
            "records": {
                "headers": True,
                "file": self.jsonl,
                "rotate": "1GB",
                "redis_key": self.redis_key,
                "spool_dir": self.spool_dir,
            },
            "prices": {self.model: PRICE, self.tool_model: TOOL_PRICE},
        }
        more.update(top)
        return proxy_config(
            "records-e2e", {self.alice: CLIENT_SECRET, self.bob: OTHER_SECRET}, upstreams, **more
        )

    async def start(self, config: dict[str, Any]) -> RunningProxy:
        return await self.start_proxy(config, os.path.join(self.directory, "config.yaml"))

    async def main_proxy(self) -> tuple[RunningProxy, ToolCallUpstream]:
        """The proxy in front of a working upstream and two failing ones."""
        main = ToolCallUpstream(reactor)
        main.tool_model = self.tool_model
        await self.start_fake(main)
        bad1 = await self.fake(default=Status(503, "first is overloaded"))
        bad2 = await self.fake(default=Status(500, "second broke"))
        upstreams = [
            upstream(
                "main",
                main.endpoint,
                UPSTREAM_SK,
                allow=[self.model, self.tool_model, "/v1/audio/transcriptions"],
            ),
            upstream("bad1", bad1.endpoint, FAILING_SK, allow=[self.fail_model]),
            upstream("bad2", bad2.endpoint, FAILING_SK, allow=[self.fail_model]),
        ]
        running = await self.start(
            self.config(upstreams, f"redis://127.0.0.1:{SHARED_REDIS[1]}/{REDIS_DB}")
        )
        self.addCleanup(self.clean_shared_redis, running)
        return running, main

    async def traffic(self, running: RunningProxy, main: FakeUpstream) -> dict[str, dict[str, Any]]:
        """The known requests, one after another; their records by name."""
        records: dict[str, dict[str, Any]] = {}
        count = 0

        async def recorded(name: str) -> None:
            nonlocal count
            count += 1
            records[name] = await running.records.nth(count)

        model = self.model
        completion = await self.sdk(
            running,
            lambda c: c.chat.completions.create(
                model=model,
                messages=CHAT_MESSAGES,
                extra_headers={
                    "api-key": API_KEY_SECRET,
                    "Cookie": f"session={COOKIE_SECRET}",
                    "X-Trace": "visible-header",
                },
            ),
        )
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        await recorded("chat")

        deltas, usages = await self.sdk(
            running, lambda c: collect_stream(c, model=model, messages=CHAT_MESSAGES)
        )
        self.assertEqual("".join(deltas), "Hello, world!")
        # Usage was asked of the upstream by oaproxy, for the record: hidden.
        self.assertEqual(usages, [])
        self.assertEqual(main.requests[-1].json()["stream_options"], {"include_usage": True})
        await recorded("stream")

        tool_model = self.tool_model

        def tool_stream(client: openai.OpenAI) -> tuple[dict[int, dict[str, str]], list[Any]]:
            calls: dict[int, dict[str, str]] = {}
            usages: list[Any] = []
            chunks: Any = client.chat.completions.create(
                model=tool_model,
                messages=[{"role": "user", "content": "Weather and time in Paris?"}],
                tools=TOOLS,
                stream=True,
            )
            for chunk in chunks:
                if chunk.usage is not None:
                    usages.append(chunk.usage)
                for choice in chunk.choices:
                    for delta in choice.delta.tool_calls or ():
                        call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                        if delta.function and delta.function.name:
                            call["name"] += delta.function.name
                        if delta.function and delta.function.arguments:
                            call["arguments"] += delta.function.arguments
            return calls, usages

        calls, usages = await self.sdk(running, tool_stream)
        self.assertEqual(
            calls,
            {
                0: {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                1: {"name": "get_time", "arguments": '{"tz":"CET"}'},
            },
        )
        self.assertEqual(usages, [])
        await recorded("tools")

        audio = b"RIFF\x00\x01\x02" + AUDIO_MARKER + bytes(range(256)) * 8
        transcription = await self.sdk(
            running,
            lambda c: c.audio.transcriptions.create(
                file=("a.wav", audio, "audio/wav"), model="whisper-1"
            ),
        )
        self.assertEqual(transcription.text, "transcribed")
        self.audio_size = len(audio)
        await recorded("multipart")

        fail_model = self.fail_model
        error: Any = await self.assertFailure(
            self.sdk(
                running,
                lambda c: c.chat.completions.create(model=fail_model, messages=CHAT_MESSAGES),
            ),
            openai.InternalServerError,
        )
        # Exhausted: the client gets the last upstream's own answer.
        self.assertEqual(error.status_code, 500)
        self.assertIn("second broke", str(error.message))
        await recorded("failed")

        wrong: Any = await self.assertFailure(
            self.sdk(
                running,
                lambda c: c.chat.completions.create(
                    model=model,
                    messages=CHAT_MESSAGES,
                    extra_headers={"Cookie": f"session={COOKIE_SECRET}"},
                ),
                key=WRONG_SECRET,
            ),
            openai.AuthenticationError,
        )
        self.assertEqual(wrong.status_code, 401)
        for secret in SECRETS:
            self.assertNotIn(secret, str(wrong.message))
            self.assertNotIn(secret, json.dumps(wrong.body))
        await recorded("unauthorized")

        main.script(Stream(chunks=("one ", "two ", "three"), hang_after=2))
        request = raw_chat_request(
            chat_payload(model, stream=True, messages=CHAT_MESSAGES), CLIENT_SECRET
        )
        # The role chunk and two content chunks, then the client hangs up.
        client = RawClient(request, events=3)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", running.port), client)
        await client.enough
        await client.hang_up()
        await recorded("abandoned")
        self.assertEqual(len(running.records.seen), 7)
        # What was relayed until the hang-up, as the client received it.
        _, _, chunked = client.received.partition(b"\r\n\r\n")
        self.abandoned_body, _ = dechunk(chunked)
        return records

    # -- reading the sinks back ------------------------------------------------

    async def read_redis(
        self, port: int, key: str, password: str | None = None
    ) -> list[dict[str, Any]]:
        client: Any = await redis_client(port, password)
        try:
            if port == SHARED_REDIS[1]:
                await client.execute_command("SELECT", REDIS_DB)
            entries: Any = await client.execute_command("XRANGE", key, "-", "+")
        finally:
            await client.disconnect()
        return [
            json.loads(dict(zip(fields[::2], fields[1::2], strict=True))["record"])
            for _, fields in entries
        ]

    async def redis_values(self, keys: Iterable[str]) -> list[str]:
        """Everything the shared Redis holds under these keys and the tag."""
        client: Any = await redis_client(SHARED_REDIS[1])
        texts: list[str] = []
        try:
            await client.execute_command("SELECT", REDIS_DB)
            tagged: Any = await client.execute_command("KEYS", f"*{self.tag}*")
            for key in sorted(set(keys) | set(tagged)):
                kind: Any = await client.execute_command("TYPE", key)
                texts.append(key)
                if kind == "stream":
                    value: Any = await client.execute_command("XRANGE", key, "-", "+")
                elif kind == "hash":
                    value = await client.execute_command("HGETALL", key)
                elif kind == "string":
                    value = await client.execute_command("GET", key)
                else:
                    value = kind
                texts.append(repr(value))
        finally:
            await client.disconnect()
        return texts

    async def usage_hash(self, kind: str, name: str, record: dict[str, Any]) -> dict[str, int]:
        client: Any = await redis_client(SHARED_REDIS[1])
        try:
            await client.execute_command("SELECT", REDIS_DB)
            flat: Any = await client.execute_command(
                "HGETALL",
                f"{usage_prefix(self.redis_key)}:{usage_date(record_from_document(record))}:{kind}:{name}",
            )
        finally:
            await client.disconnect()
        return {k: int(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}

    async def clean_shared_redis(self, running: RunningProxy) -> None:
        """Delete this test's keys: its stream and its usage hashes."""
        client: Any = await redis_client(SHARED_REDIS[1])
        try:
            await client.execute_command("SELECT", REDIS_DB)
            tagged: Any = await client.execute_command("KEYS", f"*{self.tag}*")
            if tagged:
                await client.execute_command("DEL", *tagged)
        finally:
            await client.disconnect()

    def read_sql(self) -> list[dict[str, Any]]:
        return sql_rows(self.dbtype, self.dbaddr, order_by="time, id")

    def spool_texts(self) -> list[tuple[str, str]]:
        texts = []
        for directory, _, names in os.walk(self.spool_dir):
            for name in names:
                with open(os.path.join(directory, name), "rb") as f:
                    texts.append((f"spool {name}", f.read().decode("utf-8", "replace")))
        return texts

    def log_texts(self) -> list[tuple[str, str]]:
        """Every log event of the test (formatted, and as a dict), the
        daemon's log file and stderr (where the sinks complain)."""
        texts = []
        for event in self.events:
            texts.append(("log event", formatEvent(event)))
            texts.append(("log event dict", repr(event)))
        with open(self.log_file, encoding="utf-8") as f:
            texts.append(("log file", f.read()))
        texts.append(("stderr", self.stderr.getvalue()))
        return texts

    def assert_no_secrets(self, texts: list[tuple[str, str]], secrets: Iterable[str]) -> None:
        self.assertGreater(len(texts), 0)
        for where, text in texts:
            for secret in secrets:
                at = text.find(secret)
                if at >= 0:
                    self.fail(
                        f"a secret ({secret[:12]}...) in the {where}: {text[max(0, at - 200) : at]!r}"
                    )

    # -- the checks ---------------------------------------------------------------

    def check_fields(self, records: dict[str, dict[str, Any]]) -> None:
        chat = records["chat"]
        for record in records.values():
            self.assertEqual(record["hostname"], "records-e2e")
            self.assertEqual(record["client_ip"], "127.0.0.1")
            self.assertEqual(len(record["id"]), 32)
            self.assertEqual(record["method"], "POST")
            self.assertGreaterEqual(record["duration"], 0)
        self.assertEqual(
            {
                k: chat[k]
                for k in ("key_name", "model", "stream", "status", "outcome", "upstream", "path")
            },
            {
                "key_name": self.alice,
                "model": self.model,
                "stream": False,
                "status": 200,
                "outcome": "ok",
                "upstream": "main",
                "path": "/v1/chat/completions",
            },
        )
        self.assertEqual(
            [(a["upstream"], a["status"], a["error"]) for a in chat["attempts"]],
            [("main", 200, None)],
        )
        self.assertEqual(chat["usage"], CHAT_USAGE)
        self.assertAlmostEqual(chat["cost"], cost(CHAT_USAGE, PRICE))
        self.assertEqual(chat["response_text"], "Hello, world!")
        self.assertEqual(chat["finish_reason"], "stop")
        self.assertEqual(json.loads(chat["request_body"])["messages"], CHAT_MESSAGES)
        self.assertTrue(chat["user_agent"].startswith("OpenAI/Python"))
        headers = chat["request_headers"]
        for name in ("authorization", "api-key", "cookie"):
            self.assertEqual(headers[name], "[redacted]", name)
        self.assertEqual(headers["x-trace"], "visible-header")
        self.assertEqual(chat["bytes_in"], len(chat["request_body"].encode()))
        self.assertGreater(chat["bytes_out"], 0)

        stream = records["stream"]
        self.assertEqual(
            (
                stream["key_name"],
                stream["model"],
                stream["stream"],
                stream["status"],
                stream["outcome"],
            ),
            (self.alice, self.model, True, 200, "ok"),
        )
        self.assertEqual(stream["usage"], CHAT_USAGE)
        self.assertAlmostEqual(stream["cost"], cost(CHAT_USAGE, PRICE))
        self.assertEqual(stream["response_text"], "Hello, world!")
        self.assertEqual(stream["finish_reason"], "stop")
        self.assertIsNotNone(stream["ttfb"])
        self.assertEqual([a["upstream"] for a in stream["attempts"]], ["main"])

        tools = records["tools"]
        self.assertEqual(
            (tools["model"], tools["stream"], tools["status"], tools["outcome"]),
            (self.tool_model, True, 200, "ok"),
        )
        self.assertEqual(tools["tool_calls"], EXPECTED_TOOL_CALLS)
        self.assertEqual(tools["finish_reason"], "tool_calls")
        self.assertIn(tools["response_text"], (None, ""))
        self.assertEqual(tools["usage"], TOOL_USAGE)
        self.assertAlmostEqual(tools["cost"], cost(TOOL_USAGE, TOOL_PRICE))

        multipart = records["multipart"]
        self.assertEqual(
            (multipart["path"], multipart["status"], multipart["outcome"]),
            ("/v1/audio/transcriptions", 200, "ok"),
        )
        self.assertEqual(multipart["key_name"], self.alice)
        # The model of a form comes from its model field; the answer's text is kept.
        self.assertEqual(multipart["model"], "whisper-1")
        self.assertIsInstance(multipart["response_text"], str)
        body = multipart["request_body"]
        self.assertEqual(body["content_type"], "multipart/form-data")
        self.assertEqual(body["size"], multipart["bytes_in"])
        fields = {field["name"]: field for field in body["fields"]}
        self.assertEqual(
            fields["file"],
            {
                "name": "file",
                "filename": "a.wav",
                "content_type": "audio/wav",
                "size": self.audio_size,
            },
        )
        self.assertEqual(fields["model"]["value"], "whisper-1")
        self.assertIsNone(multipart["usage"])
        self.assertIsNone(multipart["cost"])

        failed = records["failed"]
        self.assertEqual(
            (
                failed["key_name"],
                failed["model"],
                failed["status"],
                failed["outcome"],
                failed["upstream"],
            ),
            (self.alice, self.fail_model, 500, "exhausted", "bad2"),
        )
        self.assertEqual(
            [(a["upstream"], a["status"]) for a in failed["attempts"]],
            [("bad1", 503), ("bad2", 500)],
        )
        self.assertIsNone(failed["usage"])
        self.assertIsNone(failed["cost"])
        self.assertIn("second broke", failed["response_text"])

        unauthorized = records["unauthorized"]
        self.assertEqual(
            (
                unauthorized["key_name"],
                unauthorized["status"],
                unauthorized["outcome"],
                unauthorized["attempts"],
            ),
            (None, 401, "client_error", []),
        )
        # Refused before its body was parsed: no model, the body only described.
        self.assertIsNone(unauthorized["model"])
        self.assertNotIn(self.model, json.dumps(unauthorized["request_body"]))
        self.assertEqual(unauthorized["request_headers"]["cookie"], "[redacted]")
        self.assertEqual(unauthorized["request_headers"]["authorization"], "[redacted]")

        abandoned = records["abandoned"]
        self.assertEqual(
            (abandoned["key_name"], abandoned["stream"], abandoned["status"], abandoned["outcome"]),
            (self.alice, True, 200, "client_disconnected"),
        )
        self.assertEqual(abandoned["response_text"], "one two ")
        self.assertEqual(self.abandoned_body.count(b"data: "), 3)
        self.assertEqual(abandoned["bytes_out"], len(self.abandoned_body))
        self.assertIsNone(abandoned["usage"])
        self.assertEqual([a["upstream"] for a in abandoned["attempts"]], ["main"])

    def check_sql_columns(self, rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
        by_id = {record["id"]: record for record in records}
        for row in rows:
            record = by_id[row["id"]]
            self.assertEqual(json.loads(row["record"]), record)
            usage = record["usage"] or {}
            expected = {
                "key_name": record["key_name"],
                "model": record["model"],
                "stream": record["stream"],
                "status": record["status"],
                "outcome": record["outcome"],
                "upstream": record["upstream"],
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "total_tokens": usage.get("total_tokens"),
                "bytes_in": record["bytes_in"],
                "bytes_out": record["bytes_out"],
            }
            actual = {k: row[k] for k in expected}
            actual["stream"] = bool(actual["stream"])
            self.assertEqual(actual, expected)
            if record["cost"] is None:
                self.assertIsNone(row["cost"])
            else:
                self.assertAlmostEqual(row["cost"], record["cost"])

    # -- the tests ----------------------------------------------------------------

    async def check_record_trail(self) -> None:
        running, main = await self.main_proxy()
        records = await self.traffic(running, main)
        self.check_fields(records)
        service = running.service
        sinks = dict(service.sinks)
        self.assertEqual(set(sinks), {"sql", "file", "redis"})
        await service.stopService()
        for name, sink in sinks.items():
            self.assertEqual((name, sink.written, sink.dropped), (name, 7, 0))

        emitted = running.records.seen
        ids = {record["id"] for record in emitted}
        from_file = read_json_lines(self.jsonl)
        from_redis = await self.read_redis(SHARED_REDIS[1], self.redis_key)
        rows = self.read_sql()
        # Every sink holds every record once, as emitted.
        self.assertEqual(from_file, emitted)
        self.assertEqual(from_redis, emitted)
        self.assertEqual(sorted(row["id"] for row in rows), sorted(ids))
        self.check_sql_columns(rows, emitted)

        # Usage counters in Redis, per key and per model.
        chat_cost = round(cost(CHAT_USAGE, PRICE) * 1e6)
        self.assertEqual(
            await self.usage_hash("model", self.model, records["chat"]),
            # chat, stream, abandoned stream (the 401 was refused unread: no model)
            {
                "requests": 3,
                "prompt_tokens": 14,
                "completion_tokens": 8,
                "cost_microusd": 2 * chat_cost,
            },
        )
        self.assertEqual(
            await self.usage_hash("key", self.alice, records["chat"]),
            {
                "requests": 6,
                "prompt_tokens": 14 + 20,
                "completion_tokens": 8 + 9,
                "cost_microusd": 2 * chat_cost + round(cost(TOOL_USAGE, TOOL_PRICE) * 1e6),
            },
        )

        # The secrets grep, over every sink, the spool, the logs, stderr.
        with open(self.jsonl, encoding="utf-8") as f:
            texts = [("records file", f.read())]
        texts += [("redis", text) for text in await self.redis_values([self.redis_key])]
        texts += [("sql row", repr(row)) for row in rows]
        texts += [("record", json.dumps(record)) for record in emitted]
        texts += self.spool_texts() + self.log_texts()
        self.assertTrue(any("oaproxy started" in text for _, text in texts))
        self.assert_no_secrets(texts, (*SECRETS, AUDIO_MARKER.decode()))

    async def check_export_and_usage(self) -> None:
        running, main = await self.main_proxy()
        records = await self.traffic(running, main)
        await running.service.stopService()
        emitted = running.records.seen
        config = running.config_path

        status, out, err = run_cli("records", "export", "--config", config)
        self.assertEqual((status, err), (0, ""))
        exported = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(
            [r["id"] for r in exported],
            [r["id"] for r in sorted(emitted, key=lambda r: (r["time"], r["id"]))],
        )
        self.assertEqual(
            sorted(exported, key=lambda r: r["id"]), sorted(emitted, key=lambda r: r["id"])
        )

        status, out, err = run_cli(
            "records", "export", "--config", config, "--key", self.alice, "--model", self.model
        )
        self.assertEqual(status, 0)
        self.assertEqual(
            {json.loads(line)["id"] for line in out.splitlines()},
            {records[name]["id"] for name in ("chat", "stream", "abandoned")},
        )

        status, out, err = run_cli("records", "export", "--config", config, "--format", "chat")
        self.assertEqual(status, 0)
        items = json.loads(out)
        # The multipart upload has no chat messages, nor the 401 (refused
        # unread): left out, and said so.
        self.assertEqual(len(items), 5)
        self.assertIn("left out 2 records without chat messages", err)
        chat = items[0]
        self.assertEqual(chat["messages"], [{m["role"]: m["content"]} for m in CHAT_MESSAGES])
        self.assertEqual(
            (chat["model"], chat["assistant"], chat["ip"]),
            (self.model, "Hello, world!", "127.0.0.1"),
        )
        self.assertEqual(chat["temperature"], 1)
        [tools] = [item for item in items if item["model"] == self.tool_model]
        self.assertEqual(tools["tool_calls"], EXPECTED_TOOL_CALLS)
        self.assertTrue(tools["is_tool_calls"])
        self.assertEqual(tools["tools"], TOOLS)

        status, out, err = run_cli("usage", "--config", config, "--format", "json")
        self.assertEqual((status, err), (0, ""))
        chat_cost = cost(CHAT_USAGE, PRICE)
        expected = {
            (self.alice, self.model): (3, 3, 14, 8, 22, 2 * chat_cost),
            (self.alice, self.tool_model): (1, 1, 20, 9, 29, cost(TOOL_USAGE, TOOL_PRICE)),
            (self.alice, "whisper-1"): (1, 1, 0, 0, 0, None),  # the form's model field
            (self.alice, self.fail_model): (1, 0, 0, 0, 0, None),
            (None, None): (1, 0, 0, 0, 0, None),  # the 401, refused unread
        }
        got: dict[tuple[str | None, str | None], tuple[Any, ...]] = {}
        for row in json.loads(out):
            counts = (
                row["requests"],
                row["ok"],
                row["prompt_tokens"],
                row["completion_tokens"],
                row["total_tokens"],
            )
            got[(row["key"], row["model"])] = (*counts, row["cost"])
        self.assertEqual(set(got), set(expected))
        for group, numbers in expected.items():
            self.assertEqual(got[group][:5], numbers[:5], group)
            if numbers[5] is None:
                self.assertIsNone(got[group][5], group)
            else:
                self.assertAlmostEqual(got[group][5], numbers[5])

        status, out, err = run_cli("usage", "--config", config, "--by", "key")
        self.assertEqual((status, err), (0, ""))
        lines = [line.split() for line in out.splitlines()]
        self.assertEqual(
            lines[0],
            ["key", "requests", "ok", "prompt_tokens", "completion_tokens", "total_tokens", "cost"],
        )
        table = {line[0]: line[1:] for line in lines[1:]}
        alice_cost = 2 * chat_cost + cost(TOOL_USAGE, TOOL_PRICE)
        self.assertEqual(table[self.alice], ["6", "5", "34", "17", "51", f"{alice_cost:.4f}"])
        self.assertEqual(table["-"], ["1", "0", "0", "0", "0", "-"])
        self.assertEqual(table["total"], ["7", "5", "34", "17", "51", f"{alice_cost:.4f}"])


class SQLiteRecordTrailTests(RecordTrailBase):
    """Every sink on, the SQL store in sqlite."""

    def test_record_trail(self) -> Deferred[None]:
        """
        Non-stream, stream, tool-call stream, multipart, exhausted, 401 and an
        abandoned stream: the same records in the file, Redis and sqlite,
        with the right fields; no secret in any sink or log.
        """
        return Deferred.fromCoroutine(self.check_record_trail())

    def test_export_and_usage(self) -> Deferred[None]:
        """
        ``oaproxy records export`` and ``oaproxy usage`` over known traffic.
        """
        return Deferred.fromCoroutine(self.check_export_and_usage())


class PostgresRecordTrailTests(RecordTrailBase):
    """Every sink on, the SQL store in PostgreSQL (a fresh schema)."""

    def setUp(self) -> None:
        super().setUp()
        if not reachable(*SHARED_POSTGRES):
            unavailable("PostgreSQL is not running at 127.0.0.1:5432")
        self.dbtype = "postgres"
        self.dbaddr = postgres_schema(self, f"oaproxy_rec_{self.tag}")

    def test_record_trail(self) -> Deferred[None]:
        """
        As with sqlite: the same records in the file, Redis and PostgreSQL.
        """
        return Deferred.fromCoroutine(self.check_record_trail())

    def test_export_and_usage(self) -> Deferred[None]:
        """
        The CLI reads PostgreSQL (sums come back as NUMERIC) the same way.
        """
        return Deferred.fromCoroutine(self.check_export_and_usage())


# -- a sink outage under load -----------------------------------------------------


class SinkOutageTests(RecordTrailBase):
    def setUp(self) -> None:
        super().setUp()
        self.dbtype = "none"

    async def check_outage(self) -> None:
        # Keeps its data over the SIGKILL and restart, and has a password.
        server = PrivateRedis(
            os.path.join(self.directory, "redis"), password=REDIS_PASSWORD, persistent=True
        )
        self.addCleanup(server.kill)
        await server.start()
        main = await self.fake()
        config = self.config(
            [upstream("main", main.endpoint, UPSTREAM_SK, allow=[self.model])],
            f"redis://:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0",
        )
        config["records"]["queue_size"] = 4
        running = await self.start(config)
        sinks = dict(running.service.sinks)
        self.assertEqual(set(sinks), {"file", "redis"})
        redis_sink = sinks["redis"]
        await wait_for(
            lambda: redis_sink._factory is not None and redis_sink._factory.size > 0, timeout=10
        )

        import treq
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        body = chat_payload(self.model, messages=CHAT_MESSAGES)
        headers: dict[bytes | str, list[bytes | str]] = {
            "Authorization": [f"Bearer {CLIENT_SECRET}"]
        }
        url = running.base_url + "/chat/completions"

        async def one() -> tuple[int, Any]:
            response = await treq.post(url, json=body, headers=headers, pool=pool, reactor=reactor)
            return response.code, await response.json()

        total, down_at, up_at = 60, 15, 45
        answers: list[Deferred[tuple[int, Any]]] = []
        for n in range(total):
            if n == down_at:
                server.kill()
            if n == up_at:
                await server.start()
            answers.append(Deferred.fromCoroutine(one()))
            await deferLater(reactor, 0.06, lambda: None)
        results = await DeferredList(answers, fireOnOneErrback=True, consumeErrors=True)
        # The proxy's answers are not affected by the sink outage.
        for _, (code, answer) in results:
            self.assertEqual(code, 200)
            self.assertEqual(answer["choices"][0]["message"]["content"], "Hello, world!")
        self.assertEqual(len(running.records.seen), total)
        self.assertGreater(redis_sink.spilled, 0)
        self.assertGreater(redis_sink.failures, 0)
        await wait_for(lambda: redis_sink.written >= total, timeout=60)
        await running.service.stopService()
        await pool.closeCachedConnections()

        emitted_ids = [record["id"] for record in running.records.seen]
        stored = await self.read_redis(server.port, self.redis_key, REDIS_PASSWORD)
        self.assertEqual(Counter(record["id"] for record in stored), Counter(emitted_ids))
        self.assertEqual(sorted(r["id"] for r in read_json_lines(self.jsonl)), sorted(emitted_ids))
        self.assertEqual((redis_sink.dropped, sinks["file"].dropped), (0, 0))
        self.assertFalse(os.path.exists(os.path.join(self.spool_dir, "redis.jsonl")))
        with open(self.jsonl, encoding="utf-8") as f:
            texts = [("records file", f.read())]
        texts += [("redis", json.dumps(stored))]
        texts += self.spool_texts() + self.log_texts()
        # The sink said it spilled, and named neither the password nor a key.
        self.assertIn("oaproxy sink redis: queue full", self.stderr.getvalue())
        self.assert_no_secrets(texts, (*SECRETS, REDIS_PASSWORD))

    def test_redis_outage_under_load(self) -> Deferred[None]:
        """
        A steady request stream; the private Redis is killed for ~2 s in the
        middle and restarted on the same port: every answer is a 200, every
        record reaches Redis exactly once (spilled to the spool meanwhile),
        and the file has them all.
        """
        return Deferred.fromCoroutine(self.check_outage())


class UpstreamEchoTests(RecordTrailBase):
    """An upstream whose error body quotes the key it was sent."""

    def setUp(self) -> None:
        super().setUp()
        self.dbtype = "none"

    async def check_echoed_key(self) -> None:
        echo = await self.fake(
            default=Status(
                401,
                f"Incorrect API key provided: {UPSTREAM_SK}.",
                "invalid_request_error",
                "invalid_api_key",
            )
        )
        config = self.config(
            [upstream("echo", echo.endpoint, UPSTREAM_SK, allow=[self.model])],
            f"redis://127.0.0.1:{SHARED_REDIS[1]}/{REDIS_DB}",
        )
        running = await self.start(config)
        self.addCleanup(self.clean_shared_redis, running)
        model = self.model
        error: Any = await self.assertFailure(
            self.sdk(
                running, lambda c: c.chat.completions.create(model=model, messages=CHAT_MESSAGES)
            ),
            openai.AuthenticationError,
        )
        record = await running.records.nth(1)
        await running.service.stopService()
        self.assertEqual((record["status"], record["outcome"]), (401, "exhausted"))
        with open(self.jsonl, encoding="utf-8") as f:
            texts = [("records file", f.read())]
        texts += [("redis", json.dumps(await self.read_redis(SHARED_REDIS[1], self.redis_key)))]
        texts += self.log_texts()
        texts += [("answer to the client", json.dumps(error.body))]
        self.assert_no_secrets(texts, SECRETS)

    def test_upstream_key_echoed_in_an_error_body(self) -> Deferred[None]:
        """
        The upstream's 401 body names the upstream key in full (as some
        OpenAI-compatible servers do): neither the record nor the answer
        passed on to the client may carry it.
        """
        return Deferred.fromCoroutine(self.check_echoed_key())
