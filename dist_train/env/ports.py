"""A free TCP port for a server a later command starts (torchrun's store, an MLflow server, the
slurmds of a local test cluster): tools, tests and benchmarks; a job itself never picks one."""
from __future__ import annotations

import random
import socket

_handed_out: set = set()


def free_port(count: int = 1) -> int:
    """A free TCP port on 127.0.0.1, or the first of ``count`` consecutive free ports.

    Taken below the kernel's ephemeral range: a port from ``bind(0)`` comes from that range, so
    between now and its use any outgoing connection (gloo's, a store client's) may be given it as
    its own local port, and the server then fails with EADDRINUSE (seen: a batch job's store in
    test_parity). Ports below the range are only ever taken by an explicit bind. Never the same
    port twice in one process."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    rng = random.SystemRandom()
    for _ in range(200 if ephemeral_low > 12000 else 0):
        first = rng.randrange(10000, ephemeral_low - count)
        ports = range(first, first + count)
        if _handed_out.intersection(ports) or not all(_bindable(port) for port in ports):
            continue
        _handed_out.update(ports)
        return first
    for _ in range(200):  # (no room below the range: the kernel's choice)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count < 65535 and all(_bindable(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
