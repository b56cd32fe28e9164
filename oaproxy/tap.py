"""twistd's entry: ``twistd -n oaproxy --config etc/config.yaml``."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from oaproxy.admin.loading import load
from oaproxy.config import ConfigError, check_listeners, parse_listen


class Options(usage.Options):
    synopsis = "[--config etc/config.yaml] [--listen ENDPOINT ...] [--workers N]"
    longdesc = (
        "Runs oaproxy: one OpenAI-compatible /v1 endpoint in front of many "
        "upstreams, with failover, records, metrics and alerts."
    )
    optParameters = [
        ["config", "c", "etc/config.yaml", "The YAML config file."],
        [
            "workers",
            "w",
            None,
            "Processes serving the listeners together (default: the config's workers, 1).",
            int,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Serve on this Twisted endpoint instead of the config's listen:
        (repeatable), e.g. tcp:8888:interface=0.0.0.0"""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        path = self["config"]
        if self["workers"] is not None and self["workers"] < 1:
            raise SystemExit("oaproxy: --workers must be 1 or more")
        try:
            listen = []
            for endpoint in self["listen"]:
                try:
                    listen.append(parse_listen(endpoint))
                except ValueError as e:
                    raise SystemExit(f"oaproxy: --listen {endpoint}: {e}") from None
            # The file, and the store's upstreams and keys on top (oaproxy.admin);
            # a store that cannot be read yet is followed until it can.
            loaded = load(path, create_store=True, without_store=True)
            if listen:
                check_listeners(loaded.config, listen, key="--listen")
        except ConfigError as e:
            # Not a UsageError: twistd would print its whole --help before it.
            # One line naming file, line and key, no traceback, no reactor.
            raise SystemExit(f"oaproxy: {e}") from None
        except OSError as e:
            raise SystemExit(f"oaproxy: {path}: cannot read the config: {e.strerror}") from None
        self["loaded"] = loaded.file
        self["stored"] = loaded.stored
        self["listen"] = listen


def makeService(options: Options, reactor: Any = None) -> IService:
    from oaproxy.listeners import check_endpoint
    from oaproxy.service import ProxyService
    from oaproxy.workers import WorkerSupervisor, follow_parent, inherited_listeners

    # twistd calls this with its options alone: the process is the daemon's
    # own, whose heap is frozen (oaproxy.heap).  A program that passes its
    # reactor (the tests) keeps its garbage collector as it is.
    freeze = reactor is None
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config = options["loaded"]
    listen = tuple(options["listen"])
    # A worker's sockets were bound by its parent: there is nothing to check.
    inherited = inherited_listeners(os.environ)
    follow_parent(os.environ)
    try:
        for endpoint in listen or config.listen:
            if endpoint not in inherited:
                check_endpoint(reactor, endpoint, config.path)
    except ConfigError as e:
        raise SystemExit(f"oaproxy: {e}") from None
    workers = options["workers"] or config.workers
    if workers > 1:
        supervisor = WorkerSupervisor(
            reactor,
            count=workers,
            listen=listen or config.listen,
            arguments=["--config", options["config"], *(f"--listen={e}" for e in listen)],
            config_path=config.path,
            shutdown_timeout=config.shutdown_timeout,
            environ=os.environ,
        )
        try:
            supervisor.bind()
        except ConfigError as e:
            raise SystemExit(f"oaproxy: {e}") from None
        except OSError as e:
            raise SystemExit(f"oaproxy: {config.path}: cannot listen: {e}") from None
        return supervisor
    return ProxyService(
        config,
        reactor,
        listen,
        signals=True,
        stored=options["stored"],
        inherited=inherited,
        freeze=freeze,
    )
