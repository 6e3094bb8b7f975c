"""Registries for the distribution tests, all on 127.0.0.1 and stopped by the tests that start them:

- :class:`BasicAuthRegistry`: Debian's ``docker-registry`` behind htpasswd basic auth;
- :class:`TokenServer` + :class:`TokenRegistry`: ``docker-registry`` with bearer-token auth, tokens issued by
  a small token server written here (ES256 JWTs carrying an ``x5c`` chain the registry trusts);
- :class:`FaultyRegistry`: a tiny in-memory registry speaking just enough of the distribution API, whose
  answers can be spoiled on purpose (:class:`Fault`): wrong bytes, short or cut bodies, any status, endless
  or oversized documents. Every request it gets is recorded.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import ipaddress
import json
import re
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from interop import REGISTRY_START_TIMEOUT_S, Registry

HTPASSWD = shutil.which("htpasswd") or "/usr/bin/htpasswd"
TOKEN_SERVICE = "containerkit-test-registry"
TOKEN_ISSUER = "containerkit-test-issuer"


class _AuthRegistry(Registry):
    """A :class:`~interop.Registry` whose config gains an ``auth:`` section; ready when ``/v2/`` asks for it."""

    def _auth_config(self) -> list[str]:
        raise NotImplementedError

    def _config(self) -> str:
        return super()._config() + "\n".join(["auth:", *self._auth_config(), ""])

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + REGISTRY_START_TIMEOUT_S
        while time.monotonic() < deadline and self.process is not None and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as answer:
                    return answer.status == 200
            except urllib.error.HTTPError as err:
                return err.code == 401
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        return False


class BasicAuthRegistry(_AuthRegistry):
    """``docker-registry`` with htpasswd (bcrypt) basic auth for ``users`` ({name: password})."""

    def __init__(self, directory: Path, users: Mapping[str, str]) -> None:
        super().__init__(directory)
        lines = [
            subprocess.run([HTPASSWD, "-Bbn", user, password], check=True, capture_output=True, text=True).stdout
            for user, password in users.items()
        ]
        self.htpasswd = self.directory / "htpasswd"
        self.htpasswd.write_text("".join(line.strip() + "\n" for line in lines))

    def _auth_config(self) -> list[str]:
        return ["  htpasswd:", "    realm: containerkit-test", f"    path: {self.htpasswd}"]


class TokenRegistry(_AuthRegistry):
    """``docker-registry`` trusting the tokens of ``server``."""

    def __init__(self, directory: Path, server: TokenServer) -> None:
        super().__init__(directory)
        self.server = server

    def _auth_config(self) -> list[str]:
        return [
            "  token:",
            f"    realm: {self.server.realm}",
            f"    service: {TOKEN_SERVICE}",
            f"    issuer: {TOKEN_ISSUER}",
            f"    rootcertbundle: {self.server.cert_path}",
        ]


def self_signed(common_name: str, ip: str | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and a self-signed CA certificate for it, valid for a day (for ``ip`` too, if given)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if ip is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False)
    return key, builder.sign(key, hashes.SHA256())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A Docker token server: ``GET /token?service=S&scope=repository:NAME:ACTIONS...`` with basic auth of one of
    ``users`` ({name: password}) grants every scope asked; anonymous requests get ``anonymous_actions`` (default
    none: 401). Tokens are ES256 JWTs signed by a fresh self-signed certificate (``cert_path``, the registry's
    root bundle). ``requests`` records (user or "", scopes) per request, never a password."""

    def __init__(self, directory: Path, users: Mapping[str, str], anonymous_actions: tuple[str, ...] = ()) -> None:
        self.users = dict(users)
        self.anonymous_actions = anonymous_actions
        self.requests: list[tuple[str, list[str]]] = []
        self._key, self._cert = self_signed("containerkit test token issuer")
        self.cert_path = Path(directory) / "token-root.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._http = _serve(self._handle)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/token"

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        scopes = [scope for value in query.get("scope", []) for scope in value.split()]
        user = _basic_user(handler.headers.get("Authorization", ""), self.users)
        self.requests.append((user or "", scopes))
        if user is None or (user == "" and not self.anonymous_actions):
            _reply(handler, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}')
            return
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":", 2) if scope.count(":") >= 2 else ("", "", "")
            granted = actions.split(",") if user else [a for a in actions.split(",") if a in self.anonymous_actions]
            access.append({"type": kind, "name": name, "actions": granted})
        token = self._token(user or "anonymous", access, str(query.get("service", [""])[0]))
        _reply(handler, 200, json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode())

    def _token(self, subject: str, access: list[dict[str, Any]], service: str) -> str:
        now = int(time.time())
        chain = [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]
        header = {"typ": "JWT", "alg": "ES256", "x5c": chain}
        claims = {"iss": TOKEN_ISSUER, "sub": subject, "aud": service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _basic_user(header: str, users: Mapping[str, str]) -> str | None:
    """The user a basic Authorization header proves: "" for none given, None for a wrong password."""
    if not header:
        return ""
    scheme, _, value = header.partition(" ")
    try:
        user, _, password = base64.b64decode(value).decode().partition(":")
    except ValueError:
        return None
    return user if scheme.lower() == "basic" and users.get(user) == password else None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    behaviour: Any = None  # set per server class: a callable taking the handler

    def _any(self) -> None:
        try:
            type(self).behaviour(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up between requests (the client under test giving up, retrying) is no error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _serve(behaviour: Any, tls: ssl.SSLContext | None = None) -> http.server.ThreadingHTTPServer:
    """A threading HTTP server (HTTPS with ``tls``) on a free port of 127.0.0.1 answering every request with
    ``behaviour(handler)``."""
    handler = type("Handler", (_Handler,), {"behaviour": staticmethod(behaviour)})
    server = _Server(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def _reply(
    handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: Mapping[str, str] = {}
) -> None:
    handler.send_response(status)
    for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
        handler.send_header(key, value)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def _drain(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    length = int(handler.headers.get("Content-Length") or 0)
    if length:
        return handler.rfile.read(length)
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while size := int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
        handler.rfile.readline()
        return b"".join(parts)
    return b""


# ------------------------------------------------------------------------------------------ faulty


@dataclass(frozen=True)
class Fault:
    """How to spoil one answer: ``status`` instead of the real one (with ``headers``); ``body`` served instead
    of the stored bytes; ``length`` claimed as Content-Length; ``cut_after`` bytes sent, then the connection
    closed (for an upload request: done, then closed without an answer); ``endless``: a chunked body that
    never ends (until the client hangs up); ``stall``: the headers, then no byte of the body for that many
    seconds (or until the client hangs up), then the connection closed; ``ignore_range``: the whole blob, as a
    registry without Range."""

    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    length: int | None = None
    cut_after: int | None = None
    endless: bool = False
    stall: float = 0.0
    ignore_range: bool = False


_PATH = re.compile(r"/v2/(?P<name>.+?)/(?P<kind>manifests|blobs)/(?P<ref>uploads/[^/?]*|[^/?]+)")


class FaultyRegistry:
    """An in-memory registry on 127.0.0.1 (manifests, blobs with Range, monolithic and chunked uploads) whose
    answers :meth:`fail` spoils, request by request. ``credentials`` ({user: password}) turns on basic auth;
    ``tls_dir`` turns on HTTPS with a self-signed certificate for 127.0.0.1 written there (``ca_file``).
    ``requests`` records (method, path, headers) of every request."""

    def __init__(self, credentials: Mapping[str, str] | None = None, tls_dir: Path | None = None) -> None:
        self.credentials = dict(credentials or {})
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.uploads: dict[str, bytearray] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._faults: dict[tuple[str, str], list[Fault]] = {}
        self._lock = threading.Lock()
        self.ca_file = ""
        context = None
        if tls_dir is not None:
            key, cert = self_signed("containerkit test registry", "127.0.0.1")
            self.ca_file, key_file = str(tls_dir / "registry-ca.pem"), tls_dir / "registry-key.pem"
            Path(self.ca_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_file.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.ca_file, key_file)
        self._http = _serve(self._handle, context)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._http.server_address[1]}"

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def add_manifest(self, name: str, tag: str, media_type: str, data: bytes) -> str:
        """Store a manifest under its digest and ``tag``; returns the digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.manifests[(name, tag)] = self.manifests[(name, digest)] = (media_type, data)
        return digest

    def fail(self, method: str, path: str, *faults: Fault) -> None:
        """Spoil the next ``len(faults)`` answers to ``METHOD`` requests whose path (without query) starts with
        ``path``, one fault each (the longest matching ``path`` first)."""
        with self._lock:
            self._faults.setdefault((method, path), []).extend(faults)

    def _next_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            queues = [(len(p), queue) for (m, p), queue in self._faults.items() if m == method and path.startswith(p)]
            queue = max((q for q in queues if q[1]), default=(0, []), key=lambda q: q[0])[1]
            return queue.pop(0) if queue else None

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path, _, query = handler.path.partition("?")
        self.requests.append((handler.command, path, dict(handler.headers.items())))
        body = _drain(handler) if handler.command in ("PUT", "PATCH", "POST") else b""
        if self.credentials and _basic_user(handler.headers.get("Authorization", ""), self.credentials) in ("", None):
            _reply(handler, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": 'Basic realm="t"'})
            return
        fault = self._next_fault(handler.command, path)
        if fault is not None and fault.status:
            _reply(handler, fault.status, b'{"errors":[{"code":"FAULT","message":"injected"}]}', fault.headers)
            return
        match = _PATH.fullmatch(path)
        if path == "/v2/":
            _reply(handler, 200, b"{}")
        elif match is None:
            _reply(handler, 404)
        elif match["kind"] == "manifests":
            self._manifest(handler, match["name"], match["ref"], body, fault)
        elif match["ref"].startswith("uploads/"):
            status, headers, answer = self._upload(handler, match["name"], match["ref"][8:], query, body)
            if fault is not None and fault.cut_after is not None:
                handler.close_connection = True  # done, but the answer is lost
            else:
                _reply(handler, status, answer, headers)
        else:
            self._blob(handler, match["ref"], fault)

    def _manifest(
        self, handler: http.server.BaseHTTPRequestHandler, name: str, ref: str, body: bytes, fault: Fault | None
    ) -> None:
        if handler.command == "PUT":
            digest = self.add_manifest(name, ref, handler.headers.get("Content-Type", ""), body)
            _reply(handler, 201, headers={"Docker-Content-Digest": digest})
            return
        if (name, ref) not in self.manifests:
            _reply(handler, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
            return
        media_type, data = self.manifests[(name, ref)]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._send(handler, data, {"Content-Type": media_type, "Docker-Content-Digest": digest}, 200, fault)

    def _blob(self, handler: http.server.BaseHTTPRequestHandler, digest: str, fault: Fault | None) -> None:
        if digest not in self.blobs:
            _reply(handler, 404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')
            return
        data, status, headers = self.blobs[digest], 200, {"Content-Type": "application/octet-stream"}
        wanted = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        if wanted and not (fault and fault.ignore_range):
            start = int(wanted[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        self._send(handler, data, headers, status, fault)

    def _send(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        data: bytes,
        headers: dict[str, str],
        status: int,
        fault: Fault | None,
    ) -> None:
        fault = fault or Fault()
        data = fault.body if fault.body is not None else data
        handler.send_response(status)
        for key, value in {**headers, **fault.headers}.items():
            handler.send_header(key, value)
        if fault.endless:
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            piece = b" " * 65536
            while True:
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.send_header("Content-Length", str(fault.length if fault.length is not None else len(data)))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        if fault.stall:
            handler.wfile.flush()
            select.select([handler.connection], [], [], fault.stall)  # readable: the client hung up
            handler.close_connection = True
            return
        if fault.cut_after is not None:
            handler.wfile.write(data[: fault.cut_after])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(data)

    def _upload(
        self, handler: http.server.BaseHTTPRequestHandler, name: str, upload: str, query: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Act on an upload request; returns the answer (status, headers, body)."""
        params = urllib.parse.parse_qs(query)
        if handler.command == "POST":
            digest = params.get("mount", [""])[0]
            if digest in self.blobs:
                return 201, {"Docker-Content-Digest": digest}, b""
            upload = uuid.uuid4().hex
            self.uploads[upload] = bytearray()
            return 202, {"Location": f"/v2/{name}/blobs/uploads/{upload}", "Range": "0-0"}, b""
        if upload not in self.uploads:
            return 404, {}, b'{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN"}]}'
        held = self.uploads[upload]
        if handler.command == "PATCH":
            if int(handler.headers.get("Content-Range", "0-0").split("-")[0]) != len(held):
                return 416, {}, b""
            held += body
        elif handler.command == "PUT":
            held += body
            digest = "sha256:" + hashlib.sha256(held).hexdigest()
            if digest != params.get("digest", [""])[0]:
                return 400, {}, b'{"errors":[{"code":"DIGEST_INVALID","message":"digest mismatch"}]}'
            self.blobs[digest] = bytes(held)
            del self.uploads[upload]
            return 201, {"Docker-Content-Digest": digest}, b""
        location = {"Location": f"/v2/{name}/blobs/uploads/{upload}", "Range": f"0-{max(len(held) - 1, 0)}"}
        return (204 if handler.command == "GET" else 202), location, b""


# ------------------------------------------------------------------------------------------ context managers


@contextmanager
def faulty_registry(
    credentials: Mapping[str, str] | None = None, tls_dir: Path | None = None
) -> Iterator[FaultyRegistry]:
    """A started :class:`FaultyRegistry`, closed afterwards."""
    registry = FaultyRegistry(credentials, tls_dir)
    try:
        yield registry
    finally:
        registry.close()


@contextmanager
def basic_auth_registry(users: Mapping[str, str]) -> Iterator[BasicAuthRegistry]:
    """A started :class:`BasicAuthRegistry` in a fresh temp dir, stopped and removed afterwards."""
    registry = BasicAuthRegistry(Path(tempfile.mkdtemp(prefix="ck-registry-basic-", dir="/tmp")), users)
    try:
        yield registry.start()
    finally:
        registry.stop()
        shutil.rmtree(registry.directory, ignore_errors=True)


@contextmanager
def token_registry(users: Mapping[str, str], anonymous_actions: tuple[str, ...] = ()) -> Iterator[TokenRegistry]:
    """A started :class:`TokenRegistry` with its :class:`TokenServer` (``registry.server``), both stopped and
    their temp dir removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="ck-registry-token-", dir="/tmp"))
    server = TokenServer(directory, users, anonymous_actions)
    registry = TokenRegistry(directory, server)
    try:
        yield registry.start()
    finally:
        registry.stop()
        server.close()
        shutil.rmtree(directory, ignore_errors=True)
