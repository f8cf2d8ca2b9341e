"""The messaging core: this node's broker, extended across nodes through Scribe.

Pure: every input carries ``now``; what must leave the node is returned (or, for
the calls the relay makes, left in :attr:`MessagingCore.outbox` for the adapter to
carry out); applications are reached through their endpoints, as the local
broker reaches them. Without an overlay (developer mode) every call goes
straight to the broker, exactly as on a node of one.

With an overlay (``attach_overlay``):

* **Membership.** This node is in a cluster's tree while it has at least one
  local member of the cluster, and in a topic's tree while it has at least one
  subscriber; it reports the cluster's capacity (its members' free capacity)
  to Scribe whenever it changes, so anycasts prefer idle members wherever they
  are, this node's included.
* **Requests** are keyed by (origin node, sequence) and ride an anycast with the
  time they have left; the member node hands them to its broker, whose answer
  comes straight back; the origin keeps the deadline, so each request ends in
  exactly one outcome there. A request that finds no member anywhere waits and
  asks again (backing off) until its deadline, like a request on one node.
* **Broadcasts and events** reach this node's members at once and the rest of
  the group through a multicast (which skips this node on its way down).
* **Tunnels** are opened by an anycast and then run between the two nodes on
  their link, as local tunnels to :class:`~irisnode.messaging.remote.RemoteParty`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from irisnode import tunnel
from irisnode.api import is_reserved
from irisnode.broker import Broker
from irisnode.messaging.deadlines import DeadlineHeap
from irisnode.messaging.messages import (
    ClusterBroadcast,
    ClusterFault,
    ClusterReply,
    ClusterRequest,
    TopicEvent,
    TunnelAccepted,
    TunnelCredit,
    TunnelData,
    TunnelEnded,
    TunnelOpen,
    TunnelRefused,
)
from irisnode.messaging.remote import RemoteParty
from overlay.ids import key_for
from overlay.pastry import Address, PeerDead, Send
from overlay.scribe import AnycastDelivered, AnycastFailed, GroupDelivered, ScribeCore
from overlay.stack import LinkDown, Received, Upcall
from relay.ports import (
    DEFAULT_CHUNK_LIMIT,
    Endpoint,
    Member,
    Party,
    Subscriber,
    TunnelEnd,
    TunnelParty,
)

CAPACITY_REFRESH = 0.25
"""How often this node's capacities are looked at again (reports go out only on change).

Requests and replies do not report on their own: a member's capacity comes from its
service time and the age of its oldest unanswered request, which a quarter-second
look follows closely enough, and looking on every request cost a node 6 % of its CPU."""
RETRY_FIRST = 0.02
RETRY_MAX = 0.25
"""A request no member could take asks again after 20 ms, doubling up to 250 ms."""


@lru_cache(maxsize=4096)
def cluster_key(name: str) -> int:
    """The Scribe group of a cluster (a hash: cached, requests ask for it all the time)."""
    return key_for("cluster", name)


@lru_cache(maxsize=4096)
def topic_key(name: str) -> int:
    return key_for("topic", name)


@dataclass(frozen=True, slots=True)
class GaveUp:
    """Effect: a request or tunnel opened here ended without an answer (for the log)."""

    kind: str
    cluster: str
    reason: str


@dataclass(slots=True, eq=False)
class _Pending:
    """A request or tunnel opened here and sent to another node, until its outcome."""

    seq: int
    origin: Endpoint
    origin_id: int
    """The application's request or tunnel id."""
    cluster: str
    is_tunnel: bool
    data: bytes
    """The request body, kept for asking again (empty for a tunnel, and once done)."""
    deadline: float
    retry_at: float = math.inf
    backoff: float = RETRY_FIRST
    no_member: bool = False
    """The last anycast found no member anywhere (what a timeout then means)."""
    done: bool = False

    @property
    def wake(self) -> float:
        return min(self.deadline, self.retry_at)


