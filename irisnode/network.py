"""Bringing up a node's overlay from its configuration: credentials, links, discovery.

Kept apart from :mod:`irisnode.node` so that its imports (PyNaCl, msgpack,
sortedcontainers) load only after the relay is already serving applications.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from irisnode.messaging import messages as messaging_messages
from irisnode.messaging.core import MessagingCore
from overlay import lookup, pastry, scribe
from overlay.discovery import Discovery, DiscoveryConfig, parse_seed
from overlay.discovery_twisted import DEFAULT_PORT, MulticastDiscovery, MulticastSockets
from overlay.identity import Credentials, NetworkKey, NodeIdentity
from overlay.interfaces import list_interfaces, select_interfaces
from overlay.link_frames import LinkLimits
from overlay.service import OverlayConfig, OverlayService
from overlay.stack import UpperLayer
from overlay.wire import MessageRegistry

if TYPE_CHECKING:
    from irisnode.node import NetworkConfig

Entropy = Callable[[int], bytes]


def _reachable_hosts(interfaces: tuple[Any, ...]) -> tuple[str, ...]:
    """Where other nodes can dial us: IPv4 first, then IPv6 link-local, loopback last.

    Loopback addresses stay at the end so that several nodes on one machine (with
    ``--seed 127.0.0.1:PORT``) still find each other.
    """
    ordered = sorted((i for i in interfaces if i.up), key=lambda i: i.loopback)
    hosts = [host for i in ordered for host in i.ipv4]
    hosts += [host for i in ordered for host in i.ipv6_link_local]
    return tuple(dict.fromkeys(hosts))


ENVELOPE = 4096
"""Room for the node-to-node envelope around an application message of the largest size."""


def link_limits(max_message_size: int) -> LinkLimits:
    """Links that carry any message the relay accepts (``--max-message-size``)."""
    largest = max_message_size + ENVELOPE
    defaults = LinkLimits()
    return LinkLimits(
        max_message_size=largest,
        max_bulk_queued=max(defaults.max_bulk_queued, 2 * largest),
        max_control_queued=max(defaults.max_control_queued, largest),
    )


def message_registry() -> MessageRegistry:
    """Every node-to-node message this node speaks, from each family's ``register``."""
    registry = MessageRegistry()
    for family in (pastry, lookup, scribe, messaging_messages):
        family.register(registry)
    return registry


def start_overlay(
    reactor: Any,
    network: NetworkConfig,
    messaging: MessagingCore,
    *,
    max_message_size: int,
    upcalls: Callable[[object], None],
    rng: random.Random,
    entropy: Entropy,
) -> OverlayService:
    """Start the overlay described by ``network`` and return it.

    Raises :class:`~overlay.identity.CredentialError`,
    :class:`~overlay.interfaces.InterfaceSelectionError` or a listening error with a
    message fit for the user.
    """
    key = NetworkKey.load(network.key_file, expected_name=network.name)
    if network.state_dir is not None:
        identity = NodeIdentity.load_or_create(network.state_dir, entropy)
    else:
        identity = NodeIdentity.generate(entropy)
    seeds = tuple(parse_seed(seed) for seed in network.seeds)

    def chosen() -> tuple[Any, ...]:
        return select_interfaces(list_interfaces(), network.interfaces, network=True)

    interfaces = chosen() if network.discovery else ()
    advertised = network.advertise or _reachable_hosts(interfaces or tuple(list_interfaces()))
    scope = next((i.name for i in interfaces if i.ipv6_link_local), "")
    config = OverlayConfig(
        link_port=network.link_port,
        link_interface=network.link_interface,
        advertised_hosts=tuple(advertised),
        scope_interface=scope,
        link_limits=link_limits(max_message_size),
        handshake_rate=network.handshake_rate,
    )
    trees: list[scribe.ScribeCore] = []

    def upper_layers(core: pastry.PastryCore) -> tuple[UpperLayer, ...]:
        trees.append(scribe.ScribeCore(core.node_id, core.address, core, rng))
        return trees[0], messaging

    node = OverlayService(
        reactor,
        key,
        Credentials.for_network(key, identity),
        config,
        registry=message_registry(),
        rng=rng,
        entropy=entropy,
        upper_layers=upper_layers,
        upcalls=upcalls,
    )
    node.start()
    node.run(messaging.attach_overlay(trees[0], node.address, reactor.seconds()))
    if interfaces:
        core = Discovery(
            key.beacon_key(),
            node.node_id,
            node.link_port,
            rng,
            entropy,
            DiscoveryConfig(seeds=seeds),
        )
        sockets = MulticastSockets(reactor, network.discovery_port or DEFAULT_PORT)
        adapter = MulticastDiscovery(core, reactor, sockets, chosen, node.on_discovery)
        adapter.start()
        node.attach_discovery(adapter, core)
    else:
        for seed in seeds:
            node.add_seed(seed.host, seed.port)
    return node
