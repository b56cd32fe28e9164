"""Configured secrets never survive in text that came from elsewhere."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.config import parse_config
from oaproxy.redact import REDACTED, Redactor, config_secrets

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


class RedactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = parse_config(CONFIG, "test.yaml", {})
        self.redact = Redactor(config_secrets(self.config))

    def test_every_configured_secret(self) -> None:
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
        self.assertEqual(
            self.redact("echo: caller-token-0123456", extra="caller-token-0123456"),
            f"echo: {REDACTED}",
        )
        self.assertEqual(self.redact("echo: abc", extra="abc"), "echo: abc")

    def test_nothing_configured(self) -> None:
        value = {"a": ["b"]}
        self.assertIs(Redactor([])(value), value)
