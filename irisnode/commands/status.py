"""``irisnode status``: the node's own view of itself, as text or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from irisnode.commands.common import add_relay_port, add_timeout, ask

DESCRIPTION = (
    "Show the node on --relay-port: its relay, messaging counters, the clusters and topics "
    "of this node, and in a network its peers, leaf set, routing table and discovery. "
    "Asks the node's $node.status service over the relay protocol."
)
EXAMPLE = "  irisnode status\n  irisnode status --json | jq .overlay.peers"

STATUS_BODY = b"status"
"""What ``irisnode status`` sends to ``$node.status``: any non-empty body does (the
node ignores it), and the bindings, like Iris's own, refuse an empty request."""

REFUSALS = {
    "wrong-network": "that node is in another network, or holds another key of this one",
    "connection-lost": "it hung up during the handshake (it may have refused our certificate)",
    "bad-certificate": "its certificate is not signed by this network's key",
    "expired-certificate": "its certificate has expired",
}
"""Link failure reasons (docs/wire-link.md) explained for someone who just started a node."""


def configure(parser: argparse.ArgumentParser) -> None:
    add_relay_port(parser)
    add_timeout(parser, 2.0, "give up after this long")
    parser.add_argument("--json", action="store_true", help="print the full state as JSON")


def run(args: argparse.Namespace) -> int:
    from irisnode.system import STATUS

    state = json.loads(ask(args.relay_port, STATUS, STATUS_BODY, args.timeout))
    print(json.dumps(state, indent=2) if args.json else render(state, asked_over_relay=True))
    return 0


def plural(number: int, word: str, words: str | None = None) -> str:
    return f"{number} {word if number == 1 else (words or word + 's')}"


def render(state: dict[str, Any], *, asked_over_relay: bool = False) -> str:
    """The human view of a node's status (``asked_over_relay``: one connection is the asker's)."""
    lines = [f"irisnode {state['version']}, up {state['uptime']:.0f} s"]
    relay = state["relay"]
    others = relay["connections"] - (1 if asked_over_relay else 0)
    lines.append(
        f"relay: {' and '.join(relay['addresses'])}, "
        f"{plural(others, 'other client') if asked_over_relay else plural(others, 'client')}, "
        f"{relay['bytes_in']} bytes in, {relay.get('bytes_out', 0)} bytes out"
    )
    counters = state.get("messaging", {})
    if counters:
        lines.append(
            "messaging: "
            + ", ".join(
                plural(counters.get(key, 0), *words)
                for key, *words in (
                    ("requests", "request"),
                    ("replies", "reply", "replies"),
                    ("faults", "fault"),
                    ("timeouts", "timeout"),
                )
            )
        )
    lines += _groups(state.get("groups"))
    lines += _given_up(state)
    overlay = state.get("overlay")
    if overlay is None:
        lines.append("overlay: none (developer mode: start with --net and --key to join a network)")
        return "\n".join(lines)
    lines += _overlay(overlay)
    return "\n".join(lines)


def _groups(groups: dict[str, Any] | None) -> list[str]:
    if groups is None:
        return []

    def where(sizes: dict[str, Any], word: str) -> str:
        here = plural(sizes["here"], word)
        others = sizes.get("other_nodes")
        return here if others is None else f"{here} here, {plural(others, 'other node')}"

    clusters = ", ".join(
        f"{name} ({where(sizes, 'member')})" for name, sizes in groups["clusters"].items()
    )
    topics = ", ".join(
        f"{name} ({where(sizes, 'subscriber')})" for name, sizes in groups["topics"].items()
    )
    return [f"clusters: {clusters or 'none'}", f"topics: {topics or 'none'}"]


def _given_up(state: dict[str, Any]) -> list[str]:
    """Every message given up anywhere in the node, with why (none: nothing to say)."""
    counts: dict[str, int] = {}
    messaging = state.get("messaging") or {}
    for reason, count in (messaging.get("given_up") or {}).items():
        counts[f"requests: {reason}"] = count
    for reason, count in (messaging.get("scribe") or {}).items():
        if count and reason != "redirects":
            counts[f"trees: {reason.replace('_', ' ')}"] = count
    links = ((state.get("overlay") or {}).get("links") or {}).get("given_up") or {}
    for reason, count in links.items():
        counts[f"links: {reason}"] = count
    dropped = (state.get("relay") or {}).get("dropped_deliveries", 0)
    if dropped:
        counts["deliveries to clients too far behind"] = dropped
    if not counts:
        return []
    return ["given up: " + ", ".join(f"{why} {n}" for why, n in sorted(counts.items()))]


def _overlay(overlay: dict[str, Any]) -> list[str]:
    peers = overlay["peers"]
    linked = [peer for peer in peers if peer["link"] == "up"]
    leaf = overlay["leaf_set"]
    alone = not linked and not leaf["left"] and not leaf["right"]
    if alone:
        state = "alone: no other node is linked to it"
    elif overlay["ready"]:
        state = f"joined, {plural(len(linked), 'peer')} linked"
    else:
        state = "joining"
    lines = [
        f"node {overlay['node_id']} in network {overlay['network']!r}, "
        f"links on port {overlay['link_port']}",
        f"state: {state}",
    ]
    if alone:
        lines += ["  " + why for why in _why_alone(overlay)]
    lines.append(f"peers: {len(peers)}")
    for peer in peers:
        lines.append(
            f"  {peer['node_id']}  link {peer['link']:<4}  {'leaf ' if peer['leaf'] else '     '}"
            f" {listen_address(peer['address'])}"
        )
    lines.append(f"leaf set: {len(leaf['left'])} left, {len(leaf['right'])} right")
    table = overlay["routing_table"]
    lines.append(f"routing table: {table['entries']} entries in {len(table['rows'])} rows")
    discovery = overlay.get("discovery")
    if discovery is not None:
        lines.append(
            f"discovery: on {', '.join(discovery['interfaces']) or 'no interface'},"
            f" {discovery['peers_heard']} peers heard"
        )
    return lines


def _why_alone(overlay: dict[str, Any]) -> list[str]:
    """Why a node has no peer, from what it tried: refused seeds first."""
    reasons = []
    for target in overlay.get("dialling", []):
        failure = target.get("failure")
        if failure is None:
            reasons.append(f"{target['address']}: still trying to link")
        else:
            hint = REFUSALS.get(failure)
            reasons.append(
                f"{target['address']} refused: {failure}" + (f" ({hint})" if hint else "")
            )
    discovery = overlay.get("discovery")
    if discovery is None:
        if not reasons:
            reasons.append("no --seed given and discovery is off (--no-discovery)")
    elif discovery["peers_heard"] == 0:
        interfaces = ", ".join(discovery["interfaces"]) or "no interface"
        reasons.append(f"discovery has heard no other node of this network on {interfaces}")
    return reasons


def listen_address(address: str | None) -> str:
    """A peer's overlay address (``"PORT HOST HOST..."``) as ``HOST:PORT`` of its first host."""
    if not address:
        return ""
    port, *hosts = address.split(" ")
    if not hosts:
        return f"port {port}"
    host = hosts[0]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
