"""The coordinator of QMIX and Centr-LB episodes on the live testbed: the master agent of CIKM'22 §4.6.

    python -m marllb_cli.coordination.coordinator SPEC.json

It listens on one of the testbed's own addresses (an LB's data address; never a wildcard), admits only agents
that prove they hold the testbed's secret (`protocol`), and sets the pace: every period it sends TICK to every
connected agent, waits until each answered with its observation or the deadline passed, computes every LB's
action with the joint actor (`agents.rl.exploring.JointActor`) and sends each agent that answered its own.
An agent that did not answer keeps its weights; the coordinator acts for it on its last observation, and the
miss is recorded. One JSON line per tick goes to the trajectory file: every LB's observation and action,
who answered, how long the round took and the bytes moved, which is how trajectories merge at the master.

Single-threaded asyncio: a slow or broken agent can only miss its own deadlines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from marllb_cli.coordination.protocol import (
    HEADER,
    Kind,
    ProtocolError,
    decode_body,
    decode_header,
    encode,
    mac,
    read_secret,
)
from marllb_cli.features import N_FEATURES
from marllb_cli.services import next_tick

__all__ = ["Coordinator", "CoordinatorSpec", "main"]

log = logging.getLogger("marllb.coordinator")
#: A connection that has not said HELLO within this many seconds is closed.
HANDSHAKE_TIMEOUT_S = 5.0


class CoordinatorSpec(BaseModel):
    """What the coordinator needs; written by the controller before each episode."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lbs: list[str]  # agent names in LB order: index i in HELLO must be lbs[i]
    n_servers: int
    host: str
    port: int
    secret: Path
    period: float = 0.25
    deadline: float = 0.1  # seconds after a TICK within which OBS must arrive
    policy: Path | None = None  # policy.pt of the joint actor; None: a fixed action (protocol tests)
    uniform: bool = False
    epsilon: float = 0.05
    seed: int = 0
    trajectory: Path
    features: int = N_FEATURES  # per server in every OBS: CIKM'22's 6, or NeurIPS'22's 16 (`neurips_obs`)


@dataclass
class Session:
    lb: str
    index: int
    writer: asyncio.StreamWriter
    obs_step: int = -1
    obs: np.ndarray | None = None
    bytes_in: int = 0
    bytes_out: int = 0

    def send(self, kind: Kind, body: dict) -> None:
        data = encode(kind, body)
        self.bytes_out += len(data)
        self.writer.write(data)


