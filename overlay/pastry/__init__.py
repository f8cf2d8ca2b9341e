"""Pastry routing as a pure core: messages and ``now`` in, effects out.

The package: :mod:`~overlay.pastry.messages` (what travels, and ``register``),
:mod:`~overlay.pastry.leafset`, :mod:`~overlay.pastry.table`,
:mod:`~overlay.pastry.effects` and :mod:`~overlay.pastry.core` (:class:`PastryCore`).

One :class:`PastryCore` per node. It never reads a clock, never draws randomness
except from the injected ``random.Random``, never logs and never touches a socket:
the same object runs under unit tests, in :mod:`overlay.simulation` with thousands
of others, and behind the real links. Peers are node ids plus an opaque address
(``bytes``) that only the link layer interprets.

The rules, in one place (``docs/overlay.md`` has the reasons at more length):

* **Routing.** A key inside the leaf set's range goes to the numerically closest
  member (or is delivered here); otherwise to the routing-table entry that shares
  one more digit with the key; otherwise to any known node that is closer. Every
  hop either lengthens the shared prefix or shortens the distance, so a route
  ends at the node closest to the key (:func:`overlay.ids.closer`) once leaf sets
  are right; a hop limit bounds the damage while they are not.
* **Only first-hand knowledge enters the state.** The leaf set and the routing
  table hold only nodes this node has heard from directly. Refs learned second
  hand (join replies, leaf sets, rows) are *hints*: a hint that would improve the
  state is probed, and the probe's answer admits it. Dead nodes gossiped by
  slower peers therefore never displace live ones, and probing a hint also
  introduces this node to it (which is how a joining node announces itself).
* **Join** routes a ``Join`` towards the new node's own id through a bootstrap
  node; every node on the path answers with its routing-table rows, the last one
  (the numerically closest) with its leaf set too, and the new node is
  :class:`Ready` when that last answer arrives. The same lookup runs again a
  moment later and then now and then (maintenance), to find neighbours that a
  join racing with others missed.
* **State exchange.** Every leaf-set change bumps a version carried by
  heartbeats; each heartbeat round, a node pulls the leaf set of the nearest
  neighbour whose version it has not seen.
* **Failure detection.** Leaf-set members get a heartbeat every
  ``heartbeat_interval``, routing-table entries every ``probe_interval``. A
  heartbeat says whether the sender keeps the receiver in its state
  (``watching``); a peer that does not watch us, and any suspect, is asked to
  answer. So evidence of life flows at the heartbeat rate however long the
  latency, and only *gaps* count: silent for ``suspect_after``, a peer is
  suspect and pinged every round; silent for ``dead_after``, it is dead. A node
  that drops a peer from its state tells it (``watching`` false) so that it
  starts asking at once. A dropped link shortens the grace to ``link_down_grace``.
* **Repair.** A lost leaf member is replaced from known peers at once, and the
  farthest healthy member on each side is asked for its leaf set; a lost table
  slot is refilled by asking a peer that shares the row for its row. A graceful
  ``Leave`` carries the leaver's leaf set, so the repair needs no round trip.
"""

from overlay.pastry.core import PastryConfig, PastryCore
from overlay.pastry.effects import (
    Deliver,
    Dropped,
    Effect,
    Intercept,
    LeafSetChanged,
    PeerDead,
    PeerLossReason,
    Ready,
    Send,
)
from overlay.pastry.messages import (
    Address,
    Heartbeat,
    Join,
    JoinReply,
    LeafSetReply,
    LeafSetRequest,
    Leave,
    NodeRef,
    Route,
    RowReply,
    RowRequest,
    is_bulk,
    register,
)

__all__ = [
    "Address",
    "Deliver",
    "Dropped",
    "Effect",
    "Heartbeat",
    "Intercept",
    "Join",
    "JoinReply",
    "LeafSetChanged",
    "LeafSetReply",
    "LeafSetRequest",
    "Leave",
    "NodeRef",
    "PastryConfig",
    "PastryCore",
    "PeerDead",
    "PeerLossReason",
    "Ready",
    "Route",
    "RowReply",
    "RowRequest",
    "Send",
    "is_bulk",
    "register",
]
