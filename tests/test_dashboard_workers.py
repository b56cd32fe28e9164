"""The dashboard's sessions under ``workers: 2``, for real (``twistd -n
oaproxy``): the kernel spreads new connections over both workers, so a
login form, its post, and every page after may each meet another process."""

from __future__ import annotations

import os
from typing import Any

from tests.adminclient import ADMIN_KEY
from tests.dashboardclient import DashboardClient
from tests.live import free_port
from tests.test_daemon import DaemonCase, base_config

LOGINS = 20
PAGES = 6


class DashboardWorkersTests(DaemonCase):
    timeout = 120

    def config(self, port: int, **store: Any) -> dict[str, Any]:
        return base_config(
            port,
            {},
            [{"name": "echo", "type": "echo"}],
            workers=2,
            admin_key=ADMIN_KEY,
            records={"spool_dir": os.path.join(self.cwd, "spool")},
            **store,
        )

    async def started(self, config: dict[str, Any], port: int) -> None:
        daemon = self.spawn(config)
        await self.serving(daemon, port)
        await daemon.wait_for("oaproxy started\n", count=2, timeout=30)

    async def logins(self, port: int) -> DashboardClient:
        """``LOGINS`` logins, each request on a new connection: every one
        succeeds and its cookie opens every page after; the last browser."""
        for _ in range(LOGINS):
            browser = DashboardClient(port)
            login = await browser.login()
            self.assertEqual(login.status, 303, login.text)
            statuses = [(await browser.get("/admin/ui/")).status for _ in range(PAGES)]
            self.assertEqual(statuses, [200] * PAGES)
        return browser

    async def test_a_session_on_every_worker_of_one_store(self) -> None:
        """With a SQL store: every login succeeds, its cookie works on every
        request, and a logout (on one worker) ends it on all of them."""
        port = free_port()
        await self.started(
            self.config(port, dbtype="sqlite", dbaddr=os.path.join(self.cwd, "db.sqlite")), port
        )
        browser = await self.logins(port)
        cookies = dict(browser.cookies)
        token = (await browser.get("/admin/ui/")).csrf
        self.assertEqual((await browser.post("/admin/ui/logout", {"csrf": token})).status, 303)
        # The old cookie, as a copy of it kept elsewhere would send it.
        browser.cookies = cookies
        statuses = [(await browser.get("/admin/ui/")).status for _ in range(3 * PAGES)]
        self.assertEqual(statuses, [303] * 3 * PAGES)

    async def test_a_session_on_every_worker_without_a_store(self) -> None:
        """With ``dbtype: none`` the parent gives both workers one secret:
        every login succeeds and its cookie works on every request."""
        port = free_port()
        await self.started(self.config(port, dbtype="none"), port)
        await self.logins(port)