@dataclass
class Coordinator:
    spec: CoordinatorSpec
    secret: bytes
    sessions: dict[int, Session] = field(default_factory=dict)
    step: int = 0
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    refused: int = 0

    def __post_init__(self) -> None:
        m, n = len(self.spec.lbs), self.spec.n_servers
        self.last_obs = [np.zeros((n, self.spec.features), dtype=np.float32) for _ in range(m)]
        if self.spec.policy is not None:
            from marllb_cli.agents.rl.exploring import JointActor

            self.actor = JointActor(
                self.spec.policy, m, n, uniform=self.spec.uniform, epsilon=self.spec.epsilon, seed=self.spec.seed
            )
            self.act = self.actor.act
        else:
            self.act = lambda _: np.ones((m, n), dtype=np.int64)

    # -- connections ------------------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        session: Session | None = None
        try:
            session = await asyncio.wait_for(self._admit(reader, writer), HANDSHAKE_TIMEOUT_S)
            if session is None:
                return
            while True:
                frame = await _read(reader)
                session.bytes_in += frame.size
                if frame.kind == Kind.BYE:
                    break
                if frame.kind != Kind.OBS:
                    raise ProtocolError(f"unexpected {frame.kind.name} from {session.lb}")
                self._observation(session, frame.body)
        except (TimeoutError, ProtocolError, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.warning("%s (%s): closed: %s", session.lb if session else "unadmitted", peer, exc or type(exc).__name__)
        except asyncio.CancelledError:
            pass  # the coordinator is stopping
        finally:
            if session is not None and self.sessions.get(session.index) is session:
                del self.sessions[session.index]
                log.info("%s left at step %d", session.lb, self.step)
            writer.close()

    async def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Session | None:
        nonce = secrets.token_hex(16)
        writer.write(encode(Kind.CHALLENGE, {"nonce": nonce}))
        hello = await _read(reader)
        body = hello.body
        lb, index = body.get("lb"), body.get("index")
        reason = None
        if hello.kind != Kind.HELLO:
            reason = f"expected HELLO, got {hello.kind.name}"
        elif not isinstance(index, int) or not 0 <= index < len(self.spec.lbs) or self.spec.lbs[index] != lb:
            reason = f"{lb!r} at index {index!r} is not an LB of this testbed"
        elif not isinstance(body.get("mac"), str) or not secrets.compare_digest(
            body["mac"], mac(self.secret, nonce, lb)
        ):
            reason = "wrong secret"
        if reason:
            self.refused += 1
            log.warning("refused %s: %s", writer.get_extra_info("peername"), reason)
            writer.write(encode(Kind.REFUSED, {"reason": reason}))
            await writer.drain()
            return None
        previous = self.sessions.get(index)
        if previous is not None:  # a reconnect: the new connection replaces the old
            previous.writer.close()
        session = Session(lb, index, writer, bytes_in=hello.size)
        self.sessions[index] = session
        session.send(Kind.WELCOME, {"period_s": self.spec.period, "deadline_s": self.spec.deadline})
        log.info("%s joined at step %d", lb, self.step)
        return session

    def _observation(self, session: Session, body: dict) -> None:
        if body.get("step") != self.step or session.obs_step == self.step:
            return  # late (its step's round closed) or repeated: ignored, it stays a miss
        try:
            obs = np.asarray(body["obs"], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"{session.lb}: an OBS without a numeric obs") from None
        if obs.shape != (self.spec.n_servers, self.spec.features) or not np.isfinite(obs).all():
            raise ProtocolError(f"{session.lb}: an observation of shape {obs.shape}, or not finite")
        session.obs, session.obs_step = obs, self.step
        if all(s.obs_step == self.step for s in self.sessions.values()):
            self.answered.set()

    # -- rounds -----------------------------------------------------------------------------------------
    async def run(self, should_run) -> None:
        server = await asyncio.start_server(self.handle, self.spec.host, self.spec.port)
        log.info("listening on %s:%d for %s", self.spec.host, self.spec.port, ", ".join(self.spec.lbs))
        tick = time.monotonic()
        with open(self.spec.trajectory, "a", buffering=1) as trajectory:
            while should_run():
                row = await self._round()
                trajectory.write(json.dumps(row) + "\n")
                now = time.monotonic()
                tick = next_tick(tick, self.spec.period, now)
                await asyncio.sleep(max(0.0, tick - now))
        server.close()
        for session in list(self.sessions.values()):
            session.writer.close()

    async def _round(self) -> dict:
        self.step += 1
        started = time.monotonic()
        before = self._bytes()
        self.answered.clear()
        for session in list(self.sessions.values()):
            session.send(Kind.TICK, {"step": self.step, "t": started})
        if self.sessions:
            try:
                await asyncio.wait_for(self.answered.wait(), self.spec.deadline)
            except TimeoutError:
                pass
        waited = time.monotonic() - started
        fresh = [False] * len(self.spec.lbs)
        for index, session in self.sessions.items():
            if session.obs_step == self.step and session.obs is not None:
                self.last_obs[index], fresh[index] = session.obs, True
        actions = self.act(self.last_obs)
        for index, session in list(self.sessions.items()):
            if fresh[index]:
                session.send(Kind.ACTIONS, {"step": self.step, "action": actions[index].tolist()})
        bytes_in, bytes_out = (after - was for after, was in zip(self._bytes(), before, strict=True))
        return {
            "step": self.step,
            "t": started,
            "wait_s": waited,
            "act_s": time.monotonic() - started - waited,
            "fresh": fresh,
            "connected": sorted(self.sessions),
            "obs": [np.round(obs, 6).tolist() for obs in self.last_obs],
            "action": actions.tolist(),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
        }

    def _bytes(self) -> tuple[int, int]:
        return sum(s.bytes_in for s in self.sessions.values()), sum(s.bytes_out for s in self.sessions.values())


async def _read(reader: asyncio.StreamReader):
    kind, length = decode_header(await reader.readexactly(HEADER.size))
    return decode_body(kind, await reader.readexactly(length))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marllb-coordinator", description="the QMIX/Centr-LB coordinator")
    parser.add_argument("spec", type=Path, help="CoordinatorSpec JSON written by `marllb train --env testbed`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(message)s")
    spec = CoordinatorSpec.model_validate_json(args.spec.read_text())
    coordinator = Coordinator(spec, read_secret(spec.secret))
    stopped = asyncio.Event()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        await coordinator.run(lambda: not stopped.is_set())

    log.info("pid %d", os.getpid())
    asyncio.run(serve())
    log.info("stopped after %d steps (%d connections refused)", coordinator.step, coordinator.refused)
    return 0


if __name__ == "__main__":
    sys.exit(main())
