"""A real registry (Debian's ``docker-registry``, distribution 2.8) on loopback, and a proxy in
front of it that counts the bytes crossing it and injects faults.

The server reads every ``REGISTRY_*`` environment variable as a configuration override, so it runs
with a clean environment (``PATH`` only) and a configuration file of its own.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REGISTRY = shutil.which("docker-registry")
HTPASSWD = shutil.which("htpasswd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Registry:
    """``docker-registry serve`` on 127.0.0.1 with storage under `root`; `users` turns on
    htpasswd Basic auth (bcrypt, as ``htpasswd -B`` writes it); `token_realm` turns on
    distribution's ``silly`` auth, a Bearer challenge naming that realm (any token passes);
    `tls` (certificate, key) serves HTTPS."""

    def __init__(
        self,
        root: Path,
        users: dict[str, str] | None = None,
        token_realm: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        assert REGISTRY is not None
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.storage = root / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        auth = ""
        if users:
            assert HTPASSWD is not None
            lines = [
                subprocess.run(
                    [HTPASSWD, "-Bbn", user, password],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()
                for user, password in users.items()
            ]
            (root / "htpasswd").write_text("\n".join(lines) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
        if token_realm:
            auth = f"auth:\n  silly:\n    realm: {token_realm}\n    service: test-registry\n"
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
            + (f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n" if tls else "")
            + auth
        )
        self.log = open(root / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(
            [REGISTRY, "serve", str(config)],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # 401: up, with auth
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("docker-registry did not start")

    def blob_file(self, digest: str) -> Path:
        alg, hexd = digest.split(":")
        return self.storage / "docker/registry/v2/blobs" / alg / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@dataclass
class Faults:
    """What the proxy does to the next matching answers; each fault fires `times` times."""

    # (kind, path substring, times): kind is "flip", "truncate", "429", "500" or "reset".
    rules: list[list[object]] = field(default_factory=list)

    def take(self, method: str, path: str) -> str | None:
        for rule in self.rules:
            kind, needle, times = rule
            if isinstance(times, int) and times > 0 and str(needle) in path and method == "GET":
                rule[2] = times - 1
                return str(kind)
        return None


class Proxy:
    """An HTTP/1.1 proxy to `upstream` that counts bytes by request kind and injects faults."""

    def __init__(
        self, upstream: str, redirect_blobs_to: str | None = None, add_auth: str | None = None
    ) -> None:
        """`redirect_blobs_to` (``host:port``) answers blob GETs with a 307 there, as a
        registry backed by a blob store does; `add_auth` is an Authorization header this proxy
        adds itself (a blob store with access of its own)."""
        self.upstream = upstream
        #: Bytes per second for blob bodies (None: as fast as they come).
        self.throttle: float | None = None
        self.redirect_blobs_to = redirect_blobs_to
        self.add_auth = add_auth
        self.counts: Counter[str] = Counter()
        self.requests: list[tuple[str, str, int]] = []
        self.auth_schemes: Counter[str] = Counter()
        self.faults = Faults()
        #: Drop `Range` from requests (a registry without range support answers 200).
        self.strip_range = False
        #: Rewrites blob bodies the registry sent: (Range asked, status, body) -> body.
        self.mangle: Callable[[str | None, int, bytes], bytes] | None = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def handle(self) -> None:
                # The client may hang up (e.g. after a fault): nothing to answer then.
                with contextlib.suppress(ConnectionError, TimeoutError):
                    super().handle()

            def _any(self) -> None:
                proxy.forward(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.requests.clear()
            self.auth_schemes.clear()
            self.faults = Faults()
            self.strip_range = False
            self.mangle = None

    def blob_bytes_down(self) -> int:
        return self.counts["blob GET"]

    def blob_bytes_up(self) -> int:
        return self.counts["upload PATCH"] + self.counts["upload PUT"]

    def forward(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path
        kind = "upload" if "/blobs/uploads/" in path else "blob" if "/blobs/" in path else "other"
        with self.lock:
            scheme = (h.headers.get("Authorization") or "none").split(" ", 1)[0]
            self.auth_schemes[scheme] += 1
            fault = self.faults.take(h.command, path) if kind == "blob" else None
            self.counts[f"{kind} {h.command}"] += len(body)
        if fault in ("429", "500"):
            self._answer(h, int(fault), {"Retry-After": "1"} if fault == "429" else {}, b"")
            return
        if self.redirect_blobs_to and kind == "blob" and h.command == "GET":
            location = f"http://{self.redirect_blobs_to}{path}"
            with self.lock:
                self.requests.append((h.command, path, 307))
            self._answer(h, 307, {"Location": location}, b"")
            return
        if fault == "reset":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        dropped = ("connection", "range") if self.strip_range else ("connection",)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in dropped}
        if self.add_auth:
            headers["Authorization"] = self.add_auth
        conn.request(h.command, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        out_headers = {
            k: v
            for k, v in resp.getheaders()
            if k.lower() not in ("connection", "transfer-encoding", "content-length")
        }
        with self.lock:
            self.requests.append((h.command, path, resp.status))
        if self.mangle and h.command == "GET" and kind == "blob":
            data = self.mangle(h.headers.get("Range"), resp.status, data)
        if h.command == "GET" and kind == "blob" and resp.status in (200, 206):
            with self.lock:
                sent = len(data) // 2 if fault == "truncate" and len(data) > 1 else len(data)
                self.counts["blob GET"] += sent
        if h.command == "HEAD":
            out_headers["Content-Length"] = resp.getheader("Content-Length") or "0"
            self._answer(h, resp.status, out_headers, b"", head=True)
            return
        if fault == "flip" and resp.status == 200 and data:
            data = (
                data[: len(data) // 2]
                + bytes([data[len(data) // 2] ^ 0xFF])
                + data[len(data) // 2 + 1 :]
            )
        if fault == "truncate" and resp.status == 200 and len(data) > 1:
            h.send_response(resp.status)
            for k, v in out_headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.throttle and h.command == "GET" and kind == "blob" and resp.status in (200, 206):
            self._trickle(h, resp.status, out_headers, data, self.throttle)
            return
        self._answer(h, resp.status, out_headers, data)

    def _trickle(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        headers: dict[str, str],
        data: bytes,
        rate: float,
    ) -> None:
        """Send `data` at `rate` bytes per second, counting what has gone (``blob GET live``)."""
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        piece = 128 << 10
        for i in range(0, len(data), piece):
            h.wfile.write(data[i : i + piece])
            h.wfile.flush()
            with self.lock:
                self.counts["blob GET live"] += len(data[i : i + piece])
            time.sleep(piece / rate)

    @staticmethod
    def _answer(
        h: BaseHTTPRequestHandler,
        status: int,
        headers: dict[str, str],
        data: bytes,
        head: bool = False,
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if not head:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if data:
            h.wfile.write(data)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def count_requests(proxy: Proxy, pred: Callable[[str, str, int], bool]) -> int:
    with proxy.lock:
        return sum(1 for r in proxy.requests if pred(*r))


class TokenServer:
    """A token endpoint for Bearer challenges: answers every request with a fixed token and
    records each request's query and Authorization header."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.seen.append((self.path, self.headers.get("Authorization")))
                body = b'{"token": "test-token", "expires_in": 300}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_tls(root: Path) -> tuple[Path, Path, Path]:
    """A test CA and a certificate for 127.0.0.1 it signed: (ca.pem, cert.pem, key.pem)."""
    root.mkdir(parents=True, exist_ok=True)
    ca, ca_key = root / "ca.pem", root / "ca.key"
    cert, key, csr, ext = root / "cert.pem", root / "key.pem", root / "req.csr", root / "ext.cnf"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    openssl(
        "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=test CA"
    )
    openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    return ca, cert, key
