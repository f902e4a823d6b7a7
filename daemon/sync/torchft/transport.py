"""How a live replica group hands its training state to a recovering one: signed, bounded,
and never executable.

torchft's own transport sends the state with ``torch.save`` and loads it with
``weights_only=False``: any peer that reaches the port runs code in the receiver, and
anyone can fetch the weights. This one replaces it (torchft takes a ``CheckpointTransport``):

- the state is minerd's checkpoint format (``daemon/statefile.py``): tensors as
  safetensors, everything else as JSON; nothing is unpickled;
- the metadata a recovering replica reads through torchft names the sender's training
  digest, and a foreign one is refused before any connection is made;
- every request proves the group's shared secret (``ft.token_file``): an HMAC-SHA256 over
  the path, a timestamp and a nonce (requests older than ``MAX_SKEW_SECONDS`` or seen
  before are refused); the answer is signed over the request's nonce and the body's
  sha256, so the receiver knows it came from a holder of the secret, unaltered;
- the body is read up to a bound the receiver sets from its own state's size, the JSON
  header has a size cap, and its digest and step must be the expected ones;
- the server listens on ``ft.host`` (every interface without one) at a port of ``ft.ports``.

A refusal is one line on each side (``FT REFUSED: ...``) and an exception torchft turns
into a failed recovery: the receiver votes no and trains on from its own state.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torchft.checkpointing.transport import CheckpointTransport

from daemon import statefile
from daemon.sync.torchft.net import bind_http

log = structlog.get_logger(__name__)

MAGIC = b"MINERD-FT-STATE-1\n"
MAX_HEADER_BYTES = 16 << 20  # the JSON skeleton: counters, optimizer settings, tensor keys
MAX_METADATA_BYTES = 4096
MAX_SKEW_SECONDS = 120.0
NONCES_KEPT = 4096
_SIG = "X-Minerd-Signature"
_TIME = "X-Minerd-Time"
_NONCE = "X-Minerd-Nonce"


class StateRefused(Exception):
    """A peer's state (or request) is not one to take (or answer)."""


