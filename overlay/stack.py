"""Pastry and the layers above it, as one pure core: the one upcall port.

An :class:`OverlayStack` holds a :class:`~overlay.pastry.PastryCore` and the layers
built on it (lookups, Scribe, node-to-node messaging), each an :class:`UpperLayer`.
It is the only glue between them:

* Pastry's upcalls go up through one typed port, :meth:`UpperLayer.upcall`: a
  routed message delivered here (:class:`~overlay.pastry.Deliver`) or passing
  through with ``intercept`` (:class:`~overlay.pastry.Intercept`) goes to the
  layer that owns the message's type, and so does a direct message from a peer
  (:class:`Received`); a peer's death and a leaf-set change go to every layer.
* A layer asks Pastry for routing with the effects :class:`RouteTo` and
  :class:`Forward`, which the stack carries out at once; :class:`~overlay.pastry.Send`
  and every other effect leave the stack, in the order they were produced, for
  its owner (the links, or the simulation).
* A layer may take effects of another layer (Scribe's deliveries, for the
  messaging layer): it names their types in :attr:`UpperLayer.consumes`.

The stack has the ``start/handle/on_timer/next_deadline`` shape of a core, so
:class:`overlay.simulation.SimNetwork` runs it unchanged, and the Twisted
:class:`~overlay.service.OverlayService` drives the same object in production.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from overlay.pastry import (
    Deliver,
    Intercept,
    LeafSetChanged,
    NodeRef,
    PastryCore,
    PeerDead,
    Route,
    Send,
)


@dataclass(frozen=True, slots=True)
class RouteTo:
    """Effect of a layer: route ``message`` to the node responsible for ``key``."""

    key: int
    message: object
    intercept: bool = False
    avoid: int | None = None
    """A peer the first hop must not be (see :meth:`PastryCore.route`)."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Effect of a layer: continue an intercepted route (possibly with a new message)."""

    route: Route


@dataclass(frozen=True, slots=True)
class Received:
    """Upcall: a message that is not Pastry's came straight from ``src_id``."""

    src_id: int
    message: object


L = TypeVar("L")


@dataclass(frozen=True, slots=True)
class LinkDown:
    """Upcall: the link to ``peer_id`` failed (whatever was in flight on it is lost)."""

    peer_id: int


Upcall = Deliver | Intercept | Received | PeerDead | LinkDown | LeafSetChanged
"""Everything Pastry hands to the layers above it."""


class UpperLayer(Protocol):
    """A pure layer above Pastry: returns effects, takes ``now``, never does I/O."""

    @property
    def messages(self) -> tuple[type, ...]:
        """Message types this layer owns, routed or direct."""
        ...

    @property
    def consumes(self) -> tuple[type, ...]:
        """Effect types of other layers that this layer takes (:meth:`consume`)."""
        ...

    def upcall(self, event: Upcall, now: float) -> Sequence[object]: ...

    def consume(self, effect: object, now: float) -> Sequence[object]: ...

    def on_timer(self, now: float) -> Sequence[object]: ...

    def next_deadline(self) -> float | None: ...


class OverlayStack:
    """Pastry plus upper layers (see the module docstring)."""

    def __init__(self, pastry: PastryCore, layers: Sequence[UpperLayer] = ()) -> None:
        self.pastry = pastry
        self.layers = tuple(layers)
        self._owners: dict[type, UpperLayer] = {}
        self._consumers: dict[type, UpperLayer] = {}
        for layer in self.layers:
            for kind in layer.messages:
                if kind in self._owners:
                    raise ValueError(f"two layers own {kind.__name__}")
                self._owners[kind] = layer
            for kind in layer.consumes:
                self._consumers[kind] = layer

    @property
    def node_id(self) -> int:
        return self.pastry.node_id

    def layer(self, kind: type[L]) -> L:
        """The layer of a given class (for callers that drive one layer directly)."""
        for layer in self.layers:
            if isinstance(layer, kind):
                return layer
        raise KeyError(kind.__name__)

    # -- the core shape ------------------------------------------------------------------

    def start(self, now: float, bootstrap: Sequence[NodeRef] = ()) -> list[object]:
        return self.run(self.pastry.start(now, bootstrap), now)

    def handle(self, src_id: int, message: object, now: float) -> list[object]:
        """A message from ``src_id``: Pastry's go to Pastry, the rest to their layer."""
        layer = self._owners.get(type(message))
        if layer is None:
            return self.run(self.pastry.handle(src_id, message, now), now)
        return self.run(layer.upcall(Received(src_id, message), now), now)

    def link_down(self, peer_id: int, now: float) -> list[object]:
        """The link layer lost its link to ``peer_id``: Pastry and every layer hear of it."""
        effects: list[object] = list(self.pastry.link_down(peer_id, now))
        for layer in self.layers:
            effects += layer.upcall(LinkDown(peer_id), now)
        return self.run(effects, now)

    def on_timer(self, now: float) -> list[object]:
        effects: list[object] = []
        if _due(self.pastry.next_deadline(), now):
            effects += self.run(self.pastry.on_timer(now), now)
        for layer in self.layers:
            if _due(layer.next_deadline(), now):
                effects += self.run(layer.on_timer(now), now)
        return effects

    def next_deadline(self) -> float | None:
        best = self.pastry.next_deadline()
        for layer in self.layers:  # runs after every input: no allocation
            deadline = layer.next_deadline()
            if deadline is not None and (best is None or deadline < best):
                best = deadline
        return best

    # -- carrying out effects --------------------------------------------------------------

    def run(self, effects: Sequence[object], now: float) -> list[object]:
        """Carry out the effects meant for the stack; return the rest, in order."""
        out: list[object] = []
        self._run(effects, now, out)
        return out

    def _run(self, effects: Sequence[object], now: float, out: list[object]) -> None:
        pastry = self.pastry
        for effect in effects:
            kind = type(effect)
            if kind is Send:
                out.append(effect)
            elif kind is RouteTo:
                assert isinstance(effect, RouteTo)
                routed = pastry.route(
                    effect.key, effect.message, now, intercept=effect.intercept, avoid=effect.avoid
                )
                self._run(routed, now, out)
            elif kind is Forward:
                assert isinstance(effect, Forward)
                self._run(pastry.forward(effect.route, now), now, out)
            elif kind is Deliver or kind is Intercept:
                assert isinstance(effect, Deliver | Intercept)
                layer = self._owners.get(type(effect.route.message))
                if layer is not None:
                    self._run(layer.upcall(effect, now), now, out)
                elif kind is Intercept:  # nobody above wants to look at it: pass it on
                    self._run(pastry.forward(effect.route, now), now, out)
                else:
                    out.append(effect)  # a delivery nobody owns: the owner logs it
            elif kind is PeerDead or kind is LeafSetChanged:
                assert isinstance(effect, PeerDead | LeafSetChanged)
                for layer in self.layers:
                    self._run(layer.upcall(effect, now), now, out)
                out.append(effect)
            else:
                consumer = self._consumers.get(kind)
                if consumer is None:
                    out.append(effect)
                else:
                    self._run(consumer.consume(effect, now), now, out)


def _due(deadline: float | None, now: float) -> bool:
    return deadline is not None and deadline <= now
