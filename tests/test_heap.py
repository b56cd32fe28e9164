"""Tests for ``oaproxy.heap``: ``gc.freeze`` after start-up and each swap."""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from oaproxy import service as service_module
from oaproxy.config import load_config
from oaproxy.heap import YOUNG_COLLECTION, freeze_heap
from oaproxy.service import ProxyService
from oaproxy.tap import Options, makeService
from tests.live import reactor, write_yaml
from tests.payloads import proxy_config


class Cycle:
    """An object that refers to itself: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


class FreezeHeapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)
        self.addCleanup(gc.set_threshold, *gc.get_threshold())

    def test_young_collections_made_rarer(self) -> None:
        """After the freeze the young generation is collected every
        YOUNG_COLLECTION allocations; the older generations' thresholds
        stay as they were."""
        gc.set_threshold(700, 10, 10)
        freeze_heap()
        self.assertEqual(gc.get_threshold(), (YOUNG_COLLECTION, 10, 10))

    def test_freezes(self) -> None:
        """What lives now is frozen, out of the collector's sight."""
        gc.unfreeze()
        kept = Cycle()
        freeze_heap()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertIs(kept.me, kept)

    def test_garbage_frozen_before_is_freed(self) -> None:
        """A cycle frozen at start-up and dropped since is freed at the next
        freeze (a reload), not kept frozen for good."""
        dropped = Cycle()
        alive = weakref.ref(dropped)
        gc.freeze()
        del dropped
        gc.collect()
        self.assertIsNotNone(alive())
        freeze_heap()
        self.assertIsNone(alive())


class ServiceFreezeTests(TestCase):
    def config_path(self) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "config.yaml")
        write_yaml(path, proxy_config("heap", {}, [{"name": "echo", "type": "echo"}]))
        return path

    async def test_after_start_and_each_swap(self) -> None:
        """A service told to freeze does so once started and after each
        reload."""
        calls: list[None] = []
        self.patch(service_module, "freeze_heap", lambda: calls.append(None))
        path = self.config_path()
        service = ProxyService(
            load_config(path, os.environ), reactor, ("tcp:0:interface=127.0.0.1",), freeze=True
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(calls), 1)
        self.assertTrue(await service.reload())
        self.assertEqual(len(calls), 2)

    def test_twistd_freezes_tests_do_not(self) -> None:
        """makeService as twistd calls it (options alone) freezes the heap;
        given a reactor (a program embedding the service) it does not."""
        path = self.config_path()
        options = Options()
        options.parseOptions(["--config", path, "--listen", "tcp:0:interface=127.0.0.1"])
        embedded: Any = makeService(options, reactor)
        self.assertFalse(embedded._freeze)
        by_twistd: Any = makeService(options)
        self.assertTrue(by_twistd._freeze)
