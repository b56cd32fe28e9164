"""What a reload keeps: each long-lived part of a generation (sinks,
notifier, shared Redis, cache) is made anew exactly when the config fields
it is made of change."""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.config import Config
from oaproxy.generation import (
    Generation,
    NotifySettings,
    RedisSettings,
    SinkSettings,
    build_generation,
)
from tests.doubles import Harness, make_config

CONFIG = """
dbtype: none
authorization: {alice: sk-client}
records: {file: ./records.jsonl}
cache: {ttl: 60}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a, timeout: 30}
"""


class ReusedPartsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def reload(self, text: str) -> Generation:
        return build_generation(make_config(text), self.h.shared, previous=self.h.generation)

    def kept(self, new: Generation) -> dict[str, bool]:
        old = self.h.generation
        return {
            "sinks": new.sinks is old.sinks,
            "notifier": new.notifier is old.notifier,
            "shared_redis": new.shared_redis is old.shared_redis,
            "cache": new.response_cache is old.response_cache,
        }

    def test_an_unrelated_change_keeps_every_part(self) -> None:
        """A change to an upstream remakes none of the long-lived parts."""
        new = self.reload(CONFIG.replace("timeout: 30", "timeout: 31"))
        self.assertEqual(set(self.kept(new).values()), {True})

    def test_each_part_follows_its_own_settings(self) -> None:
        """A change to records remakes the sinks only, one to hostname the notifier only."""
        records = self.reload(CONFIG.replace("./records.jsonl}", "./records.jsonl, queue_size: 5}"))
        self.assertEqual(
            self.kept(records),
            {"sinks": False, "notifier": True, "shared_redis": True, "cache": True},
        )
        hostname = self.reload("hostname: elsewhere\n" + CONFIG)
        self.assertEqual(
            self.kept(hostname),
            {"sinks": True, "notifier": False, "shared_redis": True, "cache": True},
        )
        cache = self.reload(CONFIG.replace("ttl: 60", "ttl: 61"))
        self.assertEqual(
            self.kept(cache),
            {"sinks": True, "notifier": True, "shared_redis": True, "cache": False},
        )

    def test_settings_are_config_fields(self) -> None:
        """Each settings value holds Config fields by name, so a part reads
        nothing a reload does not compare."""
        config_fields = {field.name for field in attrs.fields(Config)}
        for settings in (SinkSettings, NotifySettings, RedisSettings):
            names = {field.name for field in attrs.fields(settings)}
            self.assertLessEqual(names, config_fields, settings.__name__)