class MessagingCore:
    """Clusters, topics, requests and tunnels across nodes (an overlay upper layer)."""

    messages = (
        ClusterReply,
        ClusterFault,
        TunnelAccepted,
        TunnelRefused,
        TunnelData,
        TunnelCredit,
        TunnelEnded,
    )
    consumes = (GroupDelivered, AnycastDelivered, AnycastFailed)

    def __init__(self, broker: Broker, *, chunk_limit: int = DEFAULT_CHUNK_LIMIT) -> None:
        self.broker = broker
        self.chunk_limit = chunk_limit
        self.outbox: list[object] = []
        """Effects of the calls the relay makes, for the adapter to carry out."""
        self.on_output: Callable[[], None] = lambda: None
        """Called when an application's use of a tunnel to another node left effects
        in the outbox outside any call into this core (the adapter carries them out)."""
        self._scribe: ScribeCore | None = None
        self.node_id = 0
        self._remote: RemoteParty | None = None
        self._seq = 0
        self._next_refresh = 0.0
        self._pending: dict[int, _Pending] = {}
        self._deadlines: DeadlineHeap[_Pending] = DeadlineHeap(lambda p: not p.done)
        self.given_up: Counter[str] = Counter()
        """Requests and tunnels that ended without an answer, by why."""
        self.counters: dict[str, int] = {
            "remote_requests": 0,
            "remote_replies": 0,
            "remote_timeouts": 0,
            "retries": 0,
            "late_answers": 0,
            "broadcasts": 0,
            "events": 0,
            "broadcasts_from_other_nodes": 0,
            "events_from_other_nodes": 0,
        }

    # ----------------------------------------------------------------------------
    # Joining the overlay

    def attach_overlay(self, scribe: ScribeCore, address: Address, now: float) -> list[object]:
        """The overlay is up: join the trees of every cluster and topic with local interest."""
        self._scribe = scribe
        self.node_id = scribe.node_id
        self._remote = RemoteParty(scribe.node_id, address, self.outbox)
        self.broker.attach(self._remote, "")
        effects: list[object] = []
        for cluster in self.broker.clusters():
            if not is_reserved(cluster) and self.broker.members(cluster):
                effects += scribe.join(
                    cluster_key(cluster), now, self.broker.capacity(cluster, now)
                )
        for topic in self.broker.topics():
            effects += scribe.join(topic_key(topic), now)
        return effects

    @property
    def networked(self) -> bool:
        return self._scribe is not None

    # ----------------------------------------------------------------------------
    # What applications ask (through the relay), each with ``now``

    def attach(self, endpoint: Party, cluster: str, now: float) -> None:
        self.broker.attach(endpoint, cluster)
        if cluster:
            self._membership_changed(cluster, now)

    def detach(self, endpoint: Party, reason: str, now: float) -> None:
        cluster, topics = self.broker.interests(endpoint)
        self.broker.detach(endpoint, reason)
        for pending in [p for p in self._pending.values() if p.origin is endpoint]:
            self._finish(pending)  # its requests end with it; answers are dropped
        if cluster:
            self._membership_changed(cluster, now)
        for topic in topics:
            self._subscription_changed(topic, now)

    def request(
        self,
        origin: Endpoint,
        request_id: int,
        cluster: str,
        request: bytes,
        timeout_ms: int,
        now: float,
    ) -> None:
        if self._scribe is None or timeout_ms <= 0 or is_reserved(cluster):
            self.broker.request(origin, request_id, cluster, request, timeout_ms, now)
            self._capacity_changed(cluster, now)
            return
        deadline = now + timeout_ms / 1000
        pending = self._new_pending(origin, request_id, cluster, False, request, deadline)
        self._send(pending, now)

    def reply(self, member: Member, handle: int, reply: bytes, now: float) -> None:
        self.broker.reply(member, handle, reply, now)

    def fault(self, member: Member, handle: int, fault: str, now: float) -> None:
        self.broker.fault(member, handle, fault, now)

    def broadcast(self, cluster: str, message: bytes, now: float) -> None:
        self.counters["broadcasts"] += 1
        self.broker.broadcast(cluster, message)
        if self._scribe is not None and not is_reserved(cluster):
            payload = ClusterBroadcast(cluster, message)
            self.outbox += self._scribe.multicast(cluster_key(cluster), payload, now)

    def subscribe(self, endpoint: Subscriber, topic: str, now: float) -> None:
        self.broker.subscribe(endpoint, topic)
        self._subscription_changed(topic, now)

    def unsubscribe(self, endpoint: Subscriber, topic: str, now: float) -> bool:
        was = self.broker.unsubscribe(endpoint, topic)
        if was:
            self._subscription_changed(topic, now)
        return was

    def publish(self, topic: str, event: bytes, now: float) -> None:
        self.counters["events"] += 1
        self.broker.publish(topic, event)
        if self._scribe is not None:
            self.outbox += self._scribe.multicast(topic_key(topic), TopicEvent(topic, event), now)

    def open_tunnel(
        self, origin: Endpoint, tunnel_id: int, cluster: str, timeout_ms: int, now: float
    ) -> None:
        if self._scribe is None or timeout_ms <= 0 or is_reserved(cluster):
            self.broker.open_tunnel(origin, tunnel_id, cluster, timeout_ms, now)
            return
        timeout = min(timeout_ms / 1000, self.broker.confirm_seconds)
        pending = self._new_pending(origin, tunnel_id, cluster, True, b"", now + timeout)
        self._send(pending, now)

    def cancel_tunnel(self, origin: TunnelParty, tunnel_id: int, now: float) -> None:
        """The origin gives up a tunnel it is still building: no outcome follows.

        One sent to another node is forgotten here; if a member there accepts it
        anyway, its end is closed when the acceptance arrives.
        """
        for pending in self._pending.values():
            if pending.is_tunnel and pending.origin is origin and pending.origin_id == tunnel_id:
                self._finish(pending)
                return
        self.broker.cancel_tunnel(origin, tunnel_id)

    def caught_up(self, endpoint: Party, now: float) -> None:
        """The endpoint reads again: work held back for it may go now."""
        self.broker.caught_up(endpoint)
        cluster = self.broker.interests(endpoint)[0]
        if cluster:
            self._capacity_changed(cluster, now)

    def confirm_tunnel(
        self, member: TunnelParty, offer: int, tunnel_id: int, now: float
    ) -> TunnelEnd | None:
        end = self.broker.confirm_tunnel(member, offer, tunnel_id)
        if isinstance(end, tunnel.TunnelHalf) and end.peer.endpoint is self._remote:
            return _Notifying(end, self)
        return end

    # ----------------------------------------------------------------------------
    # The overlay's port (overlay.stack.UpperLayer)

    def upcall(self, event: Upcall, now: float) -> Sequence[object]:
        remote = self._remote
        if remote is None:
            return ()
        if type(event) is Received:
            assert isinstance(event, Received)
            self._received(event.src_id, event.message, now)
        elif type(event) is LinkDown or type(event) is PeerDead:
            assert isinstance(event, LinkDown | PeerDead)
            remote.link_lost(event.peer_id, "the node at the other end is unreachable")
        return self._take()

    def consume(self, effect: object, now: float) -> Sequence[object]:
        kind = type(effect)
        if kind is AnycastDelivered:
            assert isinstance(effect, AnycastDelivered)
            self._anycast_delivered(effect, now)
        elif kind is GroupDelivered:
            assert isinstance(effect, GroupDelivered)
            if effect.origin != self.node_id:  # our own went to local members at once
                payload = effect.payload
                if isinstance(payload, ClusterBroadcast):
                    self.counters["broadcasts_from_other_nodes"] += 1
                    self.broker.broadcast(payload.cluster, payload.data)
                elif isinstance(payload, TopicEvent):
                    self.counters["events_from_other_nodes"] += 1
                    self.broker.publish(payload.topic, payload.data)
        elif kind is AnycastFailed:
            assert isinstance(effect, AnycastFailed)
            pending = self._pending.get(effect.tag)
            if pending is not None:
                pending.no_member = True
                self._retry_later(pending, now)
        return self._take()

    def on_timer(self, now: float) -> Sequence[object]:
        self.broker.on_timer(now)
        if self._scribe is not None and now >= self._next_refresh:
            # Capacity falls as unanswered work ages, without any event to say so.
            self._next_refresh = now + CAPACITY_REFRESH
            for cluster in self.broker.clusters():
                self._capacity_changed(cluster, now)
        for pending in self._deadlines.pop_due(now):
            if pending.deadline <= now:
                self._expire(pending)
            elif pending.retry_at <= now:
                pending.retry_at = math.inf
                self.counters["retries"] += 1
                self._send(pending, now)
        return self._take()

    def next_deadline(self) -> float | None:
        """The earliest of this core's deadlines and its broker's.

        (A node's own timer drives the broker too, so that it keeps time without an
        overlay; expiring what is due twice is harmless.)
        """
        deadlines = [self._deadlines.next_deadline(), self.broker.next_deadline()]
        if self._scribe is not None:
            deadlines.append(self._next_refresh)
        return min((d for d in deadlines if d is not None), default=None)

    def shut_down(self) -> None:
        """Every request and tunnel still waiting here ends now (the node is stopping)."""
        for pending in self._deadlines.pop_all():
            if self._finish(pending) is not None:
                if pending.is_tunnel:
                    pending.origin.tunnel_failed(pending.origin_id)
                else:
                    pending.origin.request_timed_out(pending.origin_id)
        self.outbox.clear()

    # ----------------------------------------------------------------------------
    # Requests and tunnels sent from here

    def _new_pending(
        self,
        origin: Endpoint,
        origin_id: int,
        cluster: str,
        is_tunnel: bool,
        data: bytes,
        deadline: float,
    ) -> _Pending:
        self._seq += 1
        pending = _Pending(self._seq, origin, origin_id, cluster, is_tunnel, data, deadline)
        self._pending[pending.seq] = pending
        self._deadlines.push(deadline, pending)
        return pending

    def _send(self, pending: _Pending, now: float) -> None:
        assert self._scribe is not None
        pending.no_member = False
        remaining = math.ceil((pending.deadline - now) * 1000)
        if remaining <= 0:
            self._expire(pending)
            return
        payload: object
        if pending.is_tunnel:
            payload = TunnelOpen(pending.seq, pending.cluster, remaining)
        else:
            payload = ClusterRequest(pending.seq, pending.cluster, pending.data, remaining)
        key = cluster_key(pending.cluster)
        self.outbox += self._scribe.anycast(key, payload, pending.seq, now)

    def _retry_later(self, pending: _Pending, now: float) -> None:
        """No member anywhere (yet): ask again a little later, until the deadline."""
        pending.retry_at = now + pending.backoff
        pending.backoff = min(pending.backoff * 2, RETRY_MAX)
        if pending.retry_at < pending.deadline:
            self._deadlines.push(pending.retry_at, pending)

    def _finish(self, pending: _Pending) -> _Pending | None:
        """Take ``pending`` out of play: None if it already was (a late answer)."""
        if pending.done:
            return None
        pending.done = True
        pending.data = b""
        del self._pending[pending.seq]
        self._deadlines.finished()
        return pending

    def _expire(self, pending: _Pending) -> None:
        if self._finish(pending) is None:
            return
        reason = "no member anywhere" if pending.no_member else "no answer in time"
        self.given_up[reason] += 1
        kind = "tunnel" if pending.is_tunnel else "request"
        self.outbox.append(GaveUp(kind, pending.cluster, reason))
        if pending.is_tunnel:
            pending.origin.tunnel_failed(pending.origin_id)
        else:
            self.counters["remote_timeouts"] += 1
            pending.origin.request_timed_out(pending.origin_id)

    def _anycast_delivered(self, effect: AnycastDelivered, now: float) -> None:
        """This node's members were chosen for a request or a tunnel."""
        payload = effect.payload
        if effect.origin == self.node_id:
            pending = self._pending.get(effect.tag)
            if pending is None:
                return
            remaining = math.ceil((pending.deadline - now) * 1000)
            origin, origin_id, cluster = pending.origin, pending.origin_id, pending.cluster
            self._finish(pending)  # the broker owns it from here, deadline included
            if isinstance(payload, ClusterRequest):
                self.broker.request(origin, origin_id, cluster, payload.data, remaining, now)
            else:
                self.broker.open_tunnel(origin, origin_id, cluster, remaining, now)
            return
        remote = self._remote
        assert remote is not None
        if isinstance(payload, ClusterRequest):
            self.counters["remote_requests"] += 1
            local_id = remote.request_from(effect.origin, effect.origin_address, payload.seq)
            self.broker.request(
                remote, local_id, payload.cluster, payload.data, payload.remaining_ms, now
            )
        elif isinstance(payload, TunnelOpen):
            local_id = remote.tunnel_from(effect.origin, effect.origin_address, payload.tunnel)
            self.broker.open_tunnel(remote, local_id, payload.cluster, payload.remaining_ms, now)

    def _received(self, src: int, message: object, now: float) -> None:
        remote = self._remote
        assert remote is not None
        kind = type(message)
        if kind is TunnelData:
            assert isinstance(message, TunnelData)
            remote.data(message.tunnel, message.size_or_cont, message.chunk)
        elif kind is TunnelCredit:
            assert isinstance(message, TunnelCredit)
            remote.credit(message.tunnel, message.size)
        elif kind is TunnelEnded:
            assert isinstance(message, TunnelEnded)
            remote.ended(message.tunnel, message.reason)
        elif kind is ClusterReply or kind is ClusterFault:
            assert isinstance(message, ClusterReply | ClusterFault)
            pending = self._pending.get(message.seq)
            if pending is None or pending.is_tunnel or self._finish(pending) is None:
                self.counters["late_answers"] += 1
                return
            self.counters["remote_replies"] += 1
            if isinstance(message, ClusterReply):
                pending.origin.request_replied(pending.origin_id, message.data)
            else:
                pending.origin.request_faulted(pending.origin_id, message.reason)
        elif kind is TunnelAccepted:
            assert isinstance(message, TunnelAccepted)
            self._tunnel_accepted(src, message)
        elif kind is TunnelRefused:
            assert isinstance(message, TunnelRefused)
            pending = self._pending.get(message.tunnel)
            if pending is not None and pending.is_tunnel:
                self._finish(pending)
                pending.origin.tunnel_failed(pending.origin_id)

    def _tunnel_accepted(self, src: int, message: TunnelAccepted) -> None:
        remote = self._remote
        assert remote is not None
        pending = self._pending.get(message.tunnel)
        if pending is None or not pending.is_tunnel:
            # We gave up on it meanwhile: close the far end.
            ended = TunnelEnded(message.peer, "tunnel setup timed out")
            self.outbox.append(Send(src, message.address, ended))
            return
        self._finish(pending)
        origin = pending.origin
        near, far = tunnel.connect(origin, pending.origin_id, remote, pending.seq)
        remote.tunnel_to(pending.seq, src, message.address, message.peer, far)
        origin.tunnel_opened(pending.origin_id, _Notifying(near, self), self.chunk_limit)
        origin.tunnel_allow(pending.origin_id, near.window)
        remote.tunnel_allow(pending.seq, far.window)

    # ----------------------------------------------------------------------------
    # Membership and capacity

    def _membership_changed(self, cluster: str, now: float) -> None:
        scribe = self._scribe
        if scribe is None or is_reserved(cluster):
            return
        key = cluster_key(cluster)
        if self.broker.members(cluster):
            group = scribe.group(key)
            if group is None or not group.member:
                self.outbox += scribe.join(key, now, self.broker.capacity(cluster, now))
            else:
                self.outbox += scribe.set_capacity(key, self.broker.capacity(cluster, now), now)
        else:
            self.outbox += scribe.leave(key, now)

    def _subscription_changed(self, topic: str, now: float) -> None:
        scribe = self._scribe
        if scribe is None:
            return
        key = topic_key(topic)
        if self.broker.subscribers(topic):
            group = scribe.group(key)
            if group is None or not group.member:
                self.outbox += scribe.join(key, now)
        else:
            self.outbox += scribe.leave(key, now)

    def _capacity_changed(self, cluster: str, now: float) -> None:
        scribe = self._scribe
        if scribe is not None and cluster and not is_reserved(cluster):
            self.outbox += scribe.set_capacity(
                cluster_key(cluster), self.broker.capacity(cluster, now), now
            )

    def _take(self) -> list[object]:
        effects, self.outbox[:] = list(self.outbox), []
        return effects

    # ----------------------------------------------------------------------------
    # Status

    def groups(self) -> dict[str, Any]:
        """The clusters and topics this node is in, as status, metrics and the page show them.

        Per group: how many members (subscribers) are on this node, and how many
        other nodes have some (from the tree's reports; None without an overlay).
        The node's own reserved clusters are left out: nobody joined them.
        """
        scribe = self._scribe

        def elsewhere(key: int) -> int | None:
            if scribe is None:
                return None
            group = scribe.group(key)
            return 0 if group is None else group.others()

        clusters = {
            name: {"here": self.broker.members(name), "other_nodes": elsewhere(cluster_key(name))}
            for name in sorted(self.broker.clusters())
            if not is_reserved(name) and self.broker.members(name)
        }
        topics = {
            name: {"here": self.broker.subscribers(name), "other_nodes": elsewhere(topic_key(name))}
            for name in sorted(self.broker.topics())
        }
        return {
            "scope": "node" if scribe is None else "network",
            "clusters": clusters,
            "topics": topics,
        }

    def status(self) -> dict[str, Any]:
        """Trees and counters, for ``irisnode status``."""
        scribe = self._scribe
        trees = {}
        if scribe is not None:
            for name in self.broker.clusters():
                if not is_reserved(name):
                    trees[f"cluster {name}"] = _tree_status(scribe, cluster_key(name))
            for name in self.broker.topics():
                trees[f"topic {name}"] = _tree_status(scribe, topic_key(name))
        remote = self._remote
        return {
            "trees": trees,
            "requests_waiting": len(self._pending),
            "remote_requests_open": remote.open_requests if remote is not None else 0,
            "remote_tunnels_open": remote.open_tunnels if remote is not None else 0,
            **self.counters,
            "given_up": dict(self.given_up),
            **({} if scribe is None else {"scribe": dict(scribe.stats)}),
        }


