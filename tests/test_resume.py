"""Mid-stream resume (``oaproxy.resume``): a committed stream that breaks,
stalls or sends an error event is continued on the next candidate, by
prefill or restart, and the client's bytes form one well-formed stream.

Driven through the real resource tree with a ``Clock`` and recording agents
(``tests.doubles.Harness``): each test answers the upstreams by hand.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from oaproxy import resume
from oaproxy import sse as sse_module
from oaproxy.capture import StreamCapture
from oaproxy.config import ResumeMode
from oaproxy.record import FailureKind, Outcome, record_document, record_from_document
from oaproxy.resume import ResumeState, StreamFollower, StreamKind
from tests.doubles import AgentCall, FakeResponse, Harness, Reply, Scrape
from tests.payloads import chunk_data, compact, sse, usage_chunk

CONFIG = """
stream_idle_timeout: 20
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - name: b
    endpoint: "https://b.test/v1"
    sk: sk-b
    resume_body: {continue_final_message: true, add_generation_prompt: false}
  - {name: c, endpoint: "https://c.test/v1", sk: sk-c}
"""

ROLE = {"role": "assistant", "content": ""}


def chunk(delta: dict[str, Any], finish: str | None = None, chunk_id: str = "chatcmpl-a") -> bytes:
    return chunk_data(delta, finish, chunk_id=chunk_id)


def text(piece: str, chunk_id: str = "chatcmpl-a") -> bytes:
    return chunk({"content": piece}, chunk_id=chunk_id)


def events(reply: Reply) -> list[Any]:
    """The data of each event the client got (``[DONE]`` as text)."""
    out = []
    for event in reply.body.split(b"\n\n"):
        if not event or event.startswith(b":"):
            continue
        data = [line[6:] for line in event.split(b"\n") if line.startswith(b"data: ")]
        assert len(data) == 1, event
        out.append(data[0].decode() if data[0] == b"[DONE]" else json.loads(data[0]))
    return out


class ResumeCase(SynchronousTestCase):
    config = CONFIG

    def setUp(self) -> None:
        self.h = Harness(self.config)
        self.calls = self.h.agent.calls

    def stream(self, **extra: Any) -> Any:
        return self.h.chat(stream=True, extra=extra or None)

    def respond(self, call: AgentCall, *datas: bytes) -> FakeResponse:
        response = call.respond(200, b"text/event-stream")
        if datas:
            response.write(sse(*datas))
        return response

    def assertOneStream(self, reply: Reply, answer: str, finish: str = "stop") -> list[Any]:
        """The client's bytes are one well-formed stream of ``answer``: the
        first upstream's id, one role, the text in order, one finish,
        ``[DONE]`` last, no error."""
        self.assertEqual((reply.status, reply.complete), (200, True))
        got = events(reply)
        self.assertEqual(got[-1], "[DONE]")
        chunks = got[:-1]
        self.assertNotIn("error", json.dumps(chunks))
        self.assertEqual({c["id"] for c in chunks}, {"chatcmpl-a"})
        deltas = [choice["delta"] for c in chunks for choice in c["choices"]]
        self.assertEqual(sum("role" in d for d in deltas), 1)
        self.assertEqual("".join(d.get("content") or "" for d in deltas), answer)
        finishes = [
            ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]
        ]
        self.assertEqual(finishes, [finish])
        return chunks

    def attempts(self) -> list[tuple[str, FailureKind | None, str | None, int | None]]:
        [record] = self.h.records
        return [(a.upstream, a.failure, a.resumed, a.resumed_at) for a in record.attempts]


class PrefillTests(ResumeCase):
    def test_cut_stream_resumed_by_prefill(self) -> None:
        """A stream cut after three events goes on at b, which is sent the
        text so far as an assistant message plus its resume_body; the
        client's bytes are one stream whose text is the concatenation."""
        client = self.stream()
        a = self.respond(self.calls[0], chunk(ROLE), text("Hel"), text("lo"))
        self.assertEqual(len(self.calls), 1)
        a.fail()
        sent = self.calls[1].json()
        self.assertEqual(sent["messages"][-1], {"role": "assistant", "content": "Hello"})
        self.assertEqual(sent["messages"][:-1], self.calls[0].json()["messages"])
        self.assertEqual(
            (sent["continue_final_message"], sent["add_generation_prompt"]), (True, False)
        )
        b = self.respond(
            self.calls[1],
            chunk(ROLE, chunk_id="chatcmpl-b"),
            text(", world", "chatcmpl-b"),
            chunk({}, "stop", chunk_id="chatcmpl-b"),
            compact(usage_chunk({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})),
            b"[DONE]",
        )
        b.finish()
        reply = client.reply()
        self.assertOneStream(reply, "Hello, world")
        # The usage chunk oaproxy asked for is not the client's.
        self.assertNotIn(b'usage":{', reply.body)
        self.assertEqual(
            self.attempts(),
            [
                ("a", FailureKind.UPSTREAM_ENDED_EARLY, None, None),
                ("b", None, "prefill", 5),
            ],
        )
        [record] = self.h.records
        self.assertEqual(
            (record.outcome, record.upstream, record.response_text, record.finish_reason),
            (Outcome.OK, "b", "Hello, world", "stop"),
        )
        self.assertEqual(record.bytes_out, len(reply.body))

    def test_upstream_error_event_resumed(self) -> None:
        """An error event mid-stream is a break: not passed on, resumed at b."""
        client = self.stream()
        a = self.respond(self.calls[0], chunk(ROLE), text("Hel"))
        a.write(sse(compact({"error": {"message": "overloaded"}})))
        self.assertTrue(a.transport.stopped)
        b = self.respond(self.calls[1], text("lo"), chunk({}, "stop"), b"[DONE]")
        b.finish()
        self.assertOneStream(client.reply(), "Hello")
        self.assertEqual(self.attempts()[0][1], FailureKind.STREAM_ERROR)

    def test_two_breaks(self) -> None:
        """A second break resumes again, on the next candidate, with all the
        text so far."""
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("one ")).fail()
        self.respond(self.calls[1], chunk(ROLE), text("two ")).fail()
        sent = self.calls[2].json()
        self.assertEqual(sent["messages"][-1]["content"], "one two ")
        # c has no resume_body.
        self.assertNotIn("continue_final_message", sent)
        self.respond(self.calls[2], text("three"), chunk({}, "stop"), b"[DONE]").finish()
        self.assertOneStream(client.reply(), "one two three")
        self.assertEqual(
            [(name, how, at) for name, _, how, at in self.attempts()],
            [("a", None, None), ("b", "prefill", 4), ("c", "prefill", 8)],
        )

    def test_none_left_ends_with_error_event(self) -> None:
        """When no candidate continues the stream, it ends with the error
        event, naming the break and what the resumes met."""
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hel")).fail()
        self.calls[1].respond(500, body=b"{}")
        self.calls[2].respond(503, body=b"{}")
        reply = client.reply()
        self.assertEqual((reply.status, reply.complete), (200, True))
        last = events(reply)[-1]
        self.assertIn("upstream stream failed: ConnectionLost", last["error"]["message"])
        self.assertIn("resuming failed (b: ", last["error"]["message"])
        [record] = self.h.records
        self.assertEqual(record.outcome, Outcome.STREAM_FAILED)
        self.assertEqual(record.bytes_out, len(reply.body))

    def test_usage_summed(self) -> None:
        """A client that asked for usage gets one usage chunk: the sum of
        what every attempt reported."""
        client = self.stream(stream_options={"include_usage": True})
        usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
        self.respond(
            self.calls[0],
            chunk(ROLE),
            chunk_data({"content": "Hi"}, chunk_id="chatcmpl-a", usage=usage),
        ).fail()
        final = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        self.respond(
            self.calls[1],
            text(" there", "chatcmpl-b"),
            chunk({}, "stop", chunk_id="chatcmpl-b"),
            compact(usage_chunk(final, chunk_id="chatcmpl-b")),
            b"[DONE]",
        ).finish()
        chunks = self.assertOneStream(client.reply(), "Hi there")
        self.assertEqual(
            chunks[-1]["usage"], {"prompt_tokens": 22, "completion_tokens": 5, "total_tokens": 27}
        )
        [record] = self.h.records
        self.assertEqual(record.usage.total_tokens if record.usage else None, 27)

    def test_stall_resumed_after_idle_timeout(self) -> None:
        """Silence for stream_idle_timeout after the commit is a stall (a
        keep-alive comment is no progress): resumed at b."""
        client = self.stream()
        a = self.respond(self.calls[0], chunk(ROLE), text("Hel"))
        self.h.clock.advance(10)
        a.write(b": keep-alive\n\n")
        self.h.clock.advance(9.9)
        self.assertEqual(len(self.calls), 1)
        self.h.clock.advance(0.1)
        self.assertTrue(a.transport.stopped)
        self.assertEqual(self.calls[1].json()["messages"][-1]["content"], "Hel")
        self.respond(self.calls[1], text("lo"), chunk({}, "stop"), b"[DONE]").finish()
        self.assertOneStream(client.reply(), "Hello")
        self.assertEqual(self.attempts()[0][1], FailureKind.STREAM_IDLE)

    def test_break_after_done_is_a_clean_end(self) -> None:
        """[DONE] ends the stream even without a finish chunk: a cut after
        it is no break (nothing resumed, no error event)."""
        client = self.stream()
        a = self.respond(self.calls[0], chunk(ROLE), text("Hello"), b"[DONE]")
        a.fail()
        self.assertEqual(len(self.calls), 1)
        reply = client.reply()
        self.assertEqual((reply.status, reply.complete), (200, True))
        got = events(reply)
        self.assertEqual(got[-1], "[DONE]")
        self.assertEqual("".join(c["choices"][0]["delta"]["content"] for c in got[:-1]), "Hello")
        [record] = self.h.records
        self.assertEqual(record.outcome, Outcome.OK)

    def test_stall_after_done_is_a_clean_end(self) -> None:
        """An upstream silent after [DONE] is let go at stream_idle_timeout
        without a resume or an error event."""
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hello"), b"[DONE]")
        self.h.clock.advance(20)
        self.assertEqual(len(self.calls), 1)
        reply = client.reply()
        self.assertEqual((reply.complete, events(reply)[-1]), (True, "[DONE]"))
        [record] = self.h.records
        self.assertEqual(record.outcome, Outcome.OK)

    def test_many_pieces_prefilled_whole(self) -> None:
        """The text of many deltas (kept in joined runs) is prefilled whole
        and in order."""
        client = self.stream()
        pieces = [f"{n} " for n in range(200)]
        self.respond(self.calls[0], chunk(ROLE), *(text(p) for p in pieces)).fail()
        self.assertEqual(self.calls[1].json()["messages"][-1]["content"], "".join(pieces))
        self.respond(self.calls[1], text("end"), chunk({}, "stop"), b"[DONE]").finish()
        self.assertOneStream(client.reply(), "".join(pieces) + "end")

    def test_text_past_the_cap_not_resumed(self) -> None:
        """A stream whose text passed MAX_FOLLOWED_TEXT is not followed
        further nor resumed: its break ends it with the error event."""
        self.patch(resume, "MAX_FOLLOWED_TEXT", 8)
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hello"), text(" world"), text("!")).fail()
        self.assertEqual(len(self.calls), 1)
        got = events(client.reply())
        self.assertIn("upstream stream failed", got[-1]["error"]["message"])
        # What came after the cap was not read.
        state = self.h.exchanges[0].resume
        assert state is not None
        self.assertEqual((state.kept, state.text), (11, "Hello world"))

    def test_resume_waits_for_its_first_event(self) -> None:
        """A continuation that sends nothing within stream_timeout is left
        for the next candidate, as a first attempt would be."""
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hel")).fail()
        b = self.respond(self.calls[1])
        self.h.clock.advance(10)
        self.assertTrue(b.transport.stopped)
        self.respond(self.calls[2], text("lo"), chunk({}, "stop"), b"[DONE]").finish()
        self.assertOneStream(client.reply(), "Hello")
        self.assertEqual(self.attempts()[1][1], FailureKind.TIMEOUT)


