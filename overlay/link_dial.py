"""Dialling for :class:`overlay.link_twisted.LinkService` (docs/wire-link.md §6).

A :class:`Dialer` keeps trying one address with jittered backoff. It runs in one
of two modes:

* **persistent** (``LinkService.connect``, seeds): re-dial for ever; after a link
  that lost the duplicate rule, wait until that peer has no link, then dial again;
* **one-shot** (``LinkService.send(..., dial_to=)``): reach one expected peer by a
  deadline; once its link is up, or the deadline passed, it dials no more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IAddress, IConnector, IDelayedCall
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from overlay.link import Reason
from overlay.link_policy import Backoff

if TYPE_CHECKING:
    from overlay.link_twisted import Link, LinkService

_log = Logger(namespace="overlay.link")


class _DialingFactory(ClientFactory):
    noisy = False

    def __init__(self, dialer: Dialer) -> None:
        self.dialer = dialer

    def buildProtocol(self, addr: IAddress | None) -> Link:
        dialer = self.dialer
        link = dialer.service._outgoing_link(dialer)
        dialer.link = link
        return link

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.dialer._connection_failed(reason)


class Dialer:
    """Dials one address until a link is up, re-dialing with jittered backoff (§6)."""

    def __init__(
        self,
        service: LinkService,
        host: str,
        port: int,
        expected_peer: int | None,
        *,
        one_shot: bool = False,
    ) -> None:
        self.service = service
        self.host = host
        self.port = port
        self.expected_peer = expected_peer
        self.one_shot = one_shot
        self.link: Link | None = None
        self.parked_on: int | None = None
        self.stopped = False
        self.last_failure: str | None = None
        """Why the last attempt failed (None once linked): what ``irisnode status`` shows."""
        self.backoff = Backoff(
            service.rng, initial=service.backoff_initial, cap=service.backoff_cap
        )
        self._timer: IDelayedCall | None = None
        self._connector: IConnector | None = None

    def start(self) -> None:
        self._dial()

    def stop(self) -> None:
        """Dial no more; an established link stays up, one still in its handshake is closed."""
        self.stopped = True
        self.parked_on = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        link = self.link
        if link is None:
            if self._connector is not None:
                self._connector.stopConnecting()
        elif link.peer is None:
            link.close()

    def _dial(self) -> None:
        self._timer = None
        self.parked_on = None
        if self.stopped:
            return
        self.link = None
        self._connector = self.service.reactor.connectTCP(
            self.host,
            self.port,
            _DialingFactory(self),
            timeout=max(1, round(self.service.handshake_timeout)),
        )

    def _retry_later(self) -> None:
        if self.stopped or self._timer is not None:
            return
        delay = self.backoff.next_delay()
        _log.debug(
            "redial {host}:{port} in {delay:.2f}s", host=self.host, port=self.port, delay=delay
        )
        self._timer = self.service.clock.callLater(delay, self._dial)

    def _connection_failed(self, reason: Failure) -> None:
        self.last_failure = reason.getErrorMessage()
        _log.info(
            "dial failed: {host}:{port}: {error}",
            host=self.host,
            port=self.port,
            error=self.last_failure,
        )
        self._connector = None
        self._retry_later()

    def _established(self, link: Link) -> None:
        self.backoff.reset()
        self.last_failure = None
        if self.one_shot:
            self.stopped = True

    def _link_ended(self, link: Link, reason: Reason) -> None:
        if link is not self.link:
            return
        self.link = None
        self._connector = None
        if link.peer is None or reason not in (Reason.CLOSED, Reason.DUPLICATE_LINK):
            self.last_failure = str(reason)
        if self.stopped:
            return
        peer = link.peer_node_id
        if peer is not None and peer in self.service.links:
            self.parked_on = peer  # another link to the same node won; wait for it to end
            return
        self._retry_later()

    def _peer_unlinked(self, peer_id: int) -> None:
        if self.parked_on == peer_id:
            self.parked_on = None
            self._retry_later()
