"""``${…}`` in config strings: the shell's ``:-`` and ``:+``, nested."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.config.interpolation import InterpolationError, interpolate, is_one_reference
from tests.test_config import MINIMAL, Helpers, parse

ENV = {"SET": "value", "EMPTY": "", "KEY": "sk-secret-123"}


class ExpansionTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Each supported form expands as the shell would."""
        table = [
            ("${SET}", "value"),
            ("${EMPTY}", ""),
            ("a-${SET}-b", "a-value-b"),
            ("${SET:-word}", "value"),
            ("${EMPTY:-word}", "word"),
            ("${UNSET:-word}", "word"),
            ("${UNSET:-}", ""),
            ("${SET:+word}", "word"),
            ("${EMPTY:+word}", ""),
            ("${UNSET:+word}", ""),
            # Words may hold references (as in the shell) ...
            ("${UNSET:-${SET}}", "value"),
            ("${SET:+<${SET}>}", "<value>"),
            ("${UNSET:-x${EMPTY:-y}z}", "xyz"),
            # ... and a reference may stand for the name (as in zsh).
            ("${${KEY:+true}:-false}", "true"),
            ("${${UNSET:+true}:-false}", "false"),
            ("${${EMPTY:+true}:-false}", "false"),
            # Escapes and lone dollars.
            ("$${SET}", "${SET}"),
            ("${UNSET:-$${x}}", "${x}"),
            ("$x $ $$", "$x $ $$"),
            ("${SET:-a:-b}", "value"),
            ("${UNSET:-a:-b}", "a:-b"),
        ]
        for text, expected in table:
            self.assertEqual(interpolate(text, ENV), expected, text)

    def test_unset_without_default(self) -> None:
        """A plain reference to an unset variable is an error naming it;
        a default that is never used needs nothing set."""
        error = self.assertRaises(InterpolationError, interpolate, "${UNSET}", ENV)
        self.assertEqual(str(error), "environment variable UNSET is not set")
        self.assertEqual(interpolate("${SET:-${UNSET}}", ENV), "value")
        self.assertRaises(InterpolationError, interpolate, "${UNSET:-${ALSO_UNSET}}", ENV)

    def test_bad_references(self) -> None:
        """Malformed references are refused, without quoting any value."""
        for text in ("${", "${SET", "${SET:-x", "${A-B}", "${1A}", "${}", "${SET:=x}", "${SET?}"):
            error = self.assertRaises(InterpolationError, interpolate, text, ENV)
            self.assertIn("bad '${NAME}' reference", str(error), text)
            self.assertNotIn("sk-secret", str(error))

    def test_is_one_reference(self) -> None:
        """Whether a whole scalar is one reference (how numbers and booleans
        come from the environment)."""
        for text in ("${A}", "${A:-1}", "${${A:+true}:-false}", "${A:+${B}}"):
            self.assertTrue(is_one_reference(text), text)
        for text in ("1${A}", "${A}${B}", "${A}x", "$${A}", "${A", "plain", ""):
            self.assertFalse(is_one_reference(text), text)


class ConfigInterpolationTests(Helpers):
    def test_default_in_a_string(self) -> None:
        """``${NAME:-default}`` gives a string setting its default."""
        config = parse("hostname: ${HOST:-edge-1}\n" + MINIMAL)
        self.assertEqual(config.hostname, "edge-1")
        config = parse("hostname: ${HOST:-edge-1}\n" + MINIMAL, {"HOST": "edge-2"})
        self.assertEqual(config.hostname, "edge-2")

    def test_empty_key_is_no_key(self) -> None:
        """``sk: ${KEY:-}`` with KEY unset sends no Authorization."""
        config = parse("upstreams:\n  - {endpoint: 'http://a/v1', sk: '${KEY:-}'}\n")
        self.assertIsNone(config.upstreams[0].sk)

    def test_number_and_boolean_from_a_choice(self) -> None:
        """A whole reference with defaults may give a number or a boolean."""
        text = (
            "timeout: ${T:-30}\n"
            "upstreams:\n"
            "  - endpoint: http://a/v1\n"
            "    noauth: ${${PUBLIC:+true}:-false}\n"
        )
        config = parse(text)
        self.assertEqual((config.timeout, config.upstreams[0].noauth), (30.0, False))
        config = parse(text, {"T": "5", "PUBLIC": "1"})
        self.assertEqual((config.timeout, config.upstreams[0].noauth), (5.0, True))

    def test_bad_reference_names_the_key(self) -> None:
        """A malformed reference is refused at its key's line."""
        self.fails("hostname: ${HOST:=x}\n" + MINIMAL, 1, "hostname", "bad '${NAME}' reference")