class RestartTests(ResumeCase):
    def test_refused_prefill_restarts(self) -> None:
        """A 400 to the prefill is tried once more on the same candidate as
        a restart: the original request, the text already sent skipped."""
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hel"), text("lo")).fail()
        self.calls[1].respond(400, body=b'{"error": {"message": "no assistant prefill"}}')
        restart = self.calls[2]
        self.assertEqual(restart.host, "b")
        self.assertEqual(restart.json(), self.calls[0].json())
        self.respond(
            restart,
            chunk(ROLE, chunk_id="chatcmpl-b"),
            text("He", "chatcmpl-b"),
            text("llo, w", "chatcmpl-b"),
            text("orld", "chatcmpl-b"),
            chunk({}, "stop", chunk_id="chatcmpl-b"),
            b"[DONE]",
        ).finish()
        reply = client.reply()
        self.assertOneStream(reply, "Hello, world")
        self.assertNotIn(b"no assistant prefill", reply.body)
        self.assertEqual(
            [(name, how) for name, _, how, _ in self.attempts()],
            [("a", None), ("b", "prefill"), ("b", "restart")],
        )

    def test_diverging_restart_ends_with_error(self) -> None:
        """A restart whose answer is not the text already sent ends the
        stream with an error event, never a spliced answer."""
        self.h = Harness(CONFIG.replace("sk: sk-b\n", "sk: sk-b\n    resume: restart\n"))
        self.calls = self.h.agent.calls
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hello")).fail()
        self.assertEqual(self.calls[1].json(), self.calls[0].json())
        b = self.respond(self.calls[1], chunk(ROLE), text("Hi"))
        self.assertTrue(b.transport.stopped)
        self.assertEqual(len(self.calls), 2)
        reply = client.reply()
        got = events(reply)
        self.assertEqual(
            "".join(c["choices"][0]["delta"].get("content", "") for c in got[:-1]), "Hello"
        )
        self.assertIn("differs from the text already sent", got[-1]["error"]["message"])
        [record] = self.h.records
        self.assertEqual(record.outcome, Outcome.STREAM_FAILED)
        self.assertEqual(record.attempts[1].failure, FailureKind.DIVERGED)

    def test_restart_done_before_the_prefix_diverges(self) -> None:
        """A restart that sends [DONE] before saying what the client has is
        no whole answer: the stream ends with the error event."""
        self.h = Harness(CONFIG.replace("sk: sk-b\n", "sk: sk-b\n    resume: restart\n"))
        self.calls = self.h.agent.calls
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hello")).fail()
        self.respond(self.calls[1], chunk(ROLE), text("Hel"), b"[DONE]").finish()
        got = events(client.reply())
        self.assertIn("differs from the text already sent", got[-1]["error"]["message"])
        self.assertNotIn("[DONE]", got)

    def test_refusals_spaced_and_named(self) -> None:
        """A refused prefill's restart and the retry without stream_options
        are attempts on the same upstream like a retry: no more than two a
        second; when all are refused, the error event names their statuses."""
        self.h = Harness(
            CONFIG.replace('  - {name: c, endpoint: "https://c.test/v1", sk: sk-c}\n', "")
        )
        self.calls = self.h.agent.calls
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hel")).fail()
        self.calls[1].respond(400, body=b'{"error": {"message": "no prefill"}}')
        self.calls[2].respond(400, body=b'{"error": {"message": "bad"}}')
        self.assertEqual([c.host for c in self.calls], ["a", "b", "b"])
        self.h.clock.advance(0.99)
        self.assertEqual(len(self.calls), 3)
        self.h.clock.advance(0.01)
        self.assertEqual([c.host for c in self.calls], ["a", "b", "b", "b"])
        self.assertIn("stream_options", self.calls[2].json())
        self.assertNotIn("stream_options", self.calls[3].json())
        self.calls[3].respond(400, body=b'{"error": {"message": "bad"}}')
        message = events(client.reply())[-1]["error"]["message"]
        self.assertIn("resuming failed (b: status 400; b: status 400; b: status 400)", message)

    def test_tool_calls_resume_by_restart(self) -> None:
        """A stream that carried tool-call deltas resumes by restart even
        where prefill is the choice: the call's id and name come once, its
        arguments are skipped as far as the client has them."""
        client = self.stream()
        head = {"index": 0, "id": "call_a", "type": "function"}
        self.respond(
            self.calls[0],
            chunk(
                {
                    "role": "assistant",
                    "tool_calls": [{**head, "function": {"name": "f", "arguments": ""}}],
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        ).fail()
        self.assertEqual(self.calls[1].json(), self.calls[0].json())
        again = {"index": 0, "id": "call_b", "type": "function"}
        self.respond(
            self.calls[1],
            chunk(
                {
                    "role": "assistant",
                    "tool_calls": [{**again, "function": {"name": "f", "arguments": ""}}],
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}),
            chunk({}, "tool_calls"),
            b"[DONE]",
        ).finish()
        chunks = self.assertOneStream(client.reply(), "", finish="tool_calls")
        calls = [
            call
            for c in chunks
            for ch in c["choices"]
            for call in ch["delta"].get("tool_calls", [])
        ]
        self.assertEqual([call.get("id") for call in calls if "id" in call], ["call_a"])
        arguments = "".join(call.get("function", {}).get("arguments", "") for call in calls)
        self.assertEqual(json.loads(arguments), {"city": "Paris"})
        self.assertEqual(self.attempts()[1][2], "restart")

    def test_restart_skips_reasoning(self) -> None:
        """A restart skips the reasoning the client has (vLLM's
        reasoning_content, OpenRouter's reasoning) as it skips the text."""
        self.h = Harness(CONFIG.replace("sk: sk-b\n", "sk: sk-b\n    resume: restart\n"))
        self.calls = self.h.agent.calls
        client = self.stream()
        self.respond(
            self.calls[0],
            chunk(ROLE),
            chunk({"reasoning_content": "think.", "reasoning": "think."}),
            text("Hel"),
        ).fail()
        self.respond(
            self.calls[1],
            chunk(ROLE),
            chunk({"reasoning_content": "thi", "reasoning": "thi"}),
            chunk({"reasoning_content": "nk.", "reasoning": "nk."}),
            text("Hello"),
            chunk({}, "stop"),
            b"[DONE]",
        ).finish()
        chunks = self.assertOneStream(client.reply(), "Hello")
        deltas = [ch["delta"] for c in chunks for ch in c["choices"]]
        for name in ("reasoning_content", "reasoning"):
            self.assertEqual("".join(d.get(name) or "" for d in deltas), "think.")

    def test_break_in_reasoning_restarts(self) -> None:
        """A stream that broke in its reasoning, before any text, resumes by
        restart: a prefill carries the answer's text, not its reasoning."""
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), chunk({"reasoning_content": "Hm"})).fail()
        self.assertEqual(self.calls[1].json(), self.calls[0].json())
        self.respond(
            self.calls[1],
            chunk({"reasoning_content": "Hm."}),
            text("Hi"),
            chunk({}, "stop"),
            b"[DONE]",
        ).finish()
        chunks = self.assertOneStream(client.reply(), "Hi")
        reasoning = [ch["delta"].get("reasoning_content") for c in chunks for ch in c["choices"]]
        self.assertEqual("".join(r or "" for r in reasoning), "Hm.")
        self.assertEqual(self.attempts()[1][2], "restart")

    def test_untracked_delta_not_resumed(self) -> None:
        """A stream whose deltas carried a member resume does not follow
        (audio) is not resumed: a continuation would repeat or lose it."""
        client = self.stream()
        self.respond(
            self.calls[0],
            chunk({**ROLE, "audio": None}),
            chunk({"audio": {"id": "audio_1", "data": "UklG"}}),
            text("Hel"),
        ).fail()
        self.assertEqual(len(self.calls), 1)
        got = events(client.reply())
        self.assertIn("upstream stream failed", got[-1]["error"]["message"])

    def test_several_choices_not_resumed(self) -> None:
        """A request for several choices (n > 1) is not resumed, even when
        the break came before any choice but the first was seen."""
        client = self.stream(n=2)
        self.respond(self.calls[0], chunk(ROLE), text("Hel")).fail()
        self.assertEqual(len(self.calls), 1)
        got = events(client.reply())
        self.assertIn("upstream stream failed", got[-1]["error"]["message"])

    def test_resume_off_is_skipped(self) -> None:
        """A candidate with resume: off does not continue a stream; the
        next one does."""
        self.h = Harness(CONFIG.replace("sk: sk-b\n", "sk: sk-b\n    resume: off\n"))
        self.calls = self.h.agent.calls
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hel")).fail()
        self.assertEqual(self.calls[1].host, "c")
        self.respond(self.calls[1], text("lo"), chunk({}, "stop"), b"[DONE]").finish()
        self.assertOneStream(client.reply(), "Hello")


