"""What ``pip install .`` puts on disk: oaproxy, and the plugin module in
Twisted's plugin package without claiming that package's ``__init__``.

That the plugin is then found is shown by ``test_twistd``, which runs the
installed ``twistd``."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parent.parent


class InstallTests(TestCase):
    # A build in an isolated environment: pip fetches setuptools first.
    timeout = 240

    async def test_pip_install_places_the_plugin(self) -> None:
        """pip install from a copy of the tree puts the plugin module in
        twisted/plugins without an __init__.py there or in twisted/, beside the
        oaproxy package."""
        target = Path(self.mktemp()).resolve()
        # Built from a copy: setuptools leaves build/ and *.egg-info in the tree.
        source = Path(self.mktemp()).resolve()
        for name in ("setup.cfg", "pyproject.toml", "README.rst"):
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name)
        for package in ("oaproxy", "twisted"):
            shutil.copytree(
                ROOT / package,
                source / package,
                ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"),
            )
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
            env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
            path=str(Path(self.mktemp()).parent),
            reactor=reactor,
        )
        self.assertEqual(code, 0, (out + err).decode("utf-8", "replace"))
        self.assertTrue((target / "twisted" / "plugins" / "oaproxy_plugin.py").is_file())
        self.assertFalse((target / "twisted" / "plugins" / "__init__.py").exists())
        self.assertFalse((target / "twisted" / "__init__.py").exists())
        self.assertTrue((target / "oaproxy" / "tap.py").is_file())
        self.assertTrue((target / "oaproxy" / "sinks" / "sql.py").is_file())
