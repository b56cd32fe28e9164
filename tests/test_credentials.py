"""oaproxy.credentials: the one bearer parser, and secrets kept out of what
oaproxy writes (records, answers, alerts, error messages)."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from oaproxy.credentials import (
    REDACTED,
    Redactor,
    bearer_token,
    config_secrets,
    hide_key_shapes,
    redact_headers,
)
from tests.doubles import Harness, make_config
from tests.payloads import CHAT_ANSWER

CONFIG = """
authorization: {alice: ck-alice-0123456789, guest: guest}
metrics_key: metrics-key-0123
notify:
  feishu: {webhook: "https://open.feishu.cn/hook/x", secret: feishu-secret-0123}
  matrix: {homeserver: "https://m.example", access_token: matrix-token-0123, room_id: "!r:m"}
upstreams:
  - endpoint: https://a.example/v1
    sk: sk-upstream-0123456789
  - endpoint: https://b.example/v1
    sk: asis
    authorization: {bob: ck-bob-0123456789}
"""


class BearerTokenTests(SynchronousTestCase):
    def test_token(self) -> None:
        """The token follows "Bearer"; spaces around it are not part of it."""
        self.assertEqual(bearer_token(b"Bearer sk-1"), b"sk-1")
        self.assertEqual(bearer_token(b"Bearer   sk-1  "), b"sk-1")

    def test_no_space_needed(self) -> None:
        """As openai-api-route reads it, "Bearersk-1" is the token sk-1."""
        self.assertEqual(bearer_token(b"Bearersk-1"), b"sk-1")

    def test_empty_token(self) -> None:
        """A bare "Bearer" is a bearer with an empty token (a wrong key, not
        a missing header)."""
        self.assertEqual(bearer_token(b"Bearer"), b"")
        self.assertEqual(bearer_token(b"Bearer   "), b"")

    def test_not_a_bearer(self) -> None:
        """Other schemes, the wrong case, or no header at all are no bearer."""
        for value in (None, b"", b"Basic eA==", b"bearer sk-1", b" Bearer sk-1", b"sk-1"):
            self.assertIsNone(bearer_token(value), value)


class RedactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = make_config(CONFIG)
        self.redact = Redactor(config_secrets(self.config))

    def test_every_configured_secret(self) -> None:
        """Client keys, upstream keys, the admin and metrics keys, and the
        alert channels' secrets are the config's secrets."""
        self.assertEqual(
            sorted(config_secrets(self.config)),
            sorted(
                [
                    "ck-alice-0123456789",
                    "guest",
                    "ck-bob-0123456789",
                    "sk-upstream-0123456789",
                    "metrics-key-0123",
                    "feishu-secret-0123",
                    "matrix-token-0123",
                ]
            ),
        )

    def test_replaced_in_nested_values(self) -> None:
        """Every string inside a JSON value is redacted; other values stay."""
        value = {
            "text": "Incorrect API key provided: sk-upstream-0123456789.",
            "attempts": [{"error": "bad ck-bob-0123456789 and matrix-token-0123"}, {"status": 200}],
            "count": 3,
        }
        self.assertEqual(
            self.redact(value),
            {
                "text": f"Incorrect API key provided: {REDACTED}.",
                "attempts": [{"error": f"bad {REDACTED} and {REDACTED}"}, {"status": 200}],
                "count": 3,
            },
        )

    def test_short_keys_are_words(self) -> None:
        """A key like "guest" is left alone in answers: it is a word."""
        self.assertEqual(self.redact("Welcome, guest!"), "Welcome, guest!")

    def test_a_requests_own_token(self) -> None:
        """A request's own bearer token is redacted too, when long enough."""
        self.assertEqual(
            self.redact("echo: caller-token-0123456", extra="caller-token-0123456"),
            f"echo: {REDACTED}",
        )
        self.assertEqual(self.redact("echo: abc", extra="abc"), "echo: abc")

    def test_nothing_configured(self) -> None:
        """Without secrets a value is handed back as it is, not copied."""
        value = {"a": ["b"]}
        self.assertIs(Redactor([])(value), value)

    def test_bytes(self) -> None:
        """An answer passed on as bytes has the secrets replaced by the same
        marker; bytes without one are handed back as they are."""
        body = b'{"error": {"message": "Incorrect API key provided: sk-upstream-0123456789"}}'
        self.assertEqual(
            self.redact.redact_bytes(body),
            b'{"error": {"message": "Incorrect API key provided: ' + REDACTED.encode() + b'"}}',
        )
        self.assertEqual(self.redact.redact_bytes(b"guest"), b"guest")
        clean = b"nothing secret"
        self.assertIs(Redactor([]).redact_bytes(clean), clean)

    def test_a_requests_own_token_in_bytes(self) -> None:
        """An error body echoing the client's own token loses it too."""
        self.assertEqual(
            self.redact.redact_bytes(b"bad caller-token-0123456", extra="caller-token-0123456"),
            b"bad " + REDACTED.encode(),
        )

    def test_words_about_a_failure(self) -> None:
        """Failure texts lose the configured secrets, the request's own token,
        and anything shaped like a key."""
        self.assertEqual(
            self.redact.words(
                "echo Authorization: Bearer x.y, sk-upstream-0123456789, own-0123456789",
                extra="own-0123456789",
            ),
            f"echo Authorization: Bearer {REDACTED} {REDACTED}, {REDACTED}",
        )

    def test_json_escaped_forms(self) -> None:
        """A secret with characters written as JSON escapes is still found."""
        self.assertEqual(
            self.redact(
                '{"k": "sk\\u002dupstream\\u002D0123456789", "l": "ck-bob\\u002d0123456789"}'
            ),
            f'{{"k": "{REDACTED}", "l": "{REDACTED}"}}',
        )
        self.assertEqual(
            self.redact.redact_bytes(b'"sk\\u002dupstream-0123456789"'),
            b'"' + REDACTED.encode() + b'"',
        )
        slashed = Redactor(["tok/abc/0123456789"])
        self.assertEqual(slashed('"tok\\/abc\\/0123456789"'), f'"{REDACTED}"')

    def test_url_escaped_forms(self) -> None:
        """A secret percent-encoded in a query string is still found, the
        request's own token too."""
        self.assertEqual(
            self.redact("/v1/models?api_key=ck%2Dalice%2d0123456789&x=1"),
            f"/v1/models?api_key={REDACTED}&x=1",
        )
        self.assertEqual(
            self.redact("?key=own%2D0123456789", extra="own-0123456789"), f"?key={REDACTED}"
        )

    def test_escapes_of_other_characters_cost_no_copy(self) -> None:
        """Escapes that stand for no character of a secret leave the text as it is."""
        text = '{"text": "caf\\u00e9 \\u4e2d 100%25 done\\n"}'
        self.assertIs(self.redact(text), text)
        data = text.encode()
        self.assertIs(self.redact.redact_bytes(data), data)

    def test_carries(self) -> None:
        """Whether bytes hold a secret (or the request's own token) in any form."""
        self.assertTrue(self.redact.carries(b"Bearer sk-upstream-0123456789"))
        self.assertTrue(self.redact.carries(b"sk%2Dupstream-0123456789"))
        self.assertTrue(self.redact.carries(b"x own-0123456789", extra="own-0123456789"))
        self.assertFalse(self.redact.carries(b"application/json"))

    def test_non_ascii_secret_in_bytes(self) -> None:
        """A secret is matched in bytes as its UTF-8 encoding."""
        redact = Redactor(["clé-secrète-0123"])
        self.assertEqual(
            redact.redact_bytes("la clé-secrète-0123 !".encode()), f"la {REDACTED} !".encode()
        )

    def test_longest_secret_first(self) -> None:
        """A secret inside a longer one does not leave the longer one's rest."""
        redact = Redactor(["sk-0123456789", "sk-0123456789-long"])
        self.assertEqual(redact("a sk-0123456789-long b"), f"a {REDACTED} b")

    def test_min_length(self) -> None:
        """A known secret may be hidden whatever its length (a password in a
        driver's message)."""
        self.assertEqual(
            Redactor(["pw"], min_length=1)("auth failed for pw"), f"auth failed for {REDACTED}"
        )
        self.assertEqual(Redactor(["pw"])("auth failed for pw"), "auth failed for pw")

    def test_for_texts_is_the_redactor_on_texts(self) -> None:
        """``for_texts(extra)`` redacts each text as ``redactor(text, extra)``
        does: known secrets, the request's own token (when long enough), as
        written or escaped."""
        texts = [
            "plain words",
            "",
            "key ck-alice-0123456789 and sk-upstream-0123456789",
            "ck\\u002dalice-0123456789 escaped, ck%2Dbob-0123456789 too",
            "own token sk-own-token-99 here, short tok",
            "own sk\\u002down-token-99 escaped",
        ]
        for redactor in (self.redact, Redactor([])):
            for extra in (None, "sk-own-token-99", "tok"):
                for_texts = redactor.for_texts(extra)
                self.assertEqual(
                    [for_texts(text) for text in texts], [redactor(text, extra) for text in texts]
                )
        unchanged = Redactor([]).for_texts(None)
        self.assertIs(unchanged(texts[2]), texts[2])


