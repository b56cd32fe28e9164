"""Talking to the dashboard (``/admin/ui/``) from a trial test as a browser
would: cookies kept, forms posted with the CSRF token of the page they came
from, redirects not followed (the tests look at them)."""

from __future__ import annotations

import re
from html import unescape
from io import BytesIO
from typing import Any
from urllib.parse import urlencode

from attrs import frozen
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers

from tests.adminclient import ADMIN_KEY
from tests.live import reactor, read_body

_TOKEN = re.compile(r'name="csrf" value="([0-9a-f]+)"')


@frozen
class Page:
    status: int
    text: str
    headers: Headers

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if not values else values[-1]

    @property
    def csrf(self) -> str:
        """The CSRF token of the page's forms."""
        found = _TOKEN.search(self.text)
        assert found is not None, self.text[:500]
        return found[1]

    @property
    def set_cookies(self) -> list[str]:
        return list(self.headers.getRawHeaders("set-cookie") or ())


def page_text(html: str) -> str:
    """The text a reader sees: tags dropped, entities read."""
    return unescape(re.sub(r"<[^>]+>", " ", html))


class DashboardClient:
    """One browser: its cookies, requests to one daemon's ``/admin/ui/``."""

    def __init__(self, port: int) -> None:
        self.origin = f"http://127.0.0.1:{port}"
        self.cookies: dict[str, str] = {}
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    async def request(
        self,
        method: str,
        path: str,
        fields: dict[str, str] | None = None,
        *,
        bearer: str | None = None,
        authorization: str | None = None,
        raw: bytes | None = None,
    ) -> Page:
        """``method`` on ``path`` (from the origin), ``fields`` as a form;
        ``authorization``: the header as it is (``bearer``: of that token)."""
        headers = Headers()
        if self.cookies:
            cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            headers.setRawHeaders("cookie", [cookie])
        if bearer is not None:
            authorization = f"Bearer {bearer}"
        if authorization is not None:
            headers.setRawHeaders("authorization", [authorization])
        producer: Any = None
        if fields is not None or raw is not None:
            headers.setRawHeaders("content-type", ["application/x-www-form-urlencoded"])
            data = raw if raw is not None else urlencode(fields or {}).encode("utf-8")
            producer = FileBodyProducer(BytesIO(data))
        response = await self.agent.request(
            method.encode(), (self.origin + path).encode(), headers, producer
        )
        body = await read_body(response)
        for line in response.headers.getRawHeaders("set-cookie") or []:
            name, _, rest = line.partition("=")
            value = rest.split(";", 1)[0]
            if "max-age=0" in line.lower() or not value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return Page(response.code, body.decode("utf-8", "replace"), response.headers)

    async def get(self, path: str, **options: Any) -> Page:
        return await self.request("GET", path, **options)

    async def post(self, path: str, fields: dict[str, str], **options: Any) -> Page:
        return await self.request("POST", path, fields, **options)

    async def login(self, key: str = ADMIN_KEY) -> Page:
        form = await self.get("/admin/ui/login")
        return await self.post("/admin/ui/login", {"csrf": form.csrf, "admin_key": key})

    async def submit(self, page_path: str, action: str, fields: dict[str, str]) -> Page:
        """Post ``fields`` to ``action`` with the token of the page at ``page_path``."""
        token = (await self.get(page_path)).csrf
        return await self.post(action, {"csrf": token, **fields})
