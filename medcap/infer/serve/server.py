"""Running the app on uvicorn with time limits a slow or idle client cannot hold open.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not a request whose
headers never finish: a client that opens a connection and sends one header byte a minute keeps
it (and its socket and task) forever, and a few thousand such clients exhaust the server. The
protocol here closes a connection whose request headers are not complete within
``header_timeout_s`` of the connection (or of the previous response, on a kept-alive connection).
A body that stalls is the app's to bound (``BodyLimitMiddleware`` answers 408).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("medcap.serve")


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers take too long."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_in_progress():
            self._disarm_header_timer()  # the headers are complete: the app has the request now
        elif self._header_timer is None:
            self._arm_header_timer()  # the first bytes of the next request on a kept-alive connection

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm_header_timer()  # uvicorn's keep-alive timeout covers the idle time from here

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._request_in_progress() or self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info(
            "closing the connection of %s: no complete request headers in %.0f s",
            client,
            self.header_timeout_s,
        )
        self.transport.close()


def protocol_with_header_timeout(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class uvicorn takes as ``http=``, with this header timeout."""
    return type(
        "MedcapH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": float(header_timeout_s)}
    )


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    *,
    header_timeout_s: float,
    keep_alive_s: float,
    log_level: str = "info",
    **more: Any,
):
    """The uvicorn Config ``medcap serve`` runs: the h11 protocol with the header timeout and an idle
    keep-alive timeout (``more``: other uvicorn settings, e.g. ``log_config=None`` in tests)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol_with_header_timeout(header_timeout_s),
        timeout_keep_alive=max(1, round(keep_alive_s)),
        **more,
    )


__all__ = ["HeaderTimeoutH11Protocol", "protocol_with_header_timeout", "uvicorn_config"]