class KeyShapeTests(SynchronousTestCase):
    def test_shapes(self) -> None:
        """Key and token shapes oaproxy does not know are hidden, their
        labels kept."""
        self.assertEqual(
            hide_key_shapes("key sk-proj-abcdefSECRET, Bearer abc.def ?api_key=x&b=1 token=t"),
            f"key {REDACTED}, Bearer {REDACTED} ?api_key={REDACTED}&b=1 token={REDACTED}",
        )

    def test_ordinary_text(self) -> None:
        """Text without such shapes is left alone."""
        text = "HTTP 429: rate limited, sk-1 too short to be a key"
        self.assertEqual(hide_key_shapes(text), text)


class RedactHeadersTests(SynchronousTestCase):
    """Credentials in headers never reach a record."""

    def test_pairs(self) -> None:
        """Credentials and cookies among raw header pairs are redacted, names
        lower-cased and repeated headers joined."""
        self.assertEqual(
            redact_headers(
                [
                    (b"Authorization", b"Bearer sk-secret"),
                    (b"Content-Type", b"application/json"),
                    (b"X-Api-Key", b"k"),
                    (b"api-key", b"k"),
                    (b"Cookie", b"a=b"),
                    (b"Set-Cookie", b"c=d"),
                    (b"Proxy-Authorization", b"Basic eA=="),
                    (b"Accept", b"a"),
                    (b"accept", b"b"),
                ]
            ),
            {
                "authorization": "[redacted]",
                "content-type": "application/json",
                "x-api-key": "[redacted]",
                "api-key": "[redacted]",
                "cookie": "[redacted]",
                "set-cookie": "[redacted]",
                "proxy-authorization": "[redacted]",
                "accept": "a, b",
            },
        )

    def test_twisted_headers(self) -> None:
        """twisted's Headers are redacted alike, and the secret appears nowhere in the result."""
        headers = Headers(
            {
                b"Authorization": [b"Bearer sk-secret"],
                b"User-Agent": [b"OpenAI/Python 1.0"],
            }
        )
        redacted = redact_headers(headers.getAllRawHeaders())
        self.assertEqual(
            redacted, {"authorization": "[redacted]", "user-agent": "OpenAI/Python 1.0"}
        )
        self.assertNotIn("sk-secret", json.dumps(redacted))

    def test_mapping(self) -> None:
        """A mapping of headers, lists for repeated ones, is redacted alike."""
        self.assertEqual(
            redact_headers({"Authorization": "Bearer x", "X-Test": "1", "X-Many": ["a", "b"]}),
            {"authorization": "[redacted]", "x-test": "1", "x-many": "a, b"},
        )


