"""Where the server listens: its configuration, the endpoint checks, and the ROUTER socket bound before any policy
loads (so a command loading a large model refuses a port in use in seconds)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field
from types import TracebackType

import zmq
from zmq.auth.thread import ThreadAuthenticator

from cosmos_edge.robot_bridge.curve import ServerCurve, start_authenticator
from cosmos_edge.robot_bridge.endpoints import is_ipv6, parse_endpoint
from cosmos_edge.robot_bridge.protocol import WireLimits
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.platforms import IMAGE_SIZE, PlatformSpec

MAX_SHUTDOWN_TIMEOUT_S = 3600.0  # beyond an hour a stop is a hang; also keeps waits within threading's limits
_RECEIVE_HWM = 32  # messages (of any number of frames) libzmq queues per controller connection during a flood
_ACT_HEADER_ROOM = 8192  # an act's header: its keys, the instruction (up to 4 KB of UTF-8), the arrays' descriptions
FLUSH_MS = 1000  # how long closing waits for the last replies to leave: enough on a loaded machine, and bounded
_BIND_HINTS = {
    errno.EADDRINUSE: "another process is serving on it; stop it or choose another endpoint",
    errno.ENOENT: "the directory of an ipc:// path must exist",
}


def check_limits_hold_an_act(limits: WireLimits, image_size: tuple[int, int], platform: PlatformSpec) -> None:
    """ConfigError unless `limits` hold one `act` of `platform` (about: the header's room is an estimate): below
    that every request is refused `too_large`, or, for an image over the message limit, dropped by libzmq without a
    reply, so that its controller only times out."""
    height, width = image_size
    image = height * width * 3
    act = len(platform.cameras) * image + 4 * platform.proprio_dim + _ACT_HEADER_ROOM
    if limits.max_array_bytes < image:
        detail = f"{limits.max_array_bytes} bytes cannot hold one camera image ({height}x{width}x3 uint8, {image})"
        raise ConfigError(f"max_array_bytes: {detail}")
    if limits.max_message_bytes < act:
        raise ConfigError(
            f"max_message_bytes: {limits.max_message_bytes} bytes cannot hold one act of the {platform.name} platform "
            f"(about {act} bytes: {len(platform.cameras)} camera images, the proprio and the header)"
        )
    if limits.max_arrays < len(platform.cameras) + 1:
        raise ConfigError(
            f"max_arrays: {limits.max_arrays} cannot hold one act of the {platform.name} platform (its "
            f"{len(platform.cameras)} camera images and the proprio)"
        )
    if limits.max_header_bytes < _ACT_HEADER_ROOM:
        raise ConfigError(
            f"max_header_bytes: {limits.max_header_bytes} bytes cannot hold an act's header (up to "
            f"{_ACT_HEADER_ROOM} bytes: its instruction and the arrays' descriptions)"
        )


@dataclass(frozen=True)
class ServerConfig:
    """`endpoint` is a ZeroMQ bind address; `tcp://127.0.0.1:*` picks a free port (see `PolicyServer.endpoint`).

    Binding anything but loopback, `ipc://` or `inproc://` needs `curve` (authenticated clients) or an explicit
    `insecure_bind_all`. `image_size` is the (height, width) every camera image must have. `joint_limits`, one
    (lower, upper) pair per action dim, is passed on to controllers in the metadata. After `stop()`, the chunk being
    inferred has `shutdown_timeout_s` to be delivered; then it is answered `shutting_down` and the server closes.
    """

    endpoint: str = "tcp://127.0.0.1:5555"
    limits: WireLimits = field(default_factory=WireLimits)
    image_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
    default_mode: str = "reactive"
    max_pending: int = 8
    curve: ServerCurve | None = None
    insecure_bind_all: bool = False
    joint_limits: tuple[tuple[float, float], ...] | None = None
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ConfigError(f"max_pending: expected >= 1, got {self.max_pending}")
        check_shutdown_timeout(self.shutdown_timeout_s)
        if not is_local_endpoint(self.endpoint) and self.curve is None and not self.insecure_bind_all:
            raise ConfigError(
                f"endpoint: {self.endpoint!r} is reachable from other machines, and without CURVE keys anyone there "
                "could command the robot; bind 127.0.0.1, configure CURVE keys, or allow it explicitly "
                "(serve --insecure-bind-all; ServerConfig.insecure_bind_all)"
            )


def check_shutdown_timeout(seconds: float) -> None:
    """ConfigError unless `seconds` is a shutdown window the server can wait: above 0, at most an hour."""
    if not 0 < seconds <= MAX_SHUTDOWN_TIMEOUT_S:  # also refuses NaN and infinity
        raise ConfigError(f"shutdown_timeout_s: expected seconds in (0, {MAX_SHUTDOWN_TIMEOUT_S:.0f}], got {seconds}")


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: loopback TCP, `ipc://` (file permissions) and `inproc://`."""
    parsed = parse_endpoint(endpoint, wildcard_port=True)
    if parsed.scheme != "tcp" or parsed.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(parsed.host).is_loopback
    except ValueError:  # "*", an interface name or a host name: assume reachable
        return False


class BoundRouter:
    """The server's ROUTER socket, bound, with its context and CURVE authenticator.

    Made by `bind()` before the policies exist, so that a command loading a large model refuses a port in use in
    seconds; a `PolicyServer` made with it takes it over and closes it. Also a context manager that closes it.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        router: zmq.Socket[bytes],
        authenticator: ThreadAuthenticator | None,
    ) -> None:
        self.context = context
        self.socket = router
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)  # a wildcard port resolved
        self._authenticator = authenticator
        self._socket_file = _ipc_socket_file(self.endpoint)
        self._closed = False

    @classmethod
    def bind(cls, config: ServerConfig) -> BoundRouter:
        """Binds `config.endpoint`; `ConfigError` naming the endpoint when it cannot (in use, no such directory)."""
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        router = context.socket(zmq.ROUTER)
        authenticator = None
        try:
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished controller raises instead of vanishing
            router.setsockopt(zmq.RCVHWM, _RECEIVE_HWM)
            # libzmq drops a single frame over the whole-message limit without buffering it (and disconnects the
            # peer, so there is no reply); a message whose frames only add up to more is answered with `too_large`.
            router.setsockopt(zmq.MAXMSGSIZE, config.limits.max_message_bytes)
            router.setsockopt(zmq.IPV6, int(is_ipv6(parse_endpoint(config.endpoint, wildcard_port=True))))
            if config.curve is not None:
                authenticator = start_authenticator(context, config.curve)
                router.curve_server = True
                router.curve_publickey = config.curve.keys.public
                router.curve_secretkey = config.curve.keys.secret
            try:
                _check_ipc_path(config.endpoint)
                router.bind(config.endpoint)
            except zmq.ZMQError as error:
                raise _bind_error(config.endpoint, error) from None
        except BaseException:
            _discard(context, router, authenticator)
            raise
        return cls(context, router, authenticator)

    def close(self) -> None:
        """Closes the socket, letting queued replies leave for up to `FLUSH_MS`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _discard(self.context, self.socket, self._authenticator, linger_ms=FLUSH_MS)
        _remove_socket_file(self._socket_file)

    def __enter__(self) -> BoundRouter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _discard(
    context: zmq.Context[zmq.Socket[bytes]],
    router: zmq.Socket[bytes],
    authenticator: ThreadAuthenticator | None,
    linger_ms: int = 0,
) -> None:
    router.close(linger=linger_ms)
    if authenticator is not None:
        authenticator.stop()
    context.term()  # every socket of the context is closed by now, so this returns once the linger is over


def _ipc_path(endpoint: str) -> str | None:
    """The file an `ipc://` endpoint names; None for other schemes, a wildcard and Linux's abstract names ("@")."""
    scheme, _, address = endpoint.partition("://")
    return address if scheme == "ipc" and address != "*" and not address.startswith("@") else None


def _check_ipc_path(endpoint: str) -> None:
    """`zmq.ZMQError(EADDRINUSE)` when a process accepts connections on the `ipc://` path: libzmq's bind would
    silently replace its socket file, leaving that server unreachable. A refused connection (a stale file, left by a
    process that died) or no file at all is for the bind to take; any other kind of file is refused (ConfigError):
    the bind would replace it, and the server's exit remove it."""
    path = _ipc_path(endpoint)
    if path is None:
        return
    with contextlib.suppress(OSError):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            detail = f"{endpoint!r} names {path}, which is not a socket; an ipc:// endpoint never replaces a file"
            raise ConfigError(f"endpoint: {detail}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a listener whose backlog is full answers EAGAIN rather than blocking us
        try:
            probe.connect(path)
        except BlockingIOError:  # listening, with a full backlog
            raise zmq.ZMQError(errno.EADDRINUSE) from None
        except OSError:
            return  # refused (a stale file), no such file, a path too long...: the bind succeeds or says why
    raise zmq.ZMQError(errno.EADDRINUSE)  # the connection was accepted


def _ipc_socket_file(endpoint: str) -> tuple[str, int, int] | None:
    """(path, device, inode) of the socket file a bound `ipc://` endpoint created; libzmq leaves it on close."""
    path = _ipc_path(endpoint)
    if path is None:
        return None
    try:
        status = os.stat(path)
    except OSError:  # removed already by a process that does not check first: none of ours to remove
        return None
    return path, status.st_dev, status.st_ino


def _remove_socket_file(socket_file: tuple[str, int, int] | None) -> None:
    """Removes the socket file the server created, unless it is gone or is another's by now."""
    if socket_file is None:
        return
    path, device, inode = socket_file
    with contextlib.suppress(FileNotFoundError):
        status = os.stat(path)
        if (status.st_dev, status.st_ino) == (device, inode):
            os.unlink(path)


def _bind_error(endpoint: str, error: zmq.ZMQError) -> ConfigError:
    number = error.errno or 0
    hint = _BIND_HINTS.get(number)
    return ConfigError(f"endpoint: cannot bind {endpoint!r}: {zmq.strerror(number)}" + (f"; {hint}" if hint else ""))