class CompletionsTests(ResumeCase):
    def test_completion_prompt_prefilled(self) -> None:
        """A completions stream resumes with the text appended to its prompt."""
        body = compact({"model": "gpt-4o-mini", "prompt": "Say hi:", "stream": True})
        client = self.h.request(
            b"POST",
            b"/v1/completions",
            body,
            [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer sk-client")],
        )

        def piece(value: str, finish: str | None = None) -> bytes:
            return compact(
                {
                    "id": "cmpl-a",
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": value, "finish_reason": finish}],
                }
            )

        self.respond(self.calls[0], piece(" Hel")).fail()
        self.assertEqual(self.calls[1].json()["prompt"], "Say hi: Hel")
        self.respond(self.calls[1], piece("lo"), piece("", "stop"), b"[DONE]").finish()
        got = events(client.reply())
        self.assertEqual("".join(c["choices"][0]["text"] for c in got[:-1]), " Hello")
        self.assertEqual({c["id"] for c in got[:-1]}, {"cmpl-a"})


class ResumeMetricsTests(ResumeCase):
    def test_resumes_counted(self) -> None:
        """oaproxy_stream_resumes_total counts each continuation by
        upstream, how and result."""
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hel")).fail()
        self.calls[1].respond(422, body=b"{}")
        self.respond(self.calls[2], text("Hello"), chunk({}, "stop"), b"[DONE]").finish()
        self.assertOneStream(client.reply(), "Hello")
        scrape = Scrape(generate_latest(self.h.shared.metrics.registry).decode())
        self.assertEqual(
            scrape.value(
                "oaproxy_stream_resumes_total", upstream="b", how="prefill", result="refused"
            ),
            1.0,
        )
        self.assertEqual(
            scrape.value("oaproxy_stream_resumes_total", upstream="b", how="restart", result="ok"),
            1.0,
        )


class StoredFormTests(ResumeCase):
    def test_attempts_keep_resume_fields(self) -> None:
        """The stored form keeps ``resumed`` and ``resumed_at`` (only where
        set) and reads them back."""
        client = self.stream()
        self.respond(self.calls[0], chunk(ROLE), text("Hel")).fail()
        self.respond(self.calls[1], text("lo"), chunk({}, "stop"), b"[DONE]").finish()
        client.reply()
        [record] = self.h.records
        document = record_document(record)
        self.assertNotIn("resumed", document["attempts"][0])
        self.assertEqual(
            (document["attempts"][1]["resumed"], document["attempts"][1]["resumed_at"]),
            ("prefill", 3),
        )
        again = record_from_document(json.loads(json.dumps(document)))
        self.assertEqual(
            [(a.resumed, a.resumed_at) for a in again.attempts], [(None, None), ("prefill", 3)]
        )


class FollowerParseTests(SynchronousTestCase):
    """What following costs an event: on a first attempt, nothing more than
    the record's capture pays."""

    def follow(self, how: ResumeMode | None) -> tuple[list[Any], list[Any]]:
        """Feed one tool-call chunk and one text chunk through a follower,
        then the record's capture; the parses made, and what the follower
        passed on."""
        parses: list[Any] = []
        real = sse_module.event_json

        def counted(data: bytes | str) -> Any:
            parses.append(data)
            return real(data)

        self.patch(sse_module, "event_json", counted)
        state = ResumeState(StreamKind.CHAT, continuable=lambda state: True)
        state.tool_heads.add(0)
        follower = StreamFollower(state, how)
        record = StreamCapture(1000)
        calls = [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]
        passed = []
        for delta in ({"role": "assistant", "tool_calls": calls}, {"content": "Hi"}):
            data = chunk_data(delta, usage=None)
            followed = follower.rewrite(b"data: " + data + b"\n\n", data)
            assert followed is not None
            passed.append(json.loads(followed[1]))
            record.feed(followed[1])
            # The parse the follower read (and the capture after it) is unchanged.
            self.assertEqual(sse_module.parse_event(followed[1]), json.loads(followed[1]))
        self.assertEqual(record.result().text, "Hi")
        return parses, passed

    def test_first_attempt_shares_the_records_parse(self) -> None:
        """A first attempt's follower reads each event from the parse the
        record's capture reads too, and passes it on as it came."""
        parses, passed = self.follow(None)
        self.assertEqual(len(parses), 2)
        self.assertEqual(passed[0]["choices"][0]["delta"]["role"], "assistant")

    def test_continuation_parses_what_it_rewrites(self) -> None:
        """A continuation rewrites a parse of its own (no second role, no
        second tool call head); the capture parses the rewritten event."""
        parses, passed = self.follow(ResumeMode.PREFILL)
        # The capture's parses, of the rewritten events (the follower's own
        # are not shared, so not counted here).
        self.assertEqual(len(parses), 2)
        self.assertNotIn(b'"role"', b"".join(parses))
        self.assertEqual(
            passed[0]["choices"][0]["delta"],
            {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
        )
