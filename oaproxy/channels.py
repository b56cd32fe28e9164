"""Where alerts go: Feishu custom bots and Matrix rooms, as HTTP requests.

A channel only builds the request that posts one message, and says what its
answer means; ``oaproxy.alerts.Notifier`` sends them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

from attrs import field, frozen

from oaproxy.credentials import hide_key_shapes
from oaproxy.inspection import json_object

if TYPE_CHECKING:
    # Only attributes are read from the config objects, so the import is for
    # the type checker alone.
    from oaproxy.config import FeishuConfig, MatrixConfig, NotifyConfig

__all__ = [
    "AlertChannel",
    "ChannelRequest",
    "FeishuChannel",
    "LegacyMatrixChannel",
    "MatrixChannel",
    "alert_channels",
    "answer_problem",
    "feishu_sign",
]


@frozen
class ChannelRequest:
    """One HTTP request that delivers a message; its URL may hold a token."""

    method: str
    url: str = field(repr=False)
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(factory=dict, repr=False)


class AlertChannel(Protocol):
    """A place alerts go to: builds the request for one message."""

    @property
    def name(self) -> str:
        """Counter key and log name: "feishu" or "matrix"."""

    @property
    def kind(self) -> str:
        """Either "feishu" or "matrix"; the config's channel wins over the env's."""

    @property
    def host(self) -> str:
        """The only part of the URL that is safe to log."""

    def request(self, text: str, now: float, txn_id: str) -> ChannelRequest:
        """The request that posts ``text``."""


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def feishu_sign(timestamp: int, secret: str) -> str:
    """
    Feishu's custom-bot signature: the key is "timestamp\\nsecret" and the
    message is empty, as the Feishu documentation specifies.
    """
    string_to_sign = f"{timestamp}\n{secret}".encode()
    digest = hmac.new(string_to_sign, b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


@frozen
class FeishuChannel:
    """A Feishu custom bot webhook (the URL's last segment is its token)."""

    webhook: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)
    name: str = "feishu"
    kind: str = "feishu"

    @property
    def host(self) -> str:
        return _host(self.webhook)

    def request(self, text: str, now: float, txn_id: str) -> ChannelRequest:
        body: dict[str, Any] = {"msg_type": "text", "content": {"text": text}}
        if self.secret:
            timestamp = int(now)
            body["timestamp"] = str(timestamp)
            body["sign"] = feishu_sign(timestamp, self.secret)
        return ChannelRequest("POST", self.webhook, body)


@frozen
class MatrixChannel:
    """A room, through the Matrix client-server API's send endpoint."""

    homeserver: str
    access_token: str = field(repr=False)
    room_id: str
    name: str = "matrix"
    kind: str = "matrix"

    @property
    def host(self) -> str:
        return _host(self.homeserver)

    def request(self, text: str, now: float, txn_id: str) -> ChannelRequest:
        url = (
            f"{self.homeserver.rstrip('/')}/_matrix/client/v3/rooms/"
            f"{quote(self.room_id, safe='')}/send/m.room.message/"
            f"{quote(txn_id, safe='')}"
        )
        return ChannelRequest(
            "PUT",
            url,
            {"msgtype": "m.text", "body": text},
            {"Authorization": f"Bearer {self.access_token}"},
        )


@frozen
class LegacyMatrixChannel:
    """
    openai-api-route's ``MATRIX_API``: one full URL that already names the
    room and carries the access token (``?access_token=…``).

    The Go code POSTed the message to that URL as is; the room send endpoint
    without a transaction id is deprecated, so when the URL ends with
    ``/send/m.room.message`` a transaction id is appended and the message PUT,
    as the client-server API wants.  Any other URL (a webhook bridge) still
    gets the POST.  openai-api-route read no other Matrix variable, so neither
    does this.  The body is the proper ``m.text`` content (the Go code sent
    ``"message": "m.text"``, which Matrix ignores).
    """

    url: str = field(repr=False)
    name: str = "matrix"
    kind: str = "matrix"

    @property
    def host(self) -> str:
        return _host(self.url)

    def request(self, text: str, now: float, txn_id: str) -> ChannelRequest:
        body = {"msgtype": "m.text", "body": text}
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/")
        if path.endswith("/send/m.room.message"):
            path = f"{path}/{quote(txn_id, safe='')}"
            return ChannelRequest("PUT", urlunsplit(parts._replace(path=path)), body)
        return ChannelRequest("POST", self.url, body)


def alert_channels(
    config: NotifyConfig | None, environ: Mapping[str, str]
) -> tuple[AlertChannel, ...]:
    """
    The channels of ``notify:`` plus openai-api-route's environment variables
    ``FEISHU_WEBHOOK`` and ``MATRIX_API``; the config wins over the
    environment for the same kind of channel.
    """
    channels: list[AlertChannel] = []
    feishu: FeishuConfig | None = config.feishu if config is not None else None
    matrix: MatrixConfig | None = config.matrix if config is not None else None
    if feishu is not None:
        channels.append(FeishuChannel(feishu.webhook, feishu.secret or None))
    elif environ.get("FEISHU_WEBHOOK", "").strip():
        channels.append(FeishuChannel(environ["FEISHU_WEBHOOK"].strip()))
    if matrix is not None:
        channels.append(MatrixChannel(matrix.homeserver, matrix.access_token, matrix.room_id))
    elif environ.get("MATRIX_API", "").strip():
        channels.append(LegacyMatrixChannel(environ["MATRIX_API"].strip()))
    return tuple(channels)


def answer_problem(channel: AlertChannel, code: int, body: bytes) -> str | None:
    """Why an answer is not a success, in words safe to log; None if it is."""
    answer = json_object(body)
    if not 200 <= code < 300:
        # Matrix errcodes (M_FORBIDDEN…) are fixed names, safe to log.
        errcode = answer.get("errcode")
        detail = f" {errcode[:64]}" if isinstance(errcode, str) else ""
        return f"HTTP {code}{detail}"
    if channel.kind == "feishu":
        # Feishu answers 200 with a non-zero code for a bad sign, an unknown
        # bot or a rate limit (older deployments used StatusCode).
        feishu_code = answer.get("code", answer.get("StatusCode", 0))
        if feishu_code not in (0, None):
            message = answer.get("msg", answer.get("StatusMessage", ""))
            return f"Feishu code {feishu_code}: {hide_key_shapes(str(message))[:200]}"
    return None
