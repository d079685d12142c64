"""Server selection for a new flow: ecmp (Maglev), wcmp (weighted random), lsq and sed.

Shared by the packet dataplane and the simulator, so both make the same decision from the same state.

- `ecmp`: Maglev consistent hashing of the flow's 5-tuple hash (Eisenbud et al., NSDI'16): a lookup table
  of prime size M in which each server owns ≈ M/n entries; weights are ignored.
- `wcmp`: a server drawn with probability ∝ w_j, in O(1) with Vose's alias table.
- `lsq`:  argmin_j q_j (local shortest queue: the flows this LB itself has on-going on each server).
- `sed`:  argmin_j (q_j + 1) / w_j (shortest expected delay), compared as (q_i + 1)·w_j < (q_j + 1)·w_i.

IPVS semantics throughout: a server with weight 0 is drained (receives no new flow; its existing flows
continue, since only new flows are ever selected); ties go to the lowest server index, deterministically.
The weights only change future choices: a flow's server is fixed by the flow table once chosen.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import struct
import zlib
from collections.abc import Sequence

__all__ = ["METHODS", "AliasTable", "Selector", "flow_hash", "flow_key", "maglev_table", "MAGLEV_TABLE_SIZE"]

METHODS = ("ecmp", "wcmp", "lsq", "sed")
#: Prime, and ≥ 100 × the largest server count we plan for, as Maglev recommends.
MAGLEV_TABLE_SIZE = 65537
_FLOW_KEY = struct.Struct("!4s4sHH")


def flow_key(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The 12-byte key of a TCP flow (src IP, dst IP, src port, dst port), as the packet parser yields it."""
    return _FLOW_KEY.pack(src, dst, sport, dport)


def flow_hash(key: bytes) -> int:
    """A 32-bit hash of a flow key that is the same in every process (unlike Python's salted `hash`)."""
    return zlib.crc32(key)


@functools.lru_cache(maxsize=32)
def maglev_table(n: int, size: int = MAGLEV_TABLE_SIZE) -> tuple[int, ...]:
    """Maglev lookup table for servers 0..n-1: entry c is the server of flows whose hash ≡ c (mod size).

    Cached: it depends only on (n, size), and the simulator builds one selector per LB per run."""
    if n < 1:
        raise ValueError("maglev needs at least one server")
    offsets, skips = [], []
    for j in range(n):
        digest = hashlib.blake2b(f"server-{j}".encode(), digest_size=16).digest()
        h1, h2 = struct.unpack("!QQ", digest)
        offsets.append(h1 % size)
        skips.append(h2 % (size - 1) + 1)
    table = [-1] * size
    next_index = [0] * n
    filled = 0
    while True:
        for j in range(n):
            candidate = (offsets[j] + next_index[j] * skips[j]) % size
            while table[candidate] >= 0:
                next_index[j] += 1
                candidate = (offsets[j] + next_index[j] * skips[j]) % size
            table[candidate] = j
            next_index[j] += 1
            filled += 1
            if filled == size:
                return tuple(table)


class AliasTable:
    """Vose's alias method: draw index j with probability w_j / Σw in O(1) from one uniform number."""

    def __init__(self, weights: Sequence[float]) -> None:
        n = len(weights)
        if n == 0 or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError("weights must be finite, non-negative and at least one positive")
        total = float(sum(weights))
        if total <= 0 or not math.isfinite(total):
            raise ValueError("weights must be finite, non-negative and at least one positive")
        scaled = [w * n / total for w in weights]
        self.prob = [0.0] * n
        self.alias = list(range(n))
        small = [j for j, p in enumerate(scaled) if p < 1.0]
        large = [j for j, p in enumerate(scaled) if p >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            self.prob[s] = scaled[s]
            self.alias[s] = g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        for j in large + small:  # leftovers are 1 up to rounding
            self.prob[j] = 1.0 if weights[j] > 0 else 0.0
        self.n = n

    def sample(self, u: float) -> int:
        """The index for uniform `u` in [0, 1)."""
        scaled = u * self.n
        j = int(scaled)
        return j if scaled - j < self.prob[j] else self.alias[j]


class Selector:
    """Picks the server of each new flow; method and weights can change at any time without a restart."""

    def __init__(
        self,
        n_servers: int,
        *,
        method: str = "sed",
        weights: Sequence[float] | None = None,
        rng: random.Random | None = None,
        maglev_size: int = MAGLEV_TABLE_SIZE,
    ) -> None:
        self.n = n_servers
        self.rng = rng or random.Random()
        self._maglev = maglev_table(n_servers, maglev_size)
        self.set_weights(weights if weights is not None else [1.0] * n_servers)
        self.set_method(method)

    def set_method(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
        self.method = method

    def set_weights(self, weights: Sequence[float]) -> None:
        """New weights for future flows; 0 drains a server. At least one weight must be positive."""
        if len(weights) != self.n:
            raise ValueError(f"expected {self.n} weights, got {len(weights)}")
        alias = AliasTable(weights)  # validates: non-negative, at least one positive
        self.weights = [float(w) for w in weights]
        self._alias = alias

    def choose(self, flow_hash_value: int, flows: Sequence[int]) -> int:
        """Server for a new flow, given its 5-tuple hash and this LB's on-going flow counts q."""
        method = self.method
        if method == "sed":
            return sed(flows, self.weights)
        if method == "lsq":
            return lsq(flows, self.weights)
        if method == "wcmp":
            return self._alias.sample(self.rng.random())
        return self.by_hash(flow_hash_value)

    def by_hash(self, flow_hash_value: int) -> int:
        """The Maglev server of a hash, whatever the method: where packets of flows we never saw start go."""
        return self._maglev[flow_hash_value % len(self._maglev)]


def sed(flows: Sequence[int], weights: Sequence[float]) -> int:
    """argmin_j (q_j + 1) / w_j over servers with w_j > 0; the lowest index wins ties."""
    best, best_q, best_w = -1, 0, 0.0
    for j, w in enumerate(weights):
        if w <= 0:
            continue
        q1 = flows[j] + 1
        if best < 0 or q1 * best_w < best_q * w:
            best, best_q, best_w = j, q1, w
    return best


def lsq(flows: Sequence[int], weights: Sequence[float]) -> int:
    """argmin_j q_j over servers with w_j > 0; the lowest index wins ties."""
    best = -1
    for j, w in enumerate(weights):
        if w > 0 and (best < 0 or flows[j] < flows[best]):
            best = j
    return best