class SecretHeadersTests(SynchronousTestCase):
    """The client's credential headers, one list for forwarding and records:
    even with keep_header none reaches the upstream, and a record keeps
    each as REDACTED."""

    def test_never_forwarded_nor_recorded(self) -> None:
        """x-goog-api-key and api-key: not forwarded with keep_header, redacted in the record."""
        h = Harness(
            "authorization: {alice: sk-client-0123456789}\n"
            "records: {headers: true}\n"
            "upstreams:\n"
            "  - {endpoint: 'https://a.test/v1', sk: sk-a-0123456789, keep_header: true}\n"
        )
        given = {
            b"X-Goog-Api-Key": b"goog-secret-0123456789",
            b"Api-Key": b"azure-secret-0123456789",
            b"X-Api-Key": b"anthropic-secret-0123456789",
            b"Cookie": b"session=cookie-secret-0123456789",
            b"X-Custom": b"kept",
        }
        h.chat(key="sk-client-0123456789", header_lines=list(given.items()))
        call = h.agent.only()
        self.assertEqual(
            {name: call.header(name) for name in given},
            {**dict.fromkeys(list(given)[:4]), b"X-Custom": [b"kept"]},
        )
        call.respond(200, body=CHAT_ANSWER)
        headers = h.record()["request_headers"]
        for name in ("x-goog-api-key", "api-key", "x-api-key", "cookie", "authorization"):
            self.assertEqual(headers[name], REDACTED)
        self.assertEqual(headers["x-custom"], "kept")
        self.assertNotIn("secret-0123456789", json.dumps(h.record()))
