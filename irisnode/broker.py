"""The node's messaging semantics among the endpoints attached to it.

Pure: no sockets, no clock reads. Time arrives as ``now``; the owner calls
:meth:`Broker.on_timer` at :meth:`Broker.next_deadline` (the ``wake`` callback
says when that moves earlier).

Guarantees kept here:

* a request goes to exactly one member, the one with the fewest requests in
  flight (ties broken round robin, congested members last), and its origin hears
  exactly one outcome: the reply, the fault (even an empty one), or a timeout —
  when the deadline passes, when the chosen member goes away before answering,
  or when the node shuts down. A request for a cluster without members waits for
  one until its deadline. Late answers are dropped quietly;
* a broadcast reaches every member of the cluster once, the sender included;
* an event reaches every subscriber of the topic once;
* a tunnel offer is withdrawn, and only that tunnel fails, when the member does
  not accept it within :data:`~irisnode.api.TUNNEL_CONFIRM_SECONDS`.

What it holds is bounded (:class:`~irisnode.limits.MessagingLimits`): a request's
timeout is at most ``max_timeout_ms``; a request counts against the node-wide
request budget from its arrival until its outcome (the relay stops reading from
requesters while the budget is spent); work for a cluster whose members are all
congested waits here, counted, instead of piling up in their buffers; whatever an
endpoint originated ends when it detaches; an endpoint subscribes to at most
``max_subscriptions`` topics.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from irisnode import tunnel
from irisnode.api import TUNNEL_CONFIRM_SECONDS, is_reserved
from irisnode.limits import REQUEST_OVERHEAD, MessagingLimits
from relay.ports import (
    DEFAULT_CHUNK_LIMIT,
    ByteBudget,
    LimitExceeded,
    Member,
    Party,
    Requester,
    Subscriber,
    TunnelEnd,
    TunnelParty,
)

_CONGESTION_PENALTY = 1 << 30
UNMEASURED_SERVICE = 0.01
"""Service time assumed for a member that has not answered yet (seconds)."""
MIN_SERVICE = 0.0001
"""Faster answers count as this fast (a ceiling on one member's weight)."""


class _Attachment:
    """Broker-side state of one endpoint."""

    __slots__ = ("assigned", "cluster", "endpoint", "offers", "requests", "service", "topics")

    def __init__(self, endpoint: Party, cluster: str) -> None:
        self.endpoint: Any = endpoint
        """Whatever roles it plays: the broker only calls a role's methods on the
        endpoints it uses in that role (members, origins, subscribers, tunnel parties)."""
        self.cluster = cluster
        self.assigned: dict[int, _Request | _Offer] = {}  # unanswered work given to this member
        self.requests: dict[int, _Request] = {}  # its own requests in flight, by handle
        self.offers: dict[int, _Offer] = {}  # its own tunnels being built, by its tunnel id
        self.topics: set[str] = set()
        self.service = 0.0  # recent time to answer a request, seconds (0: not known yet)


class _Request:
    __slots__ = (
        "cluster",
        "done",
        "handle",
        "member",
        "origin",
        "payload",
        "request_id",
        "sent_at",
        "size",
        "timeout_ms",
    )

    def __init__(
        self,
        handle: int,
        cluster: str,
        origin: _Attachment,
        request_id: int,
        payload: bytes,
        timeout_ms: int,
        sent_at: float,
    ) -> None:
        self.handle = handle
        self.cluster = cluster
        self.origin = origin
        self.request_id = request_id
        self.payload = payload  # until delivered: then the member's connection holds it
        self.size = len(payload) + REQUEST_OVERHEAD  # what it counts against the budget
        self.timeout_ms = timeout_ms
        self.sent_at = sent_at
        self.member: _Attachment | None = None
        self.done = False


class _Offer:
    __slots__ = ("cluster", "done", "handle", "member", "origin", "tunnel_id")

    def __init__(self, handle: int, cluster: str, origin: _Attachment, tunnel_id: int) -> None:
        self.handle = handle
        self.cluster = cluster
        self.origin = origin
        self.tunnel_id = tunnel_id
        self.member: _Attachment | None = None
        self.done = False


_Item = TypeVar("_Item", "_Request", "_Offer")


@dataclass
class _Cluster:
    members: list[_Attachment] = field(default_factory=list)
    turn: int = 0
    waiting: OrderedDict[int, _Request | _Offer] = field(default_factory=OrderedDict)
    """Parked, oldest first, by handle: no member yet, or every member congested."""


class Broker:
    """Clusters, topics, requests and tunnels for the endpoints of one node."""

    def __init__(
        self,
        limits: MessagingLimits | None = None,
        *,
        wake: Callable[[float], None] = lambda deadline: None,
        chunk_limit: int = DEFAULT_CHUNK_LIMIT,
        confirm_seconds: float = TUNNEL_CONFIRM_SECONDS,
    ) -> None:
        self.limits = limits = limits or MessagingLimits()
        self.request_budget = ByteBudget(limits.max_request_bytes)
        """Request bytes held; the relay also takes from it for requests still arriving."""
        self._wake = wake
        self._chunk_limit = chunk_limit
        self._confirm_seconds = confirm_seconds
        self._attachments: dict[Party, _Attachment] = {}
        self._clusters: dict[str, _Cluster] = {}
        self._topics: dict[str, dict[Subscriber, None]] = {}
        self._pending: dict[int, _Request | _Offer] = {}  # by handle, until answered or expired
        self._deadlines: list[tuple[float, int, _Request | _Offer]] = []
        self._next_handle = 0
        self._finished_early = 0  # finished items still in the deadline heap (roughly)
        self.counters = {
            "requests": 0,
            "replies": 0,
            "faults": 0,
            "timeouts": 0,
            "late": 0,
            "withdrawn": 0,
        }

    # -- attachment ------------------------------------------------------------------

    def attach(self, endpoint: Party, cluster: str) -> None:
        if endpoint in self._attachments:
            raise ValueError("endpoint is already attached")
        attachment = _Attachment(endpoint, cluster)
        self._attachments[endpoint] = attachment
        if cluster:
            group = self._clusters.setdefault(cluster, _Cluster())
            group.members.append(attachment)
            self._dispatch_waiting(group)

    def detach(self, endpoint: Party, reason: str) -> None:
        attachment = self._attachments.pop(endpoint, None)
        if attachment is None:
            return
        # What it asked for ends with it: parked work is dropped, and an answer to work
        # already delivered will find nothing to answer.
        originated: list[_Request | _Offer] = [*attachment.requests.values()]
        originated += attachment.offers.values()
        for item in originated:
            self._withdraw(item)
        if attachment.cluster:
            group = self._clusters[attachment.cluster]
            group.members.remove(attachment)
            if not group.members and not group.waiting:
                del self._clusters[attachment.cluster]
        for item in list(attachment.assigned.values()):
            self._expire(item)
        for topic in attachment.topics:
            subscribers = self._topics[topic]
            del subscribers[attachment.endpoint]  # it subscribed: it is a Subscriber
            if not subscribers:
                del self._topics[topic]

    @property
    def endpoints(self) -> int:
        return len(self._attachments)

    # -- what the messaging core asks about local interest ------------------------------

    @property
    def confirm_seconds(self) -> float:
        return self._confirm_seconds

    def clusters(self) -> list[str]:
        """Clusters with members (or requests waiting for one) here."""
        return list(self._clusters)

    def topics(self) -> list[str]:
        """Topics with subscribers here."""
        return list(self._topics)

    def members(self, cluster: str) -> int:
        group = self._clusters.get(cluster)
        return 0 if group is None else len(group.members)

    def interests(self, endpoint: Party) -> tuple[str, frozenset[str]]:
        """The cluster ``endpoint`` is a member of (or "") and the topics it follows."""
        attachment = self._attachments.get(endpoint)
        if attachment is None:
            return "", frozenset()
        return attachment.cluster, frozenset(attachment.topics)

    def capacity(self, cluster: str, now: float) -> float:
        """How many requests per second this node's members of ``cluster`` could take.

        Each member counts the rate its recent answers show: 1 / service time, where
        the service time is the recent average (:data:`UNMEASURED_SERVICE` until it has
        answered) or, if longer, the age of the oldest request it has not answered yet,
        so a member that falls behind or stops answering loses weight as its backlog
        ages, while a burst of new work changes nothing until it is late. A member
        that is not reading what it is sent counts a tenth. Other nodes weigh their
        anycasts by it, so a busy or slow member here loses to an idle one elsewhere.
        """
        group = self._clusters.get(cluster)
        if group is None:
            return 0.0
        total = 0.0
        for member in group.members:
            service = member.service or UNMEASURED_SERVICE
            for item in member.assigned.values():
                if isinstance(item, _Request):
                    service = max(service, now - item.sent_at)
                    break  # the oldest: dicts keep insertion order
            rate = 1.0 / max(service, MIN_SERVICE)
            total += rate * 0.1 if member.endpoint.congested else rate
        return total

    # -- request / reply ----------------------------------------------------------

    def request(
        self,
        origin: Requester,
        request_id: int,
        cluster: str,
        request: bytes,
        timeout_ms: int,
        now: float,
    ) -> None:
        self.counters["requests"] += 1
        if timeout_ms <= 0:
            self.counters["timeouts"] += 1
            origin.request_timed_out(request_id)
            return
        group = self._clusters.get(cluster)
        if group is None:
            if is_reserved(cluster):
                self.counters["faults"] += 1
                origin.request_faulted(request_id, f"no node service named {cluster[:64]!r}")
                return
            group = self._clusters[cluster] = _Cluster()
        timeout_ms = min(timeout_ms, self.limits.max_timeout_ms)
        handle = self._new_handle()
        attachment = self._attachments[origin]
        pending = _Request(handle, cluster, attachment, request_id, request, timeout_ms, now)
        self._pending[handle] = pending
        attachment.requests[handle] = pending
        self.request_budget.take(pending.size, origin)
        self._add_deadline(now + timeout_ms / 1000.0, pending)
        self._dispatch(group, pending)

    def reply(self, member: Member, handle: int, reply: bytes, now: float | None = None) -> None:
        """``now`` (when known) times the member's service (see :meth:`capacity`)."""
        pending = self._answer(member, handle, _Request, now)
        if pending is not None:
            self.counters["replies"] += 1
            pending.origin.endpoint.request_replied(pending.request_id, reply)

    def fault(self, member: Member, handle: int, fault: str, now: float | None = None) -> None:
        pending = self._answer(member, handle, _Request, now)
        if pending is not None:
            self.counters["faults"] += 1
            pending.origin.endpoint.request_faulted(pending.request_id, fault)

    def _answer(
        self, member: Party, handle: int, kind: type[_Item], now: float | None = None
    ) -> _Item | None:
        """The live item ``member`` answers, now finished; None for a late or foreign one."""
        pending = self._pending.get(handle)
        if (
            not isinstance(pending, kind)
            or pending.member is None
            or pending.member.endpoint is not member
        ):
            self.counters["late"] += 1
            return None
        if now is not None and isinstance(pending, _Request):
            sample = max(now - pending.sent_at, 0.0)
            old = pending.member.service
            pending.member.service = sample if old == 0.0 else old + (sample - old) * 0.2
        self._finish(pending)
        return pending

    def _expire(self, item: _Request | _Offer) -> None:
        """No answer in time, or none will come: the origin hears it now."""
        self._finish(item)
        if isinstance(item, _Request):
            self.counters["timeouts"] += 1
            item.origin.endpoint.request_timed_out(item.request_id)
        else:
            item.origin.endpoint.tunnel_failed(item.tunnel_id)

    # -- broadcast and topics -----------------------------------------------------

    def broadcast(self, cluster: str, message: bytes) -> None:
        group = self._clusters.get(cluster)
        if group is not None:
            for member in group.members:
                member.endpoint.deliver_broadcast(message)

    def subscribe(self, endpoint: Subscriber, topic: str) -> None:
        topics = self._attachments[endpoint].topics
        if topic in topics:
            return
        if len(topics) >= self.limits.max_subscriptions:
            raise LimitExceeded(
                f"more than {self.limits.max_subscriptions} subscriptions on one connection"
            )
        topics.add(topic)
        self._topics.setdefault(topic, {})[endpoint] = None

    def unsubscribe(self, endpoint: Subscriber, topic: str) -> bool:
        topics = self._attachments[endpoint].topics
        if topic not in topics:
            return False
        topics.discard(topic)
        subscribers = self._topics[topic]
        del subscribers[endpoint]
        if not subscribers:
            del self._topics[topic]
        return True

    def subscribers(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def publish(self, topic: str, event: bytes) -> None:
        subscribers = self._topics.get(topic)
        if subscribers is not None:
            for endpoint in subscribers:
                endpoint.deliver_event(topic, event)

    # -- tunnels -----------------------------------------------------------------

    def open_tunnel(
        self, origin: TunnelParty, tunnel_id: int, cluster: str, timeout_ms: int, now: float
    ) -> None:
        group = self._clusters.get(cluster)
        if timeout_ms <= 0 or (group is None and is_reserved(cluster)):
            origin.tunnel_failed(tunnel_id)
            return
        if group is None:
            group = self._clusters[cluster] = _Cluster()
        attachment = self._attachments[origin]
        offer = _Offer(self._new_handle(), cluster, attachment, tunnel_id)
        self._pending[offer.handle] = offer
        attachment.offers[tunnel_id] = offer
        self._add_deadline(now + min(timeout_ms / 1000.0, self._confirm_seconds), offer)
        self._dispatch(group, offer)

    def cancel_tunnel(self, origin: TunnelParty, tunnel_id: int) -> None:
        attachment = self._attachments.get(origin)
        offer = attachment.offers.get(tunnel_id) if attachment is not None else None
        if offer is not None:
            self._withdraw(offer)

    def confirm_tunnel(self, member: TunnelParty, offer: int, tunnel_id: int) -> TunnelEnd | None:
        pending = self._answer(member, offer, _Offer)
        if pending is None:
            return None
        origin = pending.origin.endpoint
        near, far = tunnel.connect(origin, pending.tunnel_id, member, tunnel_id)
        origin.tunnel_opened(pending.tunnel_id, near, self._chunk_limit)
        origin.tunnel_allow(pending.tunnel_id, near.window)
        member.tunnel_allow(tunnel_id, far.window)
        return far

    # -- dispatch and time -----------------------------------------------------------

    def caught_up(self, endpoint: Party) -> None:
        attachment = self._attachments.get(endpoint)
        if attachment is not None and attachment.cluster:
            group = self._clusters.get(attachment.cluster)
            if group is not None and group.waiting:
                self._dispatch_waiting(group)

    def _dispatch(self, group: _Cluster, item: _Request | _Offer) -> None:
        """Hand ``item`` to the least busy member, or park it until one can take it."""
        member = self._choose(group) if not group.waiting else None
        if member is None:
            group.waiting[item.handle] = item
        else:
            self._deliver(member, item)

    def _dispatch_waiting(self, group: _Cluster) -> None:
        """Hand parked work out, oldest first, for as long as a member can take it."""
        waiting = group.waiting
        while waiting:
            member = self._choose(group)
            if member is None:
                return
            _, item = waiting.popitem(last=False)
            self._deliver(member, item)

    @staticmethod
    def _choose(group: _Cluster) -> _Attachment | None:
        """The member with the fewest requests in flight (ties in turn); None if every one
        is congested, since what is sent to it would only wait in its buffer."""
        members = group.members
        count = len(members)
        if count == 0:
            return None
        if count == 1:
            member = members[0]
            return None if member.endpoint.congested else member
        group.turn = start = (group.turn + 1) % count
        member = members[start]
        best = len(member.assigned) + (_CONGESTION_PENALTY if member.endpoint.congested else 0)
        for step in range(1, count):
            if best == 0:
                break
            candidate = members[(start + step) % count]
            load = len(candidate.assigned)
            if candidate.endpoint.congested:
                load += _CONGESTION_PENALTY
            if load < best:
                member, best = candidate, load
        return None if best >= _CONGESTION_PENALTY else member

    def _deliver(self, member: _Attachment, item: _Request | _Offer) -> None:
        item.member = member
        member.assigned[item.handle] = item
        if isinstance(item, _Request):
            payload, item.payload = item.payload, b""
            member.endpoint.deliver_request(item.handle, payload, item.timeout_ms)
        else:
            member.endpoint.offer_tunnel(item.handle, self._chunk_limit)

    def _new_handle(self) -> int:
        self._next_handle += 1
        return self._next_handle

    def _withdraw(self, item: _Request | _Offer) -> None:
        """End ``item`` with no outcome: its origin has gone or gave up on it."""
        self._finish(item)
        self.counters["withdrawn"] += 1

    def _finish(self, item: _Request | _Offer) -> None:
        """Mark ``item`` done: it leaves every table, its deadline becomes moot."""
        item.done = True
        self._pending.pop(item.handle, None)
        origin = item.origin
        if isinstance(item, _Request):
            del origin.requests[item.handle]
        elif origin.offers.get(item.tunnel_id) is item:
            del origin.offers[item.tunnel_id]
        if item.member is not None:
            item.member.assigned.pop(item.handle, None)
        else:
            group = self._clusters[item.cluster]
            del group.waiting[item.handle]
            if not group.members and not group.waiting:
                del self._clusters[item.cluster]
        if isinstance(item, _Request):
            item.payload = b""
            self.request_budget.give(item.size, origin.endpoint)  # may let requesters read again
        self._finished_early += 1
        heap = self._deadlines
        if self._finished_early > 1024 and self._finished_early * 2 > len(heap):
            # Answered requests linger in the heap until their deadline; drop them in bulk
            # so a busy node does not hold a timeout's worth of finished work.
            heap[:] = [entry for entry in heap if not entry[2].done]
            heapq.heapify(heap)
            self._finished_early = 0

    def _add_deadline(self, deadline: float, item: _Request | _Offer) -> None:
        heap = self._deadlines
        if not heap or deadline < heap[0][0]:
            self._wake(deadline)
        heapq.heappush(heap, (deadline, item.handle, item))

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def on_timer(self, now: float) -> None:
        """Expire every request and tunnel offer whose deadline has passed."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, item = heapq.heappop(heap)
            if not item.done:
                self._expire(item)

    def shut_down(self) -> None:
        """Give every pending request and tunnel offer its outcome now: the node is going away."""
        for _, _, item in sorted(self._deadlines):
            if not item.done:
                self._expire(item)
        self._deadlines.clear()
