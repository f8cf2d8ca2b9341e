"""Scribe: one multicast tree per group over Pastry, as a pure core.

A group is a key (``key_for("cluster", name)``, ``key_for("topic", name)``); its
tree is rooted at the node Pastry makes responsible for the key, and *nodes*,
not applications, are its members: a node is in a tree while it has local
members, or children that need it. The rules (``docs/overlay.md`` gives the
reasons):

* **Join.** A node subscribes by routing :class:`Subscribe` towards the key with
  ``intercept``: the first node on the way that takes it (any node does) adds
  the sender as a child and answers; a node that was not yet in the tree then
  subscribes itself the same way. So a tree is the union of routes towards the
  key and does not depend on the order in which nodes joined.
* **Bounded fan-out.** A node keeps at most ``max_children`` children per tree:
  those nearest the key; each other child is redirected under the kept child
  that shares most digits with it. The choice depends only on the set.
* **Multicast** is routed to the root and passed down the tree; every message is
  numbered by its origin (origin, incarnation, sequence), so a node delivers and
  forwards it once even while the tree is being repaired. From one sender to
  one group, messages arrive in the order sent, or not at all.
* **Anycast** is routed towards the key until a tree node takes it, then walks
  the tree: at each node it goes to this node's members, down to a child, or up
  to the parent, in proportion to the capacity each way (smooth weighted round
  robin). Capacity is what each member node reports (``set_capacity``);
  children report their subtree's sum to their parent every beat, parents tell
  each child the capacity outside its subtree, and a change that matters (to or
  from zero, or by more than half) goes out at once. Reports go stale with the
  edge that carried them.
* **Repair.** Parents and children beat every ``beat_interval``. A silent parent
  (or one Pastry declares dead, or one that leaves) is given up and the node
  subscribes again, routing around it; silent children are dropped; a node with
  no members and no children leaves its parent (pruning). When the leaf set
  changes, a node that now owns a key becomes that tree's root, and a root that
  no longer does subscribes to the new one, so trees follow their keys.
* **Loops** cannot form from consistent routes; a depth past ``max_depth`` (a
  loop made of inconsistent ones) makes the node leave and join again.

Package: :mod:`~overlay.scribe.messages` (what travels, and ``register``),
:mod:`~overlay.scribe.group` (one tree at one node), :mod:`~overlay.scribe.core`
(:class:`ScribeCore`).
"""

from overlay.scribe.core import (
    AnycastDelivered,
    AnycastFailed,
    GroupDelivered,
    Router,
    ScribeConfig,
    ScribeCore,
)
from overlay.scribe.messages import register

__all__ = [
    "AnycastDelivered",
    "AnycastFailed",
    "GroupDelivered",
    "Router",
    "ScribeConfig",
    "ScribeCore",
    "register",
]