def _sign(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def encode_state(tree: Any, digest: str, step: int) -> bytes:
    tensors, skeleton = statefile.pack(tree)
    header = json.dumps({"format": 1, "digest": digest, "step": step, "skeleton": skeleton}).encode()
    return MAGIC + struct.pack(">Q", len(header)) + header + save_tensors(tensors)


def decode_state(body: bytes, digest: str, step: int) -> Any:
    """The state tree in ``body``, or StateRefused: another format, digest or step, or bytes
    that do not parse (nothing in them is executed)."""
    if not body.startswith(MAGIC) or len(body) < len(MAGIC) + 8:
        raise StateRefused("not minerd's state format")
    (size,) = struct.unpack(">Q", body[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if size > MAX_HEADER_BYTES or start + size > len(body):
        raise StateRefused(f"a header of {size} bytes")
    try:
        header = json.loads(body[start : start + size])
    except (ValueError, RecursionError):
        raise StateRefused("a header that is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != 1:
        raise StateRefused("a header of an unknown format")
    if header.get("digest") != digest:
        raise StateRefused(f"training config digest {str(header.get('digest'))[:32]}, this replica {digest}")
    if header.get("step") != step:
        raise StateRefused(f"the state of step {header.get('step')!r}, not {step}")
    try:
        return statefile.unpack(load_tensors(body[start + size :]), header["skeleton"])
    except (SafetensorError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise StateRefused(f"a state that does not decode ({type(exc).__name__})") from None


class SignedTransport(CheckpointTransport[Any]):
    def __init__(self, bind: str, host: str, ports: range | None, key: bytes, digest: str, timeout: timedelta,
                 max_bytes: Callable[[], int], on_foreign: Callable[[str], None]) -> None:
        self.host = host  # what peers are told to reach; the server listens on ``bind`` ("" = everywhere)
        self.key = key
        self.digest = digest
        self.timeout = timeout
        self.max_bytes = max_bytes  # what the receiver accepts, from its own state's size
        self.on_foreign = on_foreign  # a peer of another training config offered its state
        self._cond = threading.Condition()
        self._served: tuple[int, bytes] | None = None  # (step, encoded state) while allowed
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._refused_from: set[str] = set()
        self._server = bind_http(bind, ports, self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="ft-state-server", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    # ---- serving ---------------------------------------------------------------------
    def metadata(self) -> str:
        return json.dumps({"url": f"http://{self.host}:{self.port}", "digest": self.digest})

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
        body = encode_state(state_dict, self.digest, step)  # a copy: training may change the tensors now
        with self._cond:
            self._served = (step, body)
            self._cond.notify_all()

    def disallow_checkpoint(self) -> None:
        with self._cond:
            self._served = None

    def _body_for(self, step: int) -> bytes | None:
        """The state of ``step`` once this replica serves it (a recovering peer may ask first)."""
        end = time.monotonic() + self.timeout.total_seconds()
        with self._cond:
            while self._served is None or self._served[0] != step:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._served[1]

    def _authentic(self, path: str, when: str, nonce: str, sig: str) -> str | None:
        """Why a request does not prove the group's secret, or None."""
        try:
            age = abs(time.time() - float(when))
        except ValueError:
            return "no valid timestamp"
        if age > MAX_SKEW_SECONDS or not (8 <= len(nonce) <= 128):
            return "a stale or malformed request"
        if not hmac.compare_digest(sig, _sign(self.key, "GET", path, when, nonce)):
            return "no valid signature of the group's token"
        with self._cond:
            if nonce in self._nonces:
                return "a replayed request"
            self._nonces[nonce] = time.monotonic()
            while len(self._nonces) > NONCES_KEPT:
                self._nonces.popitem(last=False)
        return None

    def _refused(self, peer: str, why: str) -> None:
        if peer not in self._refused_from:  # one line per peer, not one per request
            self._refused_from.add(peer)
            log.warning(f"FT REFUSED: a peer at {peer} asked for this replica's state: {why}", peer=peer)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        transport = self

        class Handler(BaseHTTPRequestHandler):
            timeout = transport.timeout.total_seconds()

            def do_GET(self) -> None:
                peer = self.client_address[0]
                parts = self.path.split("/")
                why = transport._authentic(self.path, self.headers.get(_TIME, ""), self.headers.get(_NONCE, ""),
                                           self.headers.get(_SIG, ""))
                if why is not None:
                    transport._refused(peer, why)
                    self.send_error(403)
                    return
                if len(parts) != 3 or parts[1] != "state" or not parts[2].isdigit():
                    self.send_error(404)
                    return
                body = transport._body_for(int(parts[2]))
                if body is None:
                    self.send_error(409, "not serving that step")
                    return
                nonce = self.headers.get(_NONCE, "")
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header(_SIG, _sign(transport.key, "STATE", nonce, hashlib.sha256(body).hexdigest()))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # refusals have their own line; a served state is logged by the outer step

        return Handler

    # ---- receiving -------------------------------------------------------------------
    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
        try:
            return self._receive(metadata, step, timeout)
        except StateRefused as exc:
            # One line per reason (torchft logs its traceback of the refusal at debug level only:
            # the filter in connect.py).
            if str(exc) not in self._refused_from:
                self._refused_from.add(str(exc))
                log.warning(f"FT REFUSED: not taking the recovery source's state: {exc}", step=step)
            raise

    def _receive(self, metadata: str, step: int, timeout: timedelta) -> Any:
        if len(metadata) > MAX_METADATA_BYTES:
            raise StateRefused("metadata over its size")
        try:
            meta = json.loads(metadata)
            url, theirs = str(meta["url"]), str(meta["digest"])
        except (ValueError, KeyError, TypeError, RecursionError):
            raise StateRefused("the peer's metadata is not minerd's (another transport, or another program)") \
                from None
        if theirs != self.digest:
            # Decided before any byte of state is fetched.
            self.on_foreign(theirs[:32])
            raise StateRefused(f"the recovery source runs training config {theirs[:32]}, this replica {self.digest}")
        if not url.startswith("http://"):
            raise StateRefused("the peer's address is not an http:// URL")
        path = f"/state/{step}"
        when, nonce = f"{time.time():.3f}", secrets.token_hex(16)
        request = urllib.request.Request(url + path, headers={
            _TIME: when, _NONCE: nonce, _SIG: _sign(self.key, "GET", path, when, nonce)})
        limit = self.max_bytes()
        try:
            with urllib.request.urlopen(request, timeout=timeout.total_seconds()) as resp:
                declared = int(resp.headers.get("Content-Length") or 0)
                if declared > limit:
                    raise StateRefused(f"a state of {declared} bytes, over the {limit} this replica accepts")
                body = resp.read(limit + 1)
                sig = resp.headers.get(_SIG, "")
        except urllib.error.HTTPError as exc:
            why = "it refused this replica's token" if exc.code == 403 else f"HTTP {exc.code}"
            raise StateRefused(f"the recovery source at {url} did not send its state: {why}") from None
        except (OSError, ValueError) as exc:
            raise StateRefused(f"the recovery source at {url} did not answer ({type(exc).__name__})") from None
        if len(body) > limit:
            raise StateRefused(f"a state over the {limit} bytes this replica accepts")
        if not hmac.compare_digest(sig, _sign(self.key, "STATE", nonce, hashlib.sha256(body).hexdigest())):
            raise StateRefused(f"the state from {url} is not signed with the group's token")
        return decode_state(body, self.digest, step)

    def shutdown(self, wait: bool = True) -> None:
        self._server.shutdown()
        self._server.server_close()
        if wait:
            self._thread.join(timeout=5)


__all__ = ["SignedTransport", "StateRefused", "ThreadingHTTPServer", "decode_state", "encode_state"]
