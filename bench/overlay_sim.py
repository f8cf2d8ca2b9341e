"""Pastry at scale in the simulation: hops, convergence time and wall time per size.

``python -m bench.overlay_sim [--sizes 100,1000,10000]`` builds a seeded
in-memory network of each size (:mod:`overlay.simulation`), lets the nodes join
(a new node every ``1/--join-rate`` simulated seconds, each through a random
ready node), runs until every leaf set is exactly right, then traces
``--keys`` random keys from random nodes and compares each end point with the
numerically closest live node. Everything runs in one process on simulated
time; nothing touches the network.

Columns: simulated seconds to start every node (``join``) and from the last
start to convergence (``converge``); routes that reached the right node; mean
and max overlay hops against the ``log16(N) + 1`` target; messages per node per
simulated second over the whole run; wall-clock seconds; peak resident memory
of the process so far.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import sys
import time
from collections.abc import Sequence

from overlay.ids import random_id
from overlay.simulation import SimNetwork

_HEADER = (
    f"{'N':>6} {'join s':>7} {'converge s':>10} {'correct':>8} {'mean hops':>9} "
    f"{'max':>4} {'target':>6} {'msg/node/s':>10} {'wall s':>7} {'peak MiB':>8}"
)


def run_one(
    size: int,
    *,
    seed: int,
    join_rate: float,
    keys: int,
    latency: tuple[float, float],
    timeout: float,
) -> str:
    began = time.perf_counter()
    net = SimNetwork(seed, latency=latency)
    net.add_nodes(size)
    join_time = net.join_all(one_by_one=False, interval=1.0 / join_rate)
    converge = net.run_until_converged(timeout, step=0.25)
    rng = random.Random(seed)
    stats = net.route_stats(random_id(rng) for _ in range(keys))
    wall = time.perf_counter() - began
    node_seconds = sum(net.now - t for t, _, _ in _ready_events(net)) or 1.0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    converged = f"{converge:10.2f}" if converge is not None else f"{'>' + str(timeout):>10}"
    correct = f"{100.0 * stats.correct / stats.keys:7.2f}%"
    return (
        f"{size:>6} {join_time:7.2f} {converged} {correct:>8} {stats.mean_hops:9.3f} "
        f"{stats.max_hops:>4} {math.log(size, 16) + 1:6.2f} "
        f"{net.messages_sent / node_seconds:10.1f} {wall:7.1f} {peak_mib:8.0f}"
    )


def _ready_events(net: SimNetwork) -> list[tuple[float, int, object]]:
    from overlay.pastry import Ready

    return [event for event in net.events if isinstance(event[2], Ready)]


def _sizes(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part]


def _latency(text: str) -> tuple[float, float]:
    low, high = (float(part) for part in text.split(","))
    return low, high


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=_sizes, default=[100, 1000, 10_000])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--join-rate", type=float, default=500.0, help="joins per simulated second")
    parser.add_argument("--keys", type=int, default=10_000, help="random keys to route per size")
    parser.add_argument("--latency", type=_latency, default=(0.001, 0.01), help="min,max seconds")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="simulated seconds to converge"
    )
    args = parser.parse_args(argv)
    print(_HEADER, flush=True)
    for size in args.sizes:
        row = run_one(
            size,
            seed=args.seed,
            join_rate=args.join_rate,
            keys=args.keys,
            latency=args.latency,
            timeout=args.timeout,
        )
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
