"""The state a live replica group hands a recovering one: minerd's own format (never a
pickle), signed with the group's token both ways, bounded, and refused with one line when
it is not the group's."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from daemon.rowtable import RowChanges, RowTable
from daemon.sync.torchft.transport import MAGIC, SignedTransport, StateRefused, _sign, decode_state, encode_state
from tests.conftest import small_sets

KEY = b"0123456789abcdef-the-group-token"
DIGEST = "6a72d3291f0c33e5"


def a_state() -> dict[str, Any]:
    """A tree shaped like what torchft hands over: the user's state and torchft's counters."""
    table = torch.randn(64, 4)
    return {"user": {"default": {
        "digest": DIGEST,
        "model": {"w": torch.randn(3, 5), "b": torch.zeros(5, dtype=torch.bfloat16)},
        "training": {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 5)}},
                                   "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "fused": None}]},
                     "counters": {"outer_step": 2, "global_step": 10},
                     "rng": {"torch": torch.get_rng_state(), "cuda": []},
                     "extra": {"embeddings": {"rows": RowTable.snapshot({"table": table}, RowChanges(64))}}},
    }}, "torchft": {"step": 7, "batches_committed": 21}}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, RowTable):
        return isinstance(b, RowTable) and same(a.tensors, b.tensors)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class Marker:
    """Unpickling this writes a file: the proof that a pickle ran."""

    path = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).write_text, ("a pickle ran code",))


class TestFormat:
    """Encoding and decoding, with no server: what a received body must be to be taken."""

    def test_round_trip(self) -> None:
        state = a_state()
        assert same(decode_state(encode_state(state, DIGEST, 7), DIGEST, 7), state)

    def test_a_pickle_is_never_unpickled(self, tmp_path: Path) -> None:
        Marker.path = str(tmp_path / "ran")
        for body in (pickle.dumps({"user": Marker()}), MAGIC + pickle.dumps(Marker())):
            with pytest.raises(StateRefused):
                decode_state(body, DIGEST, 7)
        assert not (tmp_path / "ran").exists()

    @pytest.mark.parametrize(("tamper", "why"), [
        ("digest", "training config digest"),
        ("step", "the state of step 8"),
        ("header size", "a header of"),
        ("deep header", "not JSON"),
        ("truncated tensors", "does not decode"),
    ])
    def test_refusals(self, tamper: str, why: str) -> None:
        body = encode_state(a_state(), DIGEST, 7)
        if tamper == "digest":
            body = encode_state(a_state(), "0123456789abcdef", 7)
        elif tamper == "step":
            body = encode_state(a_state(), DIGEST, 8)
        elif tamper == "header size":
            body = MAGIC + struct.pack(">Q", 1 << 40) + b"{}"
        elif tamper == "deep header":
            deep = b"[" * 100_000 + b"]" * 100_000
            body = MAGIC + struct.pack(">Q", len(deep)) + deep
        else:
            body = body[:-40]
        with pytest.raises(StateRefused, match=why):
            decode_state(body, DIGEST, 7)


def transport(key: bytes = KEY, digest: str = DIGEST, bound: int = 1 << 30) -> SignedTransport:
    seen: list[str] = []
    t = SignedTransport("127.0.0.1", "127.0.0.1", None, key, digest, timedelta(seconds=5), lambda: bound,
                        seen.append)
    t.foreign_seen = seen  # type: ignore[attr-defined]
    return t


@pytest.fixture
def pair() -> Iterator[tuple[SignedTransport, SignedTransport]]:
    source, receiver = transport(), transport()
    yield source, receiver
    source.shutdown()
    receiver.shutdown()


@pytest.mark.integration
class TestBetweenReplicas:
    """Two state servers on this machine, as two replica groups would run them."""

    def test_the_state_travels_whole(self, pair: tuple[SignedTransport, SignedTransport]) -> None:
        source, receiver = pair
        state = a_state()
        source.send_checkpoint([1], 7, state, timedelta(seconds=5))
        got = receiver.recv_checkpoint(0, source.metadata(), 7, timedelta(seconds=5))
        assert same(got, state)
        assert json.loads(source.metadata()) == {"url": f"http://127.0.0.1:{source.port}", "digest": DIGEST}

    def test_a_peer_without_the_token_is_refused_on_both_sides(self) -> None:
        source, stranger = transport(), transport(key=b"another token, not the group's")
        try:
            source.send_checkpoint([1], 7, a_state(), timedelta(seconds=5))
            with capture_logs() as logs, pytest.raises(StateRefused, match="refused this replica's token"):
                stranger.recv_checkpoint(0, source.metadata(), 7, timedelta(seconds=5))
            with capture_logs() as again, pytest.raises(StateRefused):
                stranger.recv_checkpoint(0, source.metadata(), 7, timedelta(seconds=5))
        finally:
            source.shutdown()
            stranger.shutdown()
        lines = [e["event"] for e in logs if str(e["event"]).startswith("FT REFUSED")]
        assert any("a peer at 127.0.0.1 asked for this replica's state: no valid signature" in x for x in lines)
        assert any("did not send its state: it refused this replica's token" in x for x in lines)
        assert len(lines) == 2  # one line on each side
        # The source says it once per peer, not once per request.
        assert not any("asked for this replica's state" in str(e["event"]) for e in again)

    def test_another_config_is_refused_before_any_request(self, pair: tuple[SignedTransport, SignedTransport]
                                                          ) -> None:
        source, _ = pair
        other = transport(digest="0123456789abcdef")
        try:
            source.send_checkpoint([1], 7, a_state(), timedelta(seconds=5))
            with pytest.raises(StateRefused, match="runs training config"):
                other.recv_checkpoint(0, source.metadata(), 7, timedelta(seconds=5))
            assert other.foreign_seen == [DIGEST]  # type: ignore[attr-defined]
            assert source._nonces == {}  # nothing reached the source
        finally:
            other.shutdown()

    def test_a_state_over_the_receivers_bound(self, pair: tuple[SignedTransport, SignedTransport]) -> None:
        source, _ = pair
        small = transport(bound=1000)
        try:
            source.send_checkpoint([1], 7, a_state(), timedelta(seconds=5))
            with pytest.raises(StateRefused, match="over the 1000"):
                small.recv_checkpoint(0, source.metadata(), 7, timedelta(seconds=5))
        finally:
            small.shutdown()

    def test_a_replayed_request_is_refused(self, pair: tuple[SignedTransport, SignedTransport]) -> None:
        import time
        import urllib.error
        import urllib.request

        source, _ = pair
        source.send_checkpoint([1], 7, a_state(), timedelta(seconds=5))
        path, when, nonce = "/state/7", f"{time.time():.3f}", "00112233445566778899aabbccddeeff"
        headers = {"X-Minerd-Time": when, "X-Minerd-Nonce": nonce, "X-Minerd-Signature": _sign(KEY, "GET", path,
                                                                                                 when, nonce)}
        url = f"http://127.0.0.1:{source.port}{path}"
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
        assert exc.value.code == 403

    def test_a_signed_pickle_is_still_not_run(self, tmp_path: Path) -> None:
        """A peer that holds the token but serves torchft's own format (a pickle) is refused
        by format: nothing from it is executed."""
        Marker.path = str(tmp_path / "ran")
        body = pickle.dumps({"user": {"default": Marker()}, "torchft": {"step": 7}})

        class Rogue(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Minerd-Signature", _sign(KEY, "STATE", self.headers["X-Minerd-Nonce"],
                                                             hashlib.sha256(body).hexdigest()))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", 0), Rogue)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        receiver = transport()
        try:
            meta = json.dumps({"url": f"http://127.0.0.1:{server.server_address[1]}", "digest": DIGEST})
            with pytest.raises(StateRefused, match="not minerd's state format"):
                receiver.recv_checkpoint(0, meta, 7, timedelta(seconds=5))
        finally:
            server.shutdown()
            receiver.shutdown()
        assert not (tmp_path / "ran").exists()

    def test_listens_on_the_configured_host_and_range(self, tmp_path: Path) -> None:
        from daemon.sync.torchft.net import free_port

        first = free_port("127.0.0.1", range(29650, 29700))
        t = SignedTransport("127.0.0.1", "127.0.0.1", range(first, first + 3), KEY, DIGEST, timedelta(seconds=5),
                            lambda: 1 << 20, lambda d: None)
        try:
            assert first <= t.port < first + 3 and t._server.server_address[0] == "127.0.0.1"
        finally:
            t.shutdown()


def test_the_state_of_a_real_run_round_trips(tmp_path: Path) -> None:
    """What a two-tower run with ID embeddings hands a peer (the trainer's whole state) decodes
    to the same tensors and counters."""
    from daemon.run.local import cpu_run

    run = cpu_run(small_sets(tmp_path, "embeddings.enabled=true", "train.max_steps=3")).run
    run.trainer.run()
    state = {"digest": DIGEST, "model": run.trainer.model.state_dict(), "training": run.trainer.training_state()}
    assert same(decode_state(encode_state(state, DIGEST, 3), DIGEST, 3), state)
