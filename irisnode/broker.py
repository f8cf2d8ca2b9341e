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
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from irisnode import tunnel
from irisnode.api import DEFAULT_CHUNK_LIMIT, TUNNEL_CONFIRM_SECONDS, Endpoint, TunnelEnd

_CONGESTION_PENALTY = 1 << 30
UNMEASURED_SERVICE = 0.01
"""Service time assumed for a member that has not answered yet (seconds)."""
MIN_SERVICE = 0.0001
"""Faster answers count as this fast (a ceiling on one member's weight)."""


class _Attachment:
    """Broker-side state of one endpoint."""

    __slots__ = ("alive", "assigned", "cluster", "endpoint", "service", "topics")

    def __init__(self, endpoint: Endpoint, cluster: str) -> None:
        self.endpoint = endpoint
        self.cluster = cluster
        self.alive = True
        self.assigned: dict[int, _Request | _Offer] = {}  # unanswered work given to this member
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
        self.payload = payload
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
    waiting: dict[int, _Request | _Offer] = field(default_factory=dict)  # parked, by handle


class Broker:
    """Clusters, topics, requests and tunnels for the endpoints of one node."""

    def __init__(
        self,
        *,
        wake: Callable[[float], None] = lambda deadline: None,
        chunk_limit: int = DEFAULT_CHUNK_LIMIT,
        confirm_seconds: float = TUNNEL_CONFIRM_SECONDS,
    ) -> None:
        self._wake = wake
        self._chunk_limit = chunk_limit
        self._confirm_seconds = confirm_seconds
        self._attachments: dict[Endpoint, _Attachment] = {}
        self._clusters: dict[str, _Cluster] = {}
        self._topics: dict[str, dict[Endpoint, None]] = {}
        self._pending: dict[int, _Request | _Offer] = {}  # by handle, until answered or expired
        self._deadlines: list[tuple[float, int, _Request | _Offer]] = []
        self._next_handle = 0
        self._finished_early = 0  # finished items still in the deadline heap (roughly)
        self.counters = {"requests": 0, "replies": 0, "faults": 0, "timeouts": 0, "late": 0}

    # -- attachment ------------------------------------------------------------------

    def attach(self, endpoint: Endpoint, cluster: str) -> None:
        if endpoint in self._attachments:
            raise ValueError("endpoint is already attached")
        attachment = _Attachment(endpoint, cluster)
        self._attachments[endpoint] = attachment
        if cluster:
            group = self._clusters.setdefault(cluster, _Cluster())
            group.members.append(attachment)
            waiting, group.waiting = group.waiting, {}
            for item in waiting.values():
                self._dispatch(group, item)

    def detach(self, endpoint: Endpoint, reason: str) -> None:
        attachment = self._attachments.pop(endpoint, None)
        if attachment is None:
            return
        attachment.alive = False
        if attachment.cluster:
            group = self._clusters[attachment.cluster]
            group.members.remove(attachment)
            if not group.members and not group.waiting:
                del self._clusters[attachment.cluster]
        for item in list(attachment.assigned.values()):
            self._expire(item)
        for topic in attachment.topics:
            subscribers = self._topics[topic]
            del subscribers[endpoint]
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

    def interests(self, endpoint: Endpoint) -> tuple[str, frozenset[str]]:
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
        origin: Endpoint,
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
        handle = self._new_handle()
        pending = _Request(
            handle, cluster, self._attachments[origin], request_id, request, timeout_ms, now
        )
        self._pending[handle] = pending
        self._add_deadline(now + timeout_ms / 1000.0, pending)
        group = self._clusters.get(cluster)
        if group is None:
            group = self._clusters[cluster] = _Cluster()
        self._dispatch(group, pending)

    def reply(self, member: Endpoint, handle: int, reply: bytes, now: float | None = None) -> None:
        """``now`` (when known) times the member's service (see :meth:`capacity`)."""
        pending = self._answer(member, handle, _Request, now)
        if pending is not None:
            self.counters["replies"] += 1
            pending.origin.endpoint.request_replied(pending.request_id, reply)

    def fault(self, member: Endpoint, handle: int, fault: str, now: float | None = None) -> None:
        pending = self._answer(member, handle, _Request, now)
        if pending is not None:
            self.counters["faults"] += 1
            pending.origin.endpoint.request_faulted(pending.request_id, fault)

    def _answer(
        self, member: Endpoint, handle: int, kind: type[_Item], now: float | None = None
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
        del self._pending[handle]
        del pending.member.assigned[handle]
        if now is not None and isinstance(pending, _Request):
            sample = max(now - pending.sent_at, 0.0)
            old = pending.member.service
            pending.member.service = sample if old == 0.0 else old + (sample - old) * 0.2
        self._finish(pending)
        return pending if pending.origin.alive else None

    def _expire(self, item: _Request | _Offer) -> None:
        """No answer in time, or none will come: the origin hears it now."""
        self._finish(item)
        self._pending.pop(item.handle, None)
        if item.member is not None:
            item.member.assigned.pop(item.handle, None)
        if not item.origin.alive:
            return
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

    def subscribe(self, endpoint: Endpoint, topic: str) -> None:
        self._topics.setdefault(topic, {})[endpoint] = None
        self._attachments[endpoint].topics.add(topic)

    def unsubscribe(self, endpoint: Endpoint, topic: str) -> bool:
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

    def group_sizes(self) -> tuple[dict[str, int], dict[str, int]]:
        """Members per cluster (0 while requests wait for one) and subscribers per topic."""
        clusters = {name: len(group.members) for name, group in self._clusters.items()}
        return clusters, {topic: len(subscribers) for topic, subscribers in self._topics.items()}

    def publish(self, topic: str, event: bytes) -> None:
        subscribers = self._topics.get(topic)
        if subscribers is not None:
            for endpoint in subscribers:
                endpoint.deliver_event(topic, event)

    # -- tunnels -----------------------------------------------------------------

    def open_tunnel(
        self, origin: Endpoint, tunnel_id: int, cluster: str, timeout_ms: int, now: float
    ) -> None:
        if timeout_ms <= 0:
            origin.tunnel_failed(tunnel_id)
            return
        offer = _Offer(self._new_handle(), cluster, self._attachments[origin], tunnel_id)
        self._pending[offer.handle] = offer
        self._add_deadline(now + min(timeout_ms / 1000.0, self._confirm_seconds), offer)
        group = self._clusters.get(cluster)
        if group is None:
            group = self._clusters[cluster] = _Cluster()
        self._dispatch(group, offer)

    def confirm_tunnel(self, member: Endpoint, offer: int, tunnel_id: int) -> TunnelEnd | None:
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

    def _dispatch(self, group: _Cluster, item: _Request | _Offer) -> None:
        """Hand ``item`` to the least busy member, or park it until one attaches."""
        members = group.members
        count = len(members)
        if count == 0:
            group.waiting[item.handle] = item
            return
        if count == 1:
            member = members[0]
        else:
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
        item.member = member
        member.assigned[item.handle] = item
        if isinstance(item, _Request):
            member.endpoint.deliver_request(item.handle, item.payload, item.timeout_ms)
        else:
            member.endpoint.offer_tunnel(item.handle, self._chunk_limit)

    def _new_handle(self) -> int:
        self._next_handle += 1
        return self._next_handle

    def _finish(self, item: _Request | _Offer) -> None:
        """Mark ``item`` answered: it leaves its parking place, its deadline becomes moot."""
        item.done = True
        if isinstance(item, _Request):
            item.payload = b""
        if item.member is None:
            group = self._clusters[item.cluster]
            del group.waiting[item.handle]
            if not group.members and not group.waiting:
                del self._clusters[item.cluster]
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
