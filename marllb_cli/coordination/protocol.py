"""The coordinator protocol: how LB agents and the QMIX/Centr-LB coordinator talk over TCP.

Every message is one frame:

    magic "MLBC" (4 bytes) · version (1 byte) · type (1 byte) · body length (4 bytes, big endian) · body

The body is a UTF-8 JSON object. A reader refuses, and closes the connection on, a wrong magic, another
version, an unknown type, a body over `MAX_BODY` bytes or a body that is not a JSON object: a malformed or
hostile peer costs the coordinator one connection, never the process.

A session, agent → coordinator (C) unless marked:

    C: CHALLENGE {nonce}            a fresh random nonce per connection
       HELLO     {lb, index, mac}   mac = HMAC-SHA256(secret, nonce ‖ lb): the secret never travels
    C: WELCOME   {period_s, deadline_s}     or REFUSED {reason} and the connection closes
    C: TICK      {step, t}          every period: the coordinator sets the pace of every agent
       OBS       {step, obs}        the agent's observation [servers][features] at that tick
    C: ACTIONS   {step, action}     its level per server, once every agent answered or the deadline passed
       BYE       {}                 the agent leaves (a closed socket means the same)

An agent whose OBS misses the deadline gets no ACTIONS for that step and keeps its weights (fail-static).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

__all__ = [
    "MAGIC",
    "MAX_BODY",
    "SECRET_FILE",
    "VERSION",
    "Frame",
    "Kind",
    "ProtocolError",
    "decode_header",
    "encode",
    "mac",
    "new_secret",
    "read_secret",
    "recv_frame",
    "send_frame",
]

MAGIC = b"MLBC"
VERSION = 1
HEADER = struct.Struct("!4sBBI")
#: The testbed's secret, in its state directory (mode 0600), made at deploy.
SECRET_FILE = "coordinator.secret"
#: Larger than any honest message: an observation of 1 000 servers is about 150 KB of JSON (400 KB with
#: NeurIPS'22's 16 features per server).
MAX_BODY = 1 << 20


class Kind(IntEnum):
    CHALLENGE = 1
    HELLO = 2
    WELCOME = 3
    REFUSED = 4
    TICK = 5
    OBS = 6
    ACTIONS = 7
    BYE = 8


class ProtocolError(Exception):
    """A frame that breaks the protocol; the connection that sent it is closed."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    body: dict[str, Any]
    size: int  # bytes on the wire, header included


def encode(kind: Kind, body: dict[str, Any] | None = None) -> bytes:
    """One frame's bytes."""
    data = json.dumps(body or {}, separators=(",", ":")).encode()
    if len(data) > MAX_BODY:
        raise ProtocolError(f"a {kind.name} body of {len(data)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(MAGIC, VERSION, int(kind), len(data)) + data


def decode_header(header: bytes) -> tuple[Kind, int]:
    """(type, body length) of a frame's header, or a `ProtocolError` saying what is wrong with it."""
    magic, version, kind, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"not a marllb coordinator frame (magic {magic!r})")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}: run one marllb version")
    if length > MAX_BODY:
        raise ProtocolError(f"a body of {length} bytes exceeds {MAX_BODY}")
    try:
        return Kind(kind), length
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None


def decode_body(kind: Kind, data: bytes) -> Frame:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(f"a {kind.name} body that is not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"a {kind.name} body that is not a JSON object")
    return Frame(kind, body, HEADER.size + len(data))


def send_frame(sock: socket.socket, kind: Kind, body: dict[str, Any] | None = None) -> int:
    """Send one frame on a blocking socket; return its size in bytes."""
    data = encode(kind, body)
    sock.sendall(data)
    return len(data)


def recv_frame(sock: socket.socket) -> Frame:
    """Read one frame from a blocking socket (its timeout applies); `ConnectionError` when the peer closed."""
    kind, length = decode_header(_recv_exactly(sock, HEADER.size))
    return decode_body(kind, _recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def mac(secret: bytes, nonce: str, lb: str) -> str:
    """The HELLO proof: HMAC-SHA256 of the challenge nonce and the LB's name under the testbed's secret."""
    return hmac.new(secret, f"{nonce}\0{lb}".encode(), hashlib.sha256).hexdigest()


def new_secret(path: Path) -> None:
    """Write a fresh 32-byte secret to `path`, readable by its owner only (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(secrets.token_hex(32))


def read_secret(path: Path) -> bytes:
    return path.read_text().strip().encode()
