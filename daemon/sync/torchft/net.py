"""Where the torchft outer sync listens: ``ft.host``, on ports of ``ft.ports``.

torchft's own listeners take any port on every interface (its manager server binds
``[::]``; a ``TCPStore`` too). A replica group exposed to a data-centre network listens
where the operator says instead: the state server and the group's store are bound here
to ``ft.host`` at a port of the range, and the manager server, which torchft builds
itself, is given that address through the one seam it has (its ``bind`` argument).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from daemon.config import ConfigError, problem


def parse_ports(text: str) -> range | None:
    """``"29600-29699"`` as a range of ports; ``""`` as None (any free port)."""
    if not text:
        return None
    lo, sep, hi = text.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError("must be a range of ports, like 29600-29699")
    first, last = int(lo), int(hi)
    if not 1024 <= first <= last <= 65535:
        raise ValueError("must be ports between 1024 and 65535, the first not above the last")
    return range(first, last + 1)


def address_of(host: str) -> str:
    """The IP address ``host`` names (listeners bind addresses, not names); ``""`` (no
    ``ft.host``) is every interface, as torchft binds by itself."""
    if not host:
        return "0.0.0.0"
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except OSError as exc:
        raise ConfigError([problem("ft.host", f"does not resolve ({exc.strerror or exc})", host)]) from None


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _candidates(ports: range | None) -> Iterator[int]:
    yield from (ports if ports is not None else [0])


def _none_free(host: str, ports: range | None) -> ConfigError:
    return ConfigError([problem("ft.ports", f"no free port left on {host} in this range", f"{ports}")])


def listening_socket(host: str, ports: range | None) -> socket.socket:
    """A socket listening on ``host`` at the first free port of ``ports``."""
    ip = address_of(host)
    for port in _candidates(ports):
        sock = socket.socket(_family(ip), socket.SOCK_STREAM)
        try:
            sock.bind((ip, port))
            sock.listen(128)
            return sock
        except OSError:
            sock.close()
    raise _none_free(host, ports)


def free_port(host: str, ports: range | None) -> int:
    """A port of ``ports`` free on ``host`` now, for a listener bound by its own code."""
    with listening_socket(host, ports) as sock:
        return int(sock.getsockname()[1])


def bind_http(host: str, ports: range | None, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    ip = address_of(host)

    class Server(ThreadingHTTPServer):
        address_family = _family(ip)
        daemon_threads = True

    for port in _candidates(ports):
        try:
            return Server((ip, port), handler)
        except OSError:
            continue
    raise _none_free(host, ports)


def bound_store(host: str, ports: range | None, advertise: str) -> Any:
    """The replica group's TCPStore, listening on ``host`` at a port of ``ports``."""
    from torch.distributed import TCPStore

    sock = listening_socket(host, ports)
    port = int(sock.getsockname()[1])
    # The store owns the descriptor from here (closed with it); libuv's backend cannot adopt one.
    return TCPStore(advertise, port, is_master=True, wait_for_workers=False, master_listen_fd=sock.detach(),
                    use_libuv=False)


@contextlib.contextmanager
def manager_server_on(host: str, port: int) -> Iterator[None]:
    """While torchft builds its Manager: its manager server binds ``host:port``, not ``[::]:port``."""
    import torchft.manager as tm

    ip = address_of(host) if host else "::"
    bind = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    real = tm.ManagerServer

    def server(*args: Any, **kwargs: Any) -> Any:
        kwargs["bind"] = bind
        return real(*args, **kwargs)

    tm.ManagerServer = server
    try:
        yield
    finally:
        tm.ManagerServer = real
