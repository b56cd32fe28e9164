"""Tests for the IP rules (``oaproxy.iprules``): ``ip_allow`` and ``ip_deny``
on the client IP as records see it, with and without trusted proxies."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.iprules import IPRules
from oaproxy.record import record_document
from tests.doubles import Harness, make_config

CONFIG = """
authorization: {alice: sk-client}
ip_allow: [10.0.0.0/8, "2001:db8::/32"]
ip_deny: [10.9.0.0/16]
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""


class IPRulesTests(SynchronousTestCase):
    def rules(self, text: str = CONFIG) -> IPRules:
        rules = IPRules.from_config(make_config(text))
        assert rules is not None
        return rules

    def test_allow_then_deny(self) -> None:
        """An address must be in ip_allow and not in ip_deny."""
        rules = self.rules()
        self.assertTrue(rules.admits("10.1.2.3"))
        self.assertFalse(rules.admits("10.9.1.1"))
        self.assertFalse(rules.admits("192.0.2.1"))
        self.assertTrue(rules.admits("2001:db8::7"))
        self.assertFalse(rules.admits("2001:db9::7"))

    def test_mapped_ipv4_and_non_addresses(self) -> None:
        """::ffff:a.b.c.d counts as a.b.c.d; a non-address is in no network."""
        rules = self.rules()
        self.assertTrue(rules.admits("::ffff:10.1.2.3"))
        self.assertFalse(rules.admits("::ffff:10.9.0.1"))
        self.assertFalse(rules.admits("unix"))
        deny_only = self.rules(CONFIG.replace('ip_allow: [10.0.0.0/8, "2001:db8::/32"]', ""))
        self.assertTrue(deny_only.admits("unix"))
        self.assertTrue(deny_only.admits("192.0.2.1"))
        self.assertFalse(deny_only.admits("10.9.3.4"))

    def test_no_rules_no_gate(self) -> None:
        """Without ip_allow and ip_deny there is no gate at all."""
        self.assertIsNone(
            IPRules.from_config(
                make_config(CONFIG.replace("ip_allow", "#").replace("ip_deny", "#"))
            )
        )


class ThroughTheSiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def test_denied_before_auth_and_body(self) -> None:
        """A denied address gets 403 whatever its key, its body unparsed, and is recorded."""
        for key in ("sk-client", "sk-wrong", None):
            reply = self.h.chat(key=key, peer="192.0.2.1").reply()
            self.assertEqual(reply.status, 403)
            self.assertEqual(reply.json()["error"]["code"], "ip_not_allowed")
            self.assertEqual(reply.json()["error"]["type"], "permission_error")
        self.assertEqual(self.h.agent.calls, [])
        record = record_document(self.h.records[0])
        self.assertEqual((record["status"], record["client_ip"]), (403, "192.0.2.1"))
        # Not parsed: no model read from it, the body only described.
        self.assertEqual(record["model"], None)
        self.assertEqual(
            record["request_body"]["size"],
            len(
                json.dumps(
                    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
                )
            ),
        )

    def test_allowed_goes_on(self) -> None:
        """An allowed address goes on to the key check and the upstream."""
        self.h.chat(peer="10.1.2.3")
        self.assertEqual(len(self.h.agent.calls), 1)
        self.assertEqual(self.h.chat(key="sk-wrong", peer="10.1.2.3").reply().status, 401)

    def test_forwarded_for_from_a_trusted_proxy(self) -> None:
        """Behind trusted proxies the rules see the forwarded client, walked from the right."""
        h = Harness(CONFIG + "trusted_proxies: [127.0.0.1/32, 172.16.0.0/12]\n")
        denied = h.chat(header_lines=[(b"X-Forwarded-For", b"192.0.2.7")], peer="127.0.0.1")
        self.assertEqual(denied.reply().status, 403)
        chain = h.chat(
            header_lines=[(b"X-Forwarded-For", b"10.0.0.9, 192.0.2.8, 172.16.0.3")],
            peer="127.0.0.1",
        )
        self.assertEqual(chain.reply().status, 403)
        self.assertEqual(h.records[-1].client_ip, "192.0.2.8")
        h.chat(header_lines=[(b"X-Forwarded-For", b"10.4.4.4")], peer="127.0.0.1")
        self.assertEqual(len(h.agent.calls), 1)

    def test_forwarded_for_is_not_believed_without_trust(self) -> None:
        """Without trusted proxies X-Forwarded-For is ignored: the peer decides."""
        h = Harness(CONFIG + "trusted_proxies: []\n")
        forged = h.chat(header_lines=[(b"X-Forwarded-For", b"10.1.1.1")], peer="192.0.2.1")
        self.assertEqual(forged.reply().status, 403)
        h.chat(header_lines=[(b"X-Forwarded-For", b"192.0.2.1")], peer="10.1.2.3")
        self.assertEqual(len(h.agent.calls), 1)
