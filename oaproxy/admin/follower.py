"""A daemon's link to the SQL store: changes taken at once, those made
elsewhere (another daemon, the CLI, an ``UPDATE`` by hand) noticed within
``store_poll_interval`` seconds.

Every few seconds the follower reads ``oaproxy_store_version`` (one row,
raised by the tables' triggers): a cheap look, whatever the size of the
records.  When it moved, the whole store is read and handed to ``apply``
(the service builds the config it makes and swaps it in), and the audit
entries others made meanwhile (the CLI's) go to this daemon's log.  A change
taken here is written, logged, then applied the same way before its answer
goes out, so it is in effect at once in this process.

All database work runs in adbapi's threads, never on the reactor; a store
that is down is said once in the log, and looked at again.

``ConfigSources`` is what a daemon's config comes from: the file, the
store's rows overlaid on it, and the follower of that store (replaced when
a reload names another one).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.application.service import MultiService, Service
from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.admin.changes import Decide
from oaproxy.admin.loading import UNREAD
from oaproxy.admin.overlay import running_config
from oaproxy.admin.stored import EMPTY, AuditEntry, StoreSnapshot
from oaproxy.admin.tables import (
    Change,
    audit_after,
    read_snapshot,
    read_version,
    take_change,
)
from oaproxy.config import DBTYPES, Config
from oaproxy.recordstore import Database, driver_error_text
from oaproxy.sinks.sql import connection_pool, migrate

_T = TypeVar("_T")

#: At most this many audit entries of others are logged at one look (a
#: script that made thousands of changes gets the rest in the table).
_AUDIT_LINES = 100

#: Applies a snapshot that a follower read; True when it is in use.
Apply = Callable[["StoreFollower", StoreSnapshot], Awaitable[bool]]


class StoreFollower(Service):
    """Follows one store (``dbtype``, ``dbaddr``) for one daemon."""

    log = Logger()

    def __init__(
        self,
        dbtype: str,
        dbaddr: str,
        reactor: Any,
        *,
        interval: float,
        stored: StoreSnapshot,
        apply: Apply,
    ) -> None:
        self.dbtype = dbtype
        self.dbaddr = dbaddr
        self._database = Database(dbtype, dbaddr, where="the store")
        self.interval = interval
        self._reactor = reactor
        self._apply = apply
        # The version of the store last applied (the daemon read it at
        # start), and whether the service took it or refused it.
        self.version = stored.version
        self._in_use = True
        self._pool: ConnectionPool | None = None
        self._loop: LoopingCall | None = None
        self._migrated = False
        self._down = False
        # The newest audit entry in this daemon's log, or that was there when
        # it started (older ones are no news); None: the store was not read.
        self._audit_logged: int | None = None if stored is UNREAD else stored.last_audit
        # Entries this daemon made and logged as it took them.
        self._own_entries: set[int] = set()
        # One read-and-apply at a time: an older snapshot never replaces a newer.
        self._lock = DeferredLock()

    def startService(self) -> None:
        super().startService()
        # Two connections: a long records query never delays a change or a look.
        self._pool = connection_pool(self.dbtype, self.dbaddr, reactor=self._reactor, connections=2)
        self._loop = LoopingCall(self._look)
        self._loop.clock = self._reactor
        unread = self.version == UNREAD.version
        if unread:
            self.log.error(
                "the store could not be read at start: the config file alone is served"
                " until it can be"
            )
        self._loop.start(self.interval, now=unread)

    def follow_every(self, interval: float) -> None:
        """Look every ``interval`` seconds from the next look on."""
        self.interval = interval
        if self._loop is not None:
            self._loop.interval = interval

    def now_in_use(self, version: int) -> None:
        """The daemon runs this version of the store (a reload read it)."""
        self.version = version
        self._in_use = True

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    # -- what the daemon asks ------------------------------------------------

    def take(self, decide: Decide) -> Deferred[tuple[Change, bool]]:
        """Write the change ``decide`` makes (or raise its refusal), then
        apply the store as it is now; fires with the change, and whether the
        store with it is in use (False: the service refused it, and said why)."""
        return ensureDeferred(self._take(decide))

    def query(self, work: Callable[[Any], _T]) -> Deferred[_T]:
        """``work(connection)`` in a database thread (the records, the audit log)."""
        return self._interact(lambda cursor: work(cursor.connection))

    def read(self) -> Deferred[StoreSnapshot]:
        """The store's rows as they are now."""
        return self._interact(read_snapshot)

    # -- inside ----------------------------------------------------------------

    async def _take(self, decide: Decide) -> tuple[Change, bool]:
        change, _ = await self._interact(lambda cursor: take_change(cursor, self.dbtype, decide))
        self._log_change(change.audit)
        if change.audit.id is not None:
            self._own_entries.add(change.audit.id)
        return change, await self._refresh()

    def _log_change(self, entry: AuditEntry) -> None:
        self.log.info(
            "store change by {actor}: {action} {target} {changes}",
            actor=entry.actor,
            action=entry.action.value,
            target=entry.target,
            changes=entry.changes,
        )

    def _interact(self, work: Callable[[Any], _T]) -> Deferred[_T]:
        if self._pool is None:
            raise RuntimeError("the store follower is not started")
        pool = self._pool

        def migrated_first(cursor: Any) -> _T:
            if not self._migrated:
                migrate(cursor, self.dbtype)
                # Its own transaction: a change made next takes the write lock anew.
                cursor.connection.commit()
                self._migrated = True
            return work(cursor)

        result: Deferred[_T] = pool.runInteraction(migrated_first)
        return result

    async def _refresh(self) -> bool:
        await self._lock.acquire()
        try:
            logged = self._audit_logged
            snapshot, entries = await self._interact(lambda c: self._read_news(c, logged))
            for entry in entries:
                if entry.id not in self._own_entries:
                    self._log_change(entry)
                self._own_entries.discard(entry.id or 0)
            self._audit_logged = entries[-1].id if entries else snapshot.last_audit
            if snapshot.version != self.version:
                # Applied or refused (the log says why), this version is done
                # with: a bad row is reported once, not every few seconds.
                self._in_use = await self._apply(self, snapshot)
                self.version = snapshot.version
            return self._in_use
        finally:
            self._lock.release()

    def _read_news(self, cursor: Any, logged: int | None) -> tuple[StoreSnapshot, list[AuditEntry]]:
        """The store's rows, and the audit entries after ``logged`` (none
        when nothing was read before: the history is no news)."""
        snapshot = read_snapshot(cursor)
        if logged is None:
            return snapshot, []
        return snapshot, audit_after(cursor, self.dbtype, logged, limit=_AUDIT_LINES)

    async def _check(self) -> None:
        version = await self._interact(read_version)
        if not self.running:
            return
        if self._down:
            self._down = False
            self.log.info("the store can be read again")
        if version != self.version:
            await self._refresh()

    def _look(self) -> Deferred[None]:
        def failed(failure: Failure) -> None:
            error = failure.value
            if self.running and not self._down and error is not None:
                self._down = True
                self.log.error(
                    "the store cannot be read, changes made elsewhere wait: {error}",
                    error=driver_error_text(error, self._database),
                )

        # A failed look must not stop the loop: the next one tries again.
        return ensureDeferred(self._check()).addErrback(failed)


