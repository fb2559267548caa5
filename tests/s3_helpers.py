"""A real S3 endpoint on localhost for the remote-data tests: moto's server, and a TCP proxy that breaks it.

Nothing here patches boto, botocore or s3fs: the code under test talks HTTP to moto's server, either
directly or through `FaultyProxy`, which forwards byte streams and can reset connections, cut a
response in the middle of its body, and log every request it saw.
"""

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

moto_server = pytest.importorskip("moto.server", reason="the remote-data tests need moto[server] (the dev extra)")
pytest.importorskip("s3fs", reason="the remote-data tests need s3fs (the dev extra)")
boto3 = pytest.importorskip("boto3")

ENV_KEYS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION")


class MotoEndpoint:
    """moto's S3 server in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.port = port

    def client(self, key: str = "testing", secret: str = "testing"):
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1")

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def endpoint_with_bucket(bucket: str) -> Iterator[MotoEndpoint]:
    """A started MotoEndpoint holding an empty `bucket`, stopped on exit (a module fixture's body)."""
    e = MotoEndpoint()
    try:
        e.client().create_bucket(Bucket=bucket)
        yield e
    finally:
        e.stop()


def s3_env(endpoint_url: str, key: str = "testing", secret: str = "testing") -> dict[str, str]:
    """The environment that points botocore (and so s3fs) at `endpoint_url`: no config file, dummy keys."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, AWS_ENDPOINT_URL_S3=endpoint_url,
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")
    return env


def use_endpoint(monkeypatch, endpoint_url: str, **kw) -> None:
    env = s3_env(endpoint_url, **kw)
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        if os.environ.get(k) != v:
            monkeypatch.setenv(k, v)


def _read_head(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """(header block up to and with the blank line, bytes after it), or None when the peer closed first."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", rest


def _with_close(head: bytes) -> bytes:
    """The header block with `Connection: close`: one request per connection, so connections count requests."""
    lines = [ln for ln in head.split(b"\r\n")[:-2] if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a crashed server or a middlebox dropping the connection does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


class FaultyProxy:
    """127.0.0.1:port -> the endpoint, one request per connection, with faults on demand.

    reset_next: reset the next N connections as soon as their request has arrived.
    cut_next: forward the next N GET responses that have a body only up to `cut_at` body bytes, then reset.
    reset_when: a predicate on (method, path); matching requests are reset (e.g. every PUT after the third).
    on_request: called with (method, path) before a request is forwarded (e.g. to delete a cache).
    delay: seconds every request waits before it is forwarded (a slow network).
    requests: (method, path) of every request seen, in order; `forwarded` those that reached the endpoint.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.reset_next = 0
        self.cut_next = 0
        self.cut_at = 100
        self.delay = 0.0  # seconds each request waits before it is forwarded
        self.reset_when: Callable[[str, str], bool] | None = None
        self.on_request: Callable[[str, str], None] | None = None
        self.requests: list[tuple[str, str]] = []
        self.forwarded: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def gets(self, suffix: str) -> int:
        """How many GETs of an object whose path ends with `suffix` reached the endpoint."""
        with self.lock:
            return sum(1 for m, p in self.forwarded if m == "GET" and p.endswith(suffix))

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            got = _read_head(client, b"")
            if got is None:
                client.close()
                return
            head, body = got
            method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
            path = target.split("?", 1)[0]
            with self.lock:
                self.requests.append((method, path))
                reset = self.reset_next > 0 or (self.reset_when is not None and self.reset_when(method, path))
                if self.reset_next > 0:
                    self.reset_next -= 1
                cut = not reset and method == "GET" and self.cut_next > 0
                if cut:
                    self.cut_next -= 1
            if reset:
                _reset(client)
                return
            if self.delay:
                time.sleep(self.delay)
            if self.on_request is not None:
                self.on_request(method, path)
            with self.lock:
                self.forwarded.append((method, path))
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            length = _content_length(head)
            if b"\r\nexpect: 100-continue" in head.lower():
                upstream.sendall(_with_close(head) + body)  # the server answers 100 before the body comes
            else:
                while len(body) < length and (chunk := client.recv(65536)):
                    body += chunk
                upstream.sendall(_with_close(head) + body)
            rest = b""
            while True:  # interim 1xx responses pass unchanged; the final one gets `Connection: close`
                got = _read_head(upstream, rest)
                if got is None:
                    _reset(client)
                    return
                rhead, rest = got
                if not rhead.startswith(b"HTTP/1.1 1"):
                    break
                client.sendall(rhead)
                while len(body) < length and (chunk := client.recv(65536)):
                    body += chunk
                    upstream.sendall(chunk)
            client.sendall(_with_close(rhead))
            sent = 0
            while True:
                if cut and sent + len(rest) >= self.cut_at:
                    client.sendall(rest[: self.cut_at - sent])
                    _reset(client)
                    return
                if rest:
                    client.sendall(rest)
                    sent += len(rest)
                rest = upstream.recv(65536)
                if not rest:
                    break
            client.close()
        except OSError:
            client.close()
        finally:
            if upstream is not None:
                upstream.close()

    def stop(self) -> None:
        self.closed = True
        self.sock.close()


def enable_moto_auth(endpoint: MotoEndpoint, on: bool) -> None:
    """moto's own switch (its /moto-api/reset-auth endpoint): check credentials and IAM policies, or not."""
    import urllib.request

    body = b"0" if on else b"inf"
    request = urllib.request.Request(f"{endpoint.url}/moto-api/reset-auth", data=body, method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).read()
