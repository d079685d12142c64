"""An LB agent's side of the coordinator protocol: the steps of a coordinated agent come from the
coordinator's TICKs, and its actions from the coordinator's ACTIONS.

`CoordinatedAgent` has the `Agent` interface the runner steps (`act(obs)` → weights) and is also the runner's
clock (`ticks`): a step happens when a TICK arrives. Fail-static everywhere: when the coordinator is
unreachable, slow or gone, the agent keeps the weights in force, records the miss, steps on its own period so
its step log and heartbeat go on, and reconnects once per period.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from marllb_cli.agents.rl.levels import level_weights
from marllb_cli.coordination.protocol import Kind, ProtocolError, mac, read_secret, recv_frame, send_frame

__all__ = ["CoordinatedAgent", "CoordinatorAddress"]

log = logging.getLogger("marllb.agent")


class CoordinatorAddress(BaseModel):
    """Where an agent finds its coordinator, and the secret it proves itself with."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: int
    secret: Path


class CoordinatedAgent:
    """One LB's agent in a QMIX/Centr-LB episode: observations out, actions in, over one TCP connection."""

    method = "sed"

    def __init__(
        self,
        address: CoordinatorAddress,
        lb: str,
        index: int,
        levels: Sequence[float],
        scale: np.ndarray | None,
        period: float,
        *,
        neurips_observation: bool = False,
    ) -> None:
        self.address, self.lb, self.index, self.period = address, lb, index, period
        self.levels, self.scale = tuple(levels), scale
        self.secret = read_secret(address.secret)
        self.sock: socket.socket | None = None
        self.action = np.full(len(scale) if scale is not None else 0, len(self.levels) // 2, dtype=np.int64)
        self.weights: np.ndarray | None = None
        self.step: int | None = None  # the coordinator's step of the current tick; None: a step of our own
        self.stats: dict[str, Any] = {}
        self.last_tick: float | None = None
        self.next_connect = 0.0
        # What the runner observes and sends: NeurIPS'22's 16 features per server, or CIKM'22's 6.
        self.neurips_observation = neurips_observation

    # -- connection -------------------------------------------------------------------------------------
    def _connect(self) -> None:
        now = time.monotonic()
        if now < self.next_connect:
            return
        self.next_connect = now + self.period
        try:
            sock = socket.create_connection((self.address.host, self.address.port), timeout=self.period)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            challenge = recv_frame(sock)
            if challenge.kind != Kind.CHALLENGE:
                raise ProtocolError(f"expected CHALLENGE, got {challenge.kind.name}")
            nonce = str(challenge.body.get("nonce", ""))
            send_frame(sock, Kind.HELLO, {"lb": self.lb, "index": self.index, "mac": mac(self.secret, nonce, self.lb)})
            answer = recv_frame(sock)
            if answer.kind != Kind.WELCOME:
                raise ProtocolError(f"refused: {answer.body.get('reason', answer.kind.name)}")
        except (OSError, ProtocolError) as exc:
            log.warning("%s: no coordinator at %s:%d: %s", self.lb, self.address.host, self.address.port, exc)
            return
        log.info("%s: joined the coordinator at %s:%d", self.lb, self.address.host, self.address.port)
        self.sock = sock

    def _drop(self, why: object) -> None:
        log.warning("%s: lost the coordinator: %s", self.lb, why)
        if self.sock is not None:
            self.sock.close()
        self.sock = None

    def close(self) -> None:
        if self.sock is not None:
            try:
                send_frame(self.sock, Kind.BYE)
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    # -- the clock --------------------------------------------------------------------------------------
    def ticks(self, should_run: Callable[[], bool]) -> Iterator[None]:
        """Yield once per step: at each TICK, or after two periods without one (a step of our own, fail-static)."""
        while should_run():
            if self.sock is None:
                self._connect()
            self.step, self.stats = None, {"missed": True, "bytes_in": 0, "bytes_out": 0}
            if self.sock is None:
                time.sleep(max(0.0, min(self.period, self.next_connect - time.monotonic())))
                yield
                continue
            try:
                self.sock.settimeout(2 * self.period)
                frame = recv_frame(self.sock)
                self.stats["bytes_in"] += frame.size
                if frame.kind == Kind.TICK and isinstance(frame.body.get("step"), int):
                    now = time.monotonic()
                    self.step = frame.body["step"]
                    if self.last_tick is not None:
                        self.stats["interval_s"] = now - self.last_tick
                    self.last_tick = now
                # An ACTIONS that arrives after its deadline is dropped here: its step is over.
            except TimeoutError:
                pass
            except (OSError, ProtocolError) as exc:
                self._drop(exc)
            yield

    # -- acting -----------------------------------------------------------------------------------------
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Send `obs` for the current TICK and wait for this LB's action until the tick's deadline; on a miss,
        the weights in force (at first: the middle level)."""
        if self.weights is None:
            self.action = np.full(len(obs), len(self.levels) // 2, dtype=np.int64)
            self.weights = level_weights(self.levels, self.action, self.scale)
        if self.step is None or self.sock is None:
            return self.weights
        sent = time.monotonic()
        try:
            self.stats["bytes_out"] += send_frame(self.sock, Kind.OBS, {"step": self.step, "obs": obs.tolist()})
            self.sock.settimeout(0.9 * self.period)
            while True:
                frame = recv_frame(self.sock)
                self.stats["bytes_in"] += frame.size
                if frame.kind == Kind.ACTIONS and frame.body.get("step") == self.step:
                    break
        except TimeoutError:
            return self.weights
        except (OSError, ProtocolError) as exc:
            self._drop(exc)
            return self.weights
        action = np.asarray(frame.body.get("action"), dtype=np.int64)
        if action.shape != (len(obs),) or action.min() < 0 or action.max() >= len(self.levels):
            log.warning("%s: an action %s that does not fit; keeping the weights", self.lb, action.tolist())
            return self.weights
        self.action = action
        self.weights = level_weights(self.levels, action, self.scale)
        self.stats.update(missed=False, rtt_s=time.monotonic() - sent)
        return self.weights

    def record(self, obs: np.ndarray) -> dict[str, Any]:
        """What the step log adds for a learning agent: the full observation, the action, the coordination."""
        stats = self.stats
        return {
            "obs": np.round(obs, 6).tolist(),
            "action": self.action.tolist(),
            "tick": self.step,
            "missed": bool(stats.get("missed", True)),
            "rtt_s": stats.get("rtt_s"),
            "tick_interval_s": stats.get("interval_s"),
            "bytes_in": int(stats.get("bytes_in", 0)),
            "bytes_out": int(stats.get("bytes_out", 0)),
        }