async def read_store_once(dbtype: str, dbaddr: str, reactor: Any) -> StoreSnapshot:
    """The rows of a store that no follower follows (yet), read in a thread."""
    pool = connection_pool(dbtype, dbaddr, reactor=reactor)

    def migrated_snapshot(cursor: Any) -> StoreSnapshot:
        migrate(cursor, dbtype)
        return read_snapshot(cursor)

    try:
        snapshot: StoreSnapshot = await pool.runInteraction(migrated_snapshot)
        return snapshot
    finally:
        pool.close()


class ConfigSources(MultiService):
    """The file and the store a daemon's config comes from, apart (as the
    admin API shows them), and the follower of that store: its only child."""

    def __init__(
        self, file_config: Config, stored: StoreSnapshot, reactor: Any, *, apply: Apply
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._apply = apply
        self.store: StoreFollower | None = None  # None: dbtype none
        self.file_config = config = file_config
        self.stored = stored
        self.now_running(config, stored)

    def combined(self) -> Config:
        """The config that runs: the file with the store overlaid."""
        return running_config(self.file_config, self.stored)

    def now_running(self, config: Config, stored: StoreSnapshot) -> None:
        """The daemon runs ``config`` (a file) with ``stored``: follow
        ``config``'s store from now on, unless that one is followed already."""
        self.file_config, self.stored = config, stored
        store = self.store
        if store is not None and self._follows(config):
            store.follow_every(config.store_poll_interval)
            store.now_in_use(stored.version)
            return
        if store is not None:
            store.disownServiceParent()
        self.store = None
        if config.dbtype in DBTYPES:
            self.store = StoreFollower(
                config.dbtype,
                config.dbaddr,
                self._reactor,
                interval=config.store_poll_interval,
                stored=stored,
                apply=self._apply,
            )
            self.store.setServiceParent(self)

    async def read(self, config: Config) -> StoreSnapshot:
        """What ``config``'s store holds now (read by its follower, if followed)."""
        if config.dbtype not in DBTYPES:
            return EMPTY
        if self.store is not None and self._follows(config):
            return await self.store.read()
        # Another store (dbaddr changed): followed only once the reload is done.
        return await read_store_once(config.dbtype, config.dbaddr, self._reactor)

    def _follows(self, config: Config) -> bool:
        store = self.store
        return store is not None and (store.dbtype, store.dbaddr) == (config.dbtype, config.dbaddr)