def _tree_status(scribe: ScribeCore, key: int) -> dict[str, Any] | None:
    group = scribe.group(key)
    if group is None:
        return None
    return {
        "root": group.root,
        "parent": None if group.parent is None else f"{group.parent:032x}",
        "children": len(group.children),
        "depth": group.depth,
        "member_nodes_elsewhere": group.others(),
        "capacity_here": round(group.own_capacity, 3),
        "capacity_elsewhere": round(group.outside + group.subtree() - group.own_capacity, 3),
    }


class _Notifying:
    """A tunnel end to another node, as handed to an application's endpoint.

    The relay session calls its end directly; what that produces for the far
    node lands in the core's outbox, so the adapter must hear of it at once.
    """

    __slots__ = ("_core", "_end")

    def __init__(self, end: TunnelEnd, core: MessagingCore) -> None:
        self._end = end
        self._core = core

    def transfer(self, size_or_cont: int, chunk: bytes) -> None:
        self._end.transfer(size_or_cont, chunk)
        self._core.on_output()

    def allow(self, size: int) -> None:
        self._end.allow(size)
        self._core.on_output()

    def close(self, reason: str = "") -> None:
        self._end.close(reason)
        self._core.on_output()

    def resume(self) -> None:
        self._end.resume()
        self._core.on_output()
