"""The project's front door stays true: README's commands, CI, the sample
config and the systemd units."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.config import Config, UpstreamType, load_config
from oaproxy.config.schema import every_key

ROOT = Path(__file__).resolve().parent.parent


def _read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def _readme_commands() -> list[str]:
    """The literal blocks of README.rst before its first section."""
    head = _read("README.rst").split("\n----", 1)[0]
    return [block.strip() for block in re.findall(r"::\n\n((?:    .*\n)+)", head)]


class ReadmeTests(SynchronousTestCase):
    def test_opens_with_two_commands(self) -> None:
        """The first runs the sample config as it is (no key: the echo
        upstream answers); the second runs the tests."""
        run, test = _readme_commands()
        self.assertIn("pip install .", run)
        self.assertIn("twistd -n oaproxy --config etc/config.yaml", run)
        self.assertNotIn("OPENAI_API_KEY", run)
        self.assertIn("'.[test]'", test)
        self.assertIn("-m twisted.trial tests", test)

    def test_ci_runs_the_readme_test_command(self) -> None:
        """CI runs README's test command as it stands there, its output piped into a log."""
        _, test = _readme_commands()
        ci = _read(".ci/run")
        command_lines = [line for line in ci.splitlines() if line.startswith("python3 -m venv")]
        self.assertEqual(len(command_lines), 1, ci)
        # CI pipes trial's output into a log to read its summary.
        self.assertEqual(command_lines[0].split(" 2>&1 | tee ")[0], test)

    def test_ci_checks_the_formatting(self) -> None:
        """After the tests CI runs ruff format --check, installed by the test
        extra, and counts a tree it would change as a failure."""
        ci = _read(".ci/run").splitlines()
        tests = next(i for i, line in enumerate(ci) if line.startswith("python3 -m venv"))
        check = ci.index("if ! .venv/bin/ruff format --check .; then")
        self.assertLess(tests, check)
        self.assertIn("formatting=1", [line.strip() for line in ci[check + 1 : check + 4]])
        self.assertIn("+ formatting ))", "\n".join(ci))
        test_extra = _read("setup.cfg").split("test =", 1)[1].split("dev =", 1)[0]
        self.assertIn("ruff", test_extra)


class SampleConfigTests(SynchronousTestCase):
    def test_loads(self) -> None:
        """With OPENAI_API_KEY the sample config is OpenAI alone, echo left out."""
        config = load_config(str(ROOT / "etc/config.yaml"), {"OPENAI_API_KEY": "sk-test"})
        self.assertEqual(config.listen, ("tcp:8888:interface=127.0.0.1",))
        self.assertEqual([u.name for u in config.upstreams], ["openai"])
        self.assertEqual(config.upstreams[0].endpoint, "https://api.openai.com/v1")
        self.assertEqual(config.upstreams[0].sk, "sk-test")
        self.assertEqual([u.name for u in config.disabled_upstreams], ["echo"])

    def test_loads_without_a_key(self) -> None:
        """Without OPENAI_API_KEY (unset or empty) the echo upstream answers alone."""
        for environ in ({}, {"OPENAI_API_KEY": ""}):
            config = load_config(str(ROOT / "etc/config.yaml"), environ)
            self.assertEqual(
                [(u.name, u.type) for u in config.upstreams], [("echo", UpstreamType.ECHO)]
            )
            self.assertEqual([u.name for u in config.disabled_upstreams], ["openai"])

    def test_shows_every_option(self) -> None:
        """Each key the loader knows appears in etc/config.yaml, set or commented."""
        sample = _read("etc/config.yaml")
        shown = set(re.findall(r"(?:^[#\s-]*|[{,]\s*)([a-z_]+):", sample, flags=re.MULTILINE))
        # Every key a file may hold, in any section.
        known = set(every_key(Config))
        # openai-api-route's alias of listen, accepted but not advertised.
        known.discard("address")
        self.assertTrue(known)
        self.assertEqual(sorted(known - shown), [])


class SystemdTests(SynchronousTestCase):
    def test_service(self) -> None:
        """The service unit runs twistd in the foreground as its own user,
        sandboxed, restarted on failure and reloaded by SIGHUP."""
        unit = _read("systemd/oaproxy.service")
        self.assertIn("twistd --nodaemon --pidfile= oaproxy", unit)
        for directive in (
            "User=oaproxy",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "ExecReload=/bin/kill -HUP $MAINPID",
            # Room for max_connections' default of 10,000 client connections.
            "LimitNOFILE=65536",
        ):
            self.assertIn(directive, unit)

    def test_socket(self) -> None:
        """The socket unit listens, and says which listen endpoint takes its socket."""
        unit = _read("systemd/oaproxy.socket")
        self.assertIn("ListenStream=", unit)
        self.assertIn("systemd:domain=INET:index=0", unit)
