"""The LB's flow table and the per-server statistics it feeds (on-going flows q_j and the reservoirs).

An LB sees only the client → server direction (replies return directly), so a flow's life is read from the
client's segments:

    SYN (no ACK), unknown key   new flow: the selector picks server j, q_j += 1, inter-arrival sampled
    any segment of an open flow refresh; an ACK samples the flow duration so far (now − SYN time) for j
    FIN or RST                  the flow ends: q_j −= 1, its completion time (now − SYN time) is sampled
    no segment for idle_timeout the flow ends by timeout: q_j −= 1 as well (the papers' artefact forgot this)

An ended flow stays in the table as a forwarding-only entry: `linger` seconds after a FIN or RST, so the
client's last ACK still reaches the same server instead of being hashed to another one that would answer
with a reset (IPVS's FIN_WAIT/TIME_WAIT), and `established_linger` (15 minutes, IPVS's established TCP
timeout) after an idle timeout. With direct server return the client may send nothing while a long request
computes; its next segment (the ACK of the response) must still reach that server. A SYN on a lingering
key is a new connection reusing the port and starts a new flow.

Segments of flows the table never saw (the LB restarted, or the router moved the flow) go to the Maglev
server of their hash and are counted as untracked. The table is bounded: beyond `max_flows` entries, open
or lingering, a SYN is forwarded by hash untracked (counted as overflow), so neither a SYN flood nor a
flood of SYN+RST pairs can exhaust memory. (The compiled simulator bounds open flows only: it never
reaches the bound.)
"""

from __future__ import annotations

import random
import zlib

from marllb_cli.dataplane.packets import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from marllb_cli.dataplane.selection import Selector
from marllb_cli.features import RESERVOIR_SLOTS, Reservoir

__all__ = ["ESTABLISHED_LINGER_S", "FlowTable", "IDLE_TIMEOUT_S", "LINGER_S", "MAX_FLOWS"]

IDLE_TIMEOUT_S = 40.0
LINGER_S = 2.0
#: How long an idle-timed-out flow keeps forwarding to its server without a segment (IPVS: 15 minutes).
ESTABLISHED_LINGER_S = 900.0
MAX_FLOWS = 262_144

# Entry fields (a list per flow: cheaper than an object on the per-packet path).
_SERVER, _SYN_TIME, _LAST, _OPEN, _KEEP = 0, 1, 2, 3, 4


class FlowTable:
    """Flow → server map of one LB, with q_j, counters and the feature reservoirs."""

    def __init__(
        self,
        selector: Selector,
        *,
        idle_timeout: float = IDLE_TIMEOUT_S,
        linger: float = LINGER_S,
        established_linger: float = ESTABLISHED_LINGER_S,
        max_flows: int = MAX_FLOWS,
        slots: int = RESERVOIR_SLOTS,
        keep_probability: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.selector = selector
        self.idle_timeout = idle_timeout
        self.linger = linger
        self.established_linger = max(established_linger, linger)
        self.max_flows = max_flows
        rng = rng or random.Random()
        n = selector.n
        self.flows = [0] * n  # q_j
        self.new_flows = [0] * n
        self.packets = [0] * n
        self.durations = [Reservoir(slots, keep_probability, rng) for _ in range(n)]
        self.completions = [Reservoir(slots, keep_probability, rng) for _ in range(n)]
        self.interarrivals = Reservoir(slots, keep_probability, rng)
        self.closed = 0
        self.timed_out = 0
        self.untracked = 0
        self.overflow = 0
        self._table: dict[bytes, list] = {}
        self._open = 0
        self._last_new_flow: float | None = None

    def __len__(self) -> int:
        return self._open

    def server_for(self, key: bytes, flags: int, now: float) -> int:
        """The server of the segment with flow `key` and TCP `flags` seen at time `now` (seconds)."""
        entry = self._table.get(key)
        syn_only = flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN  # a bare SYN opens a flow
        if entry is not None and (entry[_OPEN] or not syn_only):
            server = entry[_SERVER]
            entry[_LAST] = now
            self.packets[server] += 1
            if not entry[_OPEN]:
                if flags & (TCP_FIN | TCP_RST):  # a timed-out flow closing: its trailing ACK, then gone
                    entry[_KEEP] = min(entry[_KEEP], self.linger)
            else:
                if flags & (TCP_FIN | TCP_RST):
                    self._end(entry, now, self.linger)
                    self.closed += 1
                    self.completions[server].add(now, now - entry[_SYN_TIME])
                elif flags & TCP_ACK:
                    self.durations[server].add(now, now - entry[_SYN_TIME])
            return server
        if not syn_only or (entry is None and len(self._table) >= self.max_flows):
            if syn_only:
                self.overflow += 1
            self.untracked += 1
            server = self.selector.by_hash(zlib.crc32(key))
            self.packets[server] += 1
            return server
        server = self.selector.choose(zlib.crc32(key), self.flows)
        self._table[key] = [server, now, now, True, self.linger]
        self._open += 1
        self.flows[server] += 1
        self.new_flows[server] += 1
        self.packets[server] += 1
        if self._last_new_flow is not None:
            self.interarrivals.add(now, now - self._last_new_flow)
        self._last_new_flow = now
        return server

    def expire(self, now: float) -> int:
        """End open flows idle for `idle_timeout` and forget ended ones after `linger`; return how many ended."""
        timed_out = 0
        forget = []
        for key, entry in self._table.items():
            idle = now - entry[_LAST]
            if entry[_OPEN]:
                if idle >= self.idle_timeout:
                    self._end(entry, now, self.established_linger)
                    timed_out += 1
            elif idle >= entry[_KEEP]:
                forget.append(key)
        for key in forget:
            del self._table[key]
        self.timed_out += timed_out
        return timed_out

    def _end(self, entry: list, now: float, keep: float) -> None:
        """The flow is over for q_j; its entry keeps forwarding until `keep` seconds pass without a segment."""
        entry[_OPEN] = False
        entry[_KEEP] = keep
        entry[_LAST] = now
        self.flows[entry[_SERVER]] -= 1
        self._open -= 1
