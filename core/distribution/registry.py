"""A client for the OCI distribution API (Docker registry v2) over urllib3.

One :class:`RegistryClient` serves any number of threads (a bounded urllib3 connection pool per TLS setting;
tokens cached per host and scope). Every request:

- goes to ``https://HOST`` unless :class:`HostConfig` says plain HTTP (the default for this machine's own
  addresses); TLS is always verified unless ``skip_verify``, against the system CAs plus ``ca_file``;
- answers a ``401`` challenge once: ``Bearer`` (a token from the realm for the request's scopes, with the
  credentials when there are some) or ``Basic``; a second refusal is :class:`~core.errors.Unauthenticated`;
- retries ``429``, ``5xx`` and broken connections with exponential backoff (``Retry-After`` honoured, capped),
  then raises :class:`~core.errors.Unavailable` naming the last status;
- maps ``404`` to :class:`~core.errors.NotFound`, other refusals to :class:`~core.errors.InvalidArgument`, and
  content that does not match its digest or size to :class:`~core.errors.FailedPrecondition`.

Reads (manifests and blobs) try the host's mirrors in order, then the host itself. Credentials are never
logged nor put into an error message.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, NoReturn, TypeVar

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, SSLError

from core import oci
from core.digest import Digest, Digester
from core.distribution.auth import Credentials, CredentialStore
from core.distribution.reference import DOCKER_HUB, Reference, is_local_host
from core.errors import (
    ContainerkitError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from core.types import Descriptor

__all__ = ["MANIFEST_MEDIA_TYPES", "HostConfig", "RegistryClient", "default_host_config", "signature_tag"]

log = logging.getLogger("containerkit.distribution")

MANIFEST_MEDIA_TYPES = (oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST_LIST, oci.DOCKER_MANIFEST)
"""What resolve and fetch_manifest accept, in order of preference (sent as ``Accept``)."""

BLOB_READ_SIZE = 1 << 20  # bytes per chunk yielded by fetch_blob
MAX_RETRY_AFTER_S = 30.0  # the longest Retry-After obeyed
ERROR_BODY_LIMIT = 4096  # bytes of an error response read for its message
DRAIN_LIMIT = 64 << 10  # unread bytes read away to keep a connection alive; more and it is closed
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 120.0
TOKEN_LEEWAY_S = 10.0  # tokens are renewed this long before they expire
_SCHEMA1 = frozenset({oci.DOCKER_SCHEMA1_MANIFEST, oci.DOCKER_SCHEMA1_SIGNED_MANIFEST})
_SCHEMA1_REFUSAL = "schema 1 manifests are not supported (push the image again with a current client)"
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"|(\w+)=([^\s,]+)')

T = TypeVar("T")


@dataclass(frozen=True)
class HostConfig:
    """How to reach one registry host (``[plugins.service.transfer.registries."HOST"]``)."""

    plain_http: bool = False
    ca_file: str = ""
    skip_verify: bool = False
    mirrors: tuple[str, ...] = ()


def default_host_config(host: str) -> HostConfig:
    """No configuration: HTTPS with verified TLS, except plain HTTP for this machine's own addresses."""
    return HostConfig(plain_http=is_local_host(host))


def signature_tag(digest: str) -> str:
    """The tag under which a manifest's signature artifact lives: ``sha256-<hex>.sig``."""
    algorithm, _, encoded = str(Digest(digest)).partition(":")
    return f"{algorithm}-{encoded}.sig"


@dataclass(frozen=True)
class _Endpoint:
    """One place to send requests for a registry: ``base`` is ``scheme://netloc[/prefix]``; ``host`` keys
    credentials and auth state."""

    host: str
    base: str
    config: HostConfig


@dataclass(frozen=True)
class _Challenge:
    scheme: str  # "bearer" | "basic"
    params: dict[str, str]


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, a broken connection): ``what`` says which, never with credentials."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.retry_after = retry_after


class RegistryClient:
    """Talks to OCI registries for one operation or many; thread-safe; bounded connection pools.

    ``hosts`` maps a registry host to its :class:`HostConfig` (default :func:`default_host_config`);
    credentials are ``user`` when given (for every host), else ``credentials.get(host)``.
    """

    def __init__(
        self,
        hosts: Callable[[str], HostConfig] | None = None,
        credentials: CredentialStore | None = None,
        user: Credentials | None = None,
        *,
        max_manifest_size: int = 4 << 20,
        retries: int = 4,
        backoff: float = 0.2,
        user_agent: str = "containerkit/0.1",
        max_connections: int = 8,
    ) -> None:
        self._hosts = hosts or default_host_config
        self._credentials = credentials
        self._user = user
        self.max_manifest_size = max_manifest_size
        self.retries = retries
        self.backoff = backoff
        self._user_agent = user_agent
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, bool], urllib3.PoolManager] = {}
        self._challenges: dict[str, _Challenge] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], tuple[str, float]] = {}

    # ------------------------------------------------------------------------------------------ reads

    def resolve(self, ref: Reference) -> tuple[Descriptor, bytes]:
        """The manifest or index ``ref`` names (by digest when it has one, else by tag) and its bytes.

        The bytes are verified against ``ref.digest`` or the registry's ``Docker-Content-Digest``
        (FailedPrecondition on a mismatch) and capped at ``max_manifest_size`` (InvalidArgument); schema 1
        and unknown media types are InvalidArgument.
        """
        return self._read_endpoints(ref, lambda endpoint: self._get_manifest(endpoint, ref, ref.object, ref.digest))

    def fetch_manifest(self, ref: Reference, desc: Descriptor) -> bytes:
        """The bytes of the manifest or index ``desc`` in ``ref``'s repository, verified by digest and size."""
        if desc.size > self.max_manifest_size:
            raise InvalidArgument(
                f"manifest {desc.digest}: {desc.size} bytes exceeds the limit of {self.max_manifest_size}"
            )
        got, data = self._read_endpoints(
            ref, lambda endpoint: self._get_manifest(endpoint, ref, desc.digest, desc.digest)
        )
        if got.size != desc.size:
            raise FailedPrecondition(f"manifest {desc.digest}: size mismatch: got {got.size}, want {desc.size}")
        return data

    def fetch_blob(self, ref: Reference, desc: Descriptor, offset: int = 0) -> Iterator[bytes]:
        """Stream blob ``desc`` from byte ``offset`` to its end, in chunks.

        A broken connection resumes with an HTTP Range request (up to ``retries`` times without progress,
        then Unavailable). A body longer or shorter than ``desc.size`` says is FailedPrecondition. The digest
        is NOT verified here: callers hash what they write.
        """
        if not 0 <= offset <= desc.size:
            raise InvalidArgument(f"blob {desc.digest}: offset {offset} outside its {desc.size} bytes")
        position, failures = offset, 0
        while True:
            response, skip = self._read_endpoints(
                ref, lambda endpoint, at=position: self._open_blob(endpoint, ref, desc, at)
            )
            try:
                for data in response.stream(BLOB_READ_SIZE, decode_content=False):
                    chunk = data[skip:]
                    skip = max(skip - len(data), 0)
                    if not chunk:
                        continue
                    if position + len(chunk) > desc.size:
                        raise FailedPrecondition(f"blob {desc.digest}: registry sent more than {desc.size} bytes")
                    position += len(chunk)
                    failures = 0
                    yield chunk
            except HTTPError as err:
                failure = f"connection broken at byte {position} of {desc.size} ({type(err).__name__})"
            else:
                failure = f"body ended at byte {position} of {desc.size}"
            finally:
                _release(response)
            if position == desc.size:
                return
            failures += 1
            if failures > self.retries:
                raise Unavailable(f"blob {desc.digest} from {ref.repository}: {failure}; {_gave_up(failures)}")
            log.info("blob %s from %s: %s; resuming", desc.digest, ref.repository, failure)
            time.sleep(self._delay(failures - 1, None))

    def blob_exists(self, ref: Reference, digest: str) -> int | None:
        """The size of blob ``digest`` in ``ref``'s repository (HEAD), or None when the registry lacks it."""
        endpoint = self._endpoint(ref.domain)
        response = self._call(endpoint, "HEAD", f"/v2/{ref.path}/blobs/{digest}", _scopes(ref, "pull"))
        _done(response, (200, 404), f"blob {digest} in {ref.repository}")
        if response.status == 404:
            return None
        return int(response.headers.get("Content-Length", "0"))

    # ----------------------------------------------------------------------------------------- writes

    def mount_blob(self, ref: Reference, digest: str, from_repository: str) -> bool:
        """Ask the registry to link blob ``digest`` from ``from_repository`` (a path on the same registry, or
        ``domain/path``) into ``ref``'s repository; False when it will not (any upload it opened is cancelled)."""
        source = from_repository.removeprefix(f"{ref.domain}/")
        endpoint = self._endpoint(ref.domain)
        scopes = (*_scopes(ref, "pull,push"), f"repository:{source}:pull")
        query = urllib.parse.urlencode({"mount": digest, "from": source})
        response = self._call(endpoint, "POST", f"/v2/{ref.path}/blobs/uploads/?{query}", scopes)
        _done(response, (201, 202), f"mount of blob {digest} into {ref.repository}")
        if response.status == 202 and response.headers.get("Location"):
            cancel = self._call(endpoint, "DELETE", self._location(endpoint, ref, response), scopes)
            _release(cancel)
        return response.status == 201

    def upload_blob(self, ref: Reference, desc: Descriptor, chunks: Iterable[bytes], *, chunk_size: int = 0) -> None:
        """Upload blob ``desc`` made of ``chunks`` into ``ref``'s repository.

        ``chunk_size`` 0: one streamed ``PUT`` (retried from a fresh upload session only when ``chunks`` can be
        iterated again, i.e. is not an iterator); else ``PATCH`` requests of ``chunk_size`` bytes, each retried
        from the offset the registry reports, then the closing ``PUT``. The registry must answer ``201`` with
        ``Docker-Content-Digest`` equal to ``desc.digest`` (FailedPrecondition otherwise).
        """
        endpoint = self._endpoint(ref.domain)
        scopes = _scopes(ref, "pull,push")
        what = f"upload of blob {desc.digest} to {ref.repository}"
        if chunk_size <= 0:
            reiterable = not isinstance(chunks, Iterator)

            def monolithic() -> urllib3.BaseHTTPResponse:
                location = self._start_upload(endpoint, ref, scopes)
                return self._call_once(
                    endpoint, "PUT", _with_query(location, digest=desc.digest), scopes,
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
                    body=chunks, resendable=reiterable,
                )  # fmt: skip

            response = self._retrying(what, monolithic, retries=self.retries if reiterable else 0)
        else:
            location = self._start_upload(endpoint, ref, scopes)
            offset = 0
            for piece in _regroup(chunks, chunk_size):
                location = self._patch(endpoint, ref, scopes, location, offset, piece)
                offset += len(piece)
            response = self._call(endpoint, "PUT", _with_query(location, digest=desc.digest), scopes)
        _done(response, (201,), what)
        _check_digest(response, desc.digest, what)

    def put_manifest(self, ref: Reference, media_type: str, data: bytes) -> str:
        """Store manifest ``data`` under ``ref``'s tag (or, without one, its digest); returns the digest.

        A ``ref.digest`` must be the digest of ``data`` (InvalidArgument); the registry's
        ``Docker-Content-Digest`` must match (FailedPrecondition).
        """
        digest = Digest.from_bytes(data)
        if ref.digest and ref.digest != digest:
            raise InvalidArgument(f"manifest for {ref}: its digest is {digest}, not {ref.digest}")
        what = f"manifest {digest} to {ref.repository}"
        response = self._call(
            self._endpoint(ref.domain), "PUT", f"/v2/{ref.path}/manifests/{ref.tag or digest}",
            _scopes(ref, "pull,push"), headers={"Content-Type": media_type}, body=data,
        )  # fmt: skip
        _done(response, (201,), what)
        _check_digest(response, digest, what)
        return digest

    def login(self, host: str) -> None:
        """Check that the registry at ``host`` accepts this client's credentials (Unauthenticated if not)."""
        response = self._call(self._endpoint(host), "GET", "/v2/", ())
        _done(response, (200,), f"registry {host}")

    # ------------------------------------------------------------------------------------- manifests

    def _get_manifest(self, endpoint: _Endpoint, ref: Reference, obj: str, expected: str) -> tuple[Descriptor, bytes]:
        what = f"manifest {obj}" if ":" in obj else f"manifest {ref.repository}:{obj}"  # a digest, or a tag
        response = self._call(
            endpoint, "GET", f"/v2/{ref.path}/manifests/{obj}", _scopes(ref, "pull"),
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
        )  # fmt: skip
        try:
            _expect(response, (200,), what)
            header_type = response.headers.get("Content-Type", "").partition(";")[0].strip()
            if header_type in _SCHEMA1:
                raise InvalidArgument(f"{what}: {_SCHEMA1_REFUSAL}")
            declared = response.headers.get("Content-Length")
            if declared is not None and int(declared) > self.max_manifest_size:
                raise InvalidArgument(f"{what}: {declared} bytes exceeds the limit of {self.max_manifest_size}")
            data = _read_capped(response, self.max_manifest_size)
            if data is None:
                raise InvalidArgument(f"{what}: larger than the limit of {self.max_manifest_size} bytes")
        finally:
            _release(response)
        digester = Digester(Digest(expected).algorithm if expected else "sha256")
        digester.update(data)
        digest = digester.digest()
        want = expected or response.headers.get("Docker-Content-Digest", "")
        if want and want != digest:
            raise FailedPrecondition(f"{what}: digest mismatch: got {digest}, want {want}")
        return Descriptor(_manifest_type(header_type, data, what), digest, len(data)), data

    # ----------------------------------------------------------------------------------------- blobs

    def _open_blob(self, endpoint: _Endpoint, ref: Reference, desc: Descriptor, position: int) -> tuple[Any, int]:
        """A response for the blob from byte ``position``, and how many bytes of its body come before that
        (a registry that ignores Range sends the whole blob)."""
        what = f"blob {desc.digest} in {ref.repository}"
        headers = {"Range": f"bytes={position}-"} if position else {}
        response = self._call(
            endpoint, "GET", f"/v2/{ref.path}/blobs/{desc.digest}", _scopes(ref, "pull"), headers=headers
        )
        try:
            _expect(response, (200, 206), what)
            skip = position if response.status == 200 else 0
            if response.status == 206:
                start = _range_start(response.headers.get("Content-Range", ""))
                if start != position:
                    raise FailedPrecondition(f"{what}: asked for bytes from {position}, registry sent from {start}")
            declared = response.headers.get("Content-Length")
            if declared is not None and int(declared) != desc.size - position + skip:
                raise FailedPrecondition(
                    f"{what}: size mismatch: registry sends {int(declared) - skip + position} bytes, want {desc.size}"
                )
        except BaseException:
            _release(response)
            raise
        return response, skip

    # ----------------------------------------------------------------------------------------- uploads

    def _start_upload(self, endpoint: _Endpoint, ref: Reference, scopes: tuple[str, ...]) -> str:
        response = self._call(endpoint, "POST", f"/v2/{ref.path}/blobs/uploads/", scopes)
        _done(response, (202,), f"upload to {ref.repository}")
        return self._location(endpoint, ref, response)

    def _patch(
        self, endpoint: _Endpoint, ref: Reference, scopes: tuple[str, ...], location: str, offset: int, piece: bytes
    ) -> str:
        """Send ``piece`` (bytes ``offset``...) of an upload; returns the next location. After a failure, the
        registry is asked how much it holds and only the rest is sent again."""
        what = f"upload to {ref.repository}"
        resend = False

        def send() -> str:
            nonlocal resend
            start, current = self._upload_status(endpoint, ref, scopes, location) if resend else (offset, location)
            resend = True
            if not offset <= start <= offset + len(piece):
                raise FailedPrecondition(f"{what}: registry is at byte {start}, not {offset}")
            if start == offset + len(piece):
                return current  # it took the piece; only its answer was lost
            rest = piece[start - offset :]
            response = self._call_once(
                endpoint, "PATCH", current, scopes, body=rest,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(rest)),
                         "Content-Range": f"{start}-{start + len(rest) - 1}"},
            )  # fmt: skip
            _done(response, (202,), what)
            return self._location(endpoint, ref, response)

        return self._retrying(f"{what} at byte {offset}", send)

    def _upload_status(
        self, endpoint: _Endpoint, ref: Reference, scopes: tuple[str, ...], location: str
    ) -> tuple[int, str]:
        """How many bytes the registry holds of the upload at ``location`` (its ``Range: 0-LAST``), and where
        the upload continues."""
        response = self._call_once(endpoint, "GET", location, scopes)
        _done(response, (204,), f"upload to {ref.repository}")
        last = int(response.headers.get("Range", "0-0").rpartition("-")[2] or 0)
        return (last + 1 if last else 0), self._location(endpoint, ref, response)  # "0-0" also means empty

    def _location(self, endpoint: _Endpoint, ref: Reference, response: Any) -> str:
        location = response.headers.get("Location")
        if not location:
            raise FailedPrecondition(f"upload to {ref.repository}: registry sent no Location")
        return urllib.parse.urljoin(f"{endpoint.base}/v2/{ref.path}/blobs/uploads/", location)

    # ---------------------------------------------------------------------------------------- endpoints

    def _endpoint(self, host: str) -> _Endpoint:
        config = self._hosts(host)
        netloc = "registry-1.docker.io" if host == DOCKER_HUB else host
        return _Endpoint(host, f"{'http' if config.plain_http else 'https'}://{netloc}", config)

    def _read_endpoints(self, ref: Reference, attempt: Callable[[_Endpoint], T]) -> T:
        """``attempt`` on each mirror in turn, then on the host itself; a mirror that lacks the content, refuses,
        is unreachable or serves the wrong bytes is logged and skipped."""
        for mirror in self._hosts(ref.domain).mirrors:
            endpoint = self._mirror_endpoint(mirror)
            try:
                return attempt(endpoint)
            except (NotFound, Unavailable, Unauthenticated, FailedPrecondition) as err:
                log.warning("mirror %s of %s failed, trying the next: %s", endpoint.base, ref.domain, err)
        return attempt(self._endpoint(ref.domain))

    def _mirror_endpoint(self, mirror: str) -> _Endpoint:
        if "://" not in mirror:
            return self._endpoint(mirror)
        parsed = urllib.parse.urlsplit(mirror)
        config = replace(self._hosts(parsed.netloc), plain_http=parsed.scheme == "http")
        return _Endpoint(parsed.netloc, f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}", config)

    def _pool(self, config: HostConfig) -> urllib3.PoolManager:
        key = (config.ca_file, config.skip_verify)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                shared = not (config.ca_file or config.skip_verify)
                context = _system_tls_context() if shared else ssl.create_default_context()
                if config.ca_file:
                    try:
                        context.load_verify_locations(config.ca_file)
                    except (OSError, ssl.SSLError) as err:
                        raise InvalidArgument(f"ca_file {config.ca_file}: not a readable PEM bundle ({err})") from None
                if config.skip_verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                pool = urllib3.PoolManager(
                    num_pools=32, maxsize=self._max_connections, ssl_context=context,
                    cert_reqs=ssl.CERT_NONE if config.skip_verify else ssl.CERT_REQUIRED,
                    timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
                    retries=urllib3.Retry(total=None, connect=0, read=0, other=0, status=0, redirect=5),
                )  # fmt: skip
                self._pools[key] = pool
            return pool

    # ------------------------------------------------------------------------------------ requests

    def _call(
        self, endpoint: _Endpoint, method: str, target: str, scopes: tuple[str, ...], *,
        headers: dict[str, str] | None = None, body: bytes | None = None,
    ) -> Any:  # fmt: skip
        """One request with authentication, retried while transient; the response's body is unread."""
        return self._retrying(
            f"{method} {self._url(endpoint, target).partition('?')[0]}",
            lambda: self._call_once(endpoint, method, target, scopes, headers=headers, body=body),
        )

    def _retrying(self, what: str, attempt: Callable[[], T], retries: int | None = None) -> T:
        """``attempt()`` until it stops raising _Transient, at most ``retries`` more times; then Unavailable."""
        limit = self.retries if retries is None else retries
        tries = 0
        while True:
            try:
                return attempt()
            except _Transient as err:
                if tries == limit:
                    raise Unavailable(f"{what}: {err.what}; {_gave_up(tries + 1)}") from None
                log.info("%s: %s; retrying", what, err.what)
                time.sleep(self._delay(tries, err.retry_after))
                tries += 1

    def _delay(self, tries: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_S)
        return self.backoff * (2**tries)

    def _call_once(
        self, endpoint: _Endpoint, method: str, target: str, scopes: tuple[str, ...], *,
        headers: dict[str, str] | None = None, body: Any = None, resendable: bool = True,
    ) -> Any:  # fmt: skip
        """One request; on a ``401`` it authenticates and (when the body can be sent again) asks once more.

        Raises _Transient for 429, 5xx and connection failures, Unauthenticated when refused twice.
        """
        url = self._url(endpoint, target)
        for authenticated in (False, True):
            response = self._send(
                endpoint.config, method, url, {**(headers or {}), **self._auth(endpoint, scopes)}, body
            )
            if response.status not in (401, 403):
                return response
            challenge = _parse_challenge(response.headers.get("WWW-Authenticate", ""))
            _release(response)
            if authenticated or not resendable or challenge is None:
                break
            if challenge.scheme == "basic" and self._creds(endpoint.host) is None:
                break
            self._authenticate(endpoint, challenge, scopes)
        raise _refusal(endpoint.host, self._creds(endpoint.host))

    def _send(self, config: HostConfig, method: str, url: str, headers: dict[str, str], body: Any) -> Any:
        """One HTTP exchange; _Transient for 429/5xx/connection failures, Unavailable for a TLS failure."""
        try:
            response = self._pool(config).request(
                method, url, headers={"User-Agent": self._user_agent, **headers}, body=body, preload_content=False
            )
        except (SSLError, MaxRetryError) as err:
            reason = err.reason if isinstance(err, MaxRetryError) else err
            if isinstance(reason, SSLError):
                host = urllib.parse.urlsplit(url).netloc
                raise Unavailable(f"{host}: TLS failed ({reason}); configure ca_file or skip_verify") from None
            raise _Transient(f"connection failed ({type(reason).__name__})") from None
        except HTTPError as err:
            raise _Transient(f"connection failed ({type(err).__name__})") from None
        log.debug("%s %s -> %d", method, url.partition("?")[0], response.status)
        if response.status == 429 or response.status >= 500:
            retry_after = response.headers.get("Retry-After", "")
            _release(response)
            raise _Transient(
                f"{response.status} {response.reason or ''}".strip(),
                float(retry_after) if retry_after.isdigit() else None,
            )
        return response

    def _url(self, endpoint: _Endpoint, target: str) -> str:
        return target if "://" in target else f"{endpoint.base}{target}"

    # ------------------------------------------------------------------------------------------ auth

    def _creds(self, host: str) -> Credentials | None:
        if self._user is not None:
            return self._user
        return self._credentials.get(host) if self._credentials is not None else None

    def _auth(self, endpoint: _Endpoint, scopes: tuple[str, ...]) -> dict[str, str]:
        """The Authorization header for a request, from what the host's last challenge asked for."""
        with self._lock:
            challenge = self._challenges.get(endpoint.host)
            token = self._tokens.get((endpoint.host, scopes))
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            creds = self._creds(endpoint.host)
            return {"Authorization": _basic(creds)} if creds else {}
        if token is not None and token[1] > time.monotonic():
            return {"Authorization": f"Bearer {token[0]}"}
        return {"Authorization": f"Bearer {self._fetch_token(endpoint, challenge, scopes)}"}

    def _authenticate(self, endpoint: _Endpoint, challenge: _Challenge, scopes: tuple[str, ...]) -> None:
        """Remember the host's latest challenge and forget the token it refused."""
        with self._lock:
            self._challenges[endpoint.host] = challenge
            self._tokens.pop((endpoint.host, scopes), None)

    def _fetch_token(self, endpoint: _Endpoint, challenge: _Challenge, scopes: tuple[str, ...]) -> str:
        """A bearer token from the challenge's realm for ``scopes`` (with the credentials when there are
        some), cached until shortly before it expires."""
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise InvalidArgument(f"{endpoint.host}: bearer challenge without a usable realm")
        wanted = [*scopes, *(s for s in challenge.params.get("scope", "").split() if s not in scopes)]
        query = [("service", challenge.params["service"])] if "service" in challenge.params else []
        query += [("scope", scope) for scope in wanted]
        creds = self._creds(endpoint.host)
        headers = {"Authorization": _basic(creds)} if creds else {}
        url = _with_query(realm, *query)
        realm_config = self._hosts(urllib.parse.urlsplit(realm).netloc)
        response = self._retrying(f"token from {realm}", lambda: self._send(realm_config, "GET", url, headers, None))
        try:
            if response.status in (401, 403):
                raise _refusal(endpoint.host, creds)
            _expect(response, (200,), f"token from {realm}")
            data = _read_capped(response, 1 << 20)
            answer = json.loads(data) if data is not None else None
        except ValueError:
            answer = None
        finally:
            _release(response)
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise FailedPrecondition(f"{endpoint.host}: the token server at {realm} sent no token")
        expires_in = answer.get("expires_in") if isinstance(answer, dict) else None
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 60.0
        with self._lock:
            self._tokens[(endpoint.host, scopes)] = (token, time.monotonic() + max(lifetime - TOKEN_LEEWAY_S, 1.0))
        return token


# ------------------------------------------------------------------------------------------ helpers


@functools.cache
def _system_tls_context() -> ssl.SSLContext:
    """The verifying TLS context with the system CAs, shared by every client of the process: loading the CAs
    costs 50-200 ms, which each pull or push would otherwise pay before its first request (Go caches its
    system pool the same way). urllib3 only sets the fields it was built with on it again."""
    return ssl.create_default_context()


def _scopes(ref: Reference, actions: str) -> tuple[str, ...]:
    return (f"repository:{ref.path}:{actions}",)


def _gave_up(attempts: int) -> str:
    return f"gave up after {attempts} attempt{'s' if attempts > 1 else ''}"


def _refusal(host: str, creds: Credentials | None) -> Unauthenticated:
    """The error for a registry that refused: it names the host, never the credentials."""
    if creds is None:
        return Unauthenticated(f"{host}: authentication required: no credentials for {host} (give --user or log in)")
    return Unauthenticated(f"{host}: unauthorized: check the credentials for {host}")


def _basic(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def _parse_challenge(header: str) -> _Challenge | None:
    """``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``; None for anything else."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() not in ("bearer", "basic"):
        return None
    params = {(m[0] or m[2]).lower(): m[1] if m[0] else m[3] for m in _CHALLENGE_PARAM.findall(rest)}
    return _Challenge(scheme.lower(), params)


def _with_query(url: str, *pairs: tuple[str, str], **params: str) -> str:
    query = urllib.parse.urlencode([*pairs, *params.items()])
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _release(response: Any) -> None:
    """Give a response's connection back: kept alive when at most DRAIN_LIMIT bytes of its body are left
    unread (they are read), else closed."""
    remaining = response.length_remaining
    if remaining is not None and remaining <= DRAIN_LIMIT:
        try:
            response.drain_conn()
        except HTTPError:
            response.close()
    else:
        response.close()
    response.release_conn()


def _read_capped(response: Any, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit`` (reading stops there)."""
    parts, size = [], 0
    for chunk in response.stream(64 << 10, decode_content=True):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _range_start(content_range: str) -> int:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return int(match[1]) if match else -1


def _regroup(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``chunks`` re-cut into pieces of ``size`` bytes (the last may be shorter; none when empty)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def _error_text(response: Any) -> str:
    """The registry's own words for a refusal (``CODE: message`` from its JSON errors), short."""
    try:
        body = response.read(ERROR_BODY_LIMIT, decode_content=True)
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)[:300]
    except (ValueError, AttributeError, TypeError, HTTPError):
        return ""


def _expect(response: Any, statuses: tuple[int, ...], what: str) -> None:
    """Raise the error a status other than ``statuses`` means: NotFound (404), InvalidArgument (other 4xx),
    FailedPrecondition (anything else unexpected). Call it before the response is released."""
    if response.status in statuses:
        return
    _raise_status(response, what)


def _done(response: Any, statuses: tuple[int, ...], what: str) -> None:
    """:func:`_expect` then :func:`_release`, for responses whose headers are all that matters."""
    try:
        _expect(response, statuses, what)
    finally:
        _release(response)


def _raise_status(response: Any, what: str) -> NoReturn:
    detail = _error_text(response)
    status = f"{response.status} {response.reason or ''}".strip() + (f" ({detail})" if detail else "")
    cls: type[ContainerkitError]
    if response.status == 404:
        cls = NotFound
    elif 400 <= response.status < 500:
        cls = InvalidArgument
    else:
        cls = FailedPrecondition
    raise cls(f"{what}: registry answered {status}")


def _check_digest(response: Any, digest: str, what: str) -> None:
    got = response.headers.get("Docker-Content-Digest")
    if got is not None and got != digest:
        raise FailedPrecondition(f"{what}: digest mismatch: registry stored {got}, want {digest}")


def _manifest_type(header_type: str, data: bytes, what: str) -> str:
    """The media type of a fetched manifest: the Content-Type when it is one we take, else from the document."""
    if header_type in MANIFEST_MEDIA_TYPES:
        return header_type
    try:
        doc = json.loads(data)
    except ValueError:
        raise InvalidArgument(f"{what}: unsupported media type {header_type or 'none'} (not JSON)") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what}: not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise InvalidArgument(f"{what}: {_SCHEMA1_REFUSAL}")
    declared = doc.get("mediaType")
    if declared in MANIFEST_MEDIA_TYPES:
        return str(declared)
    if declared is None and header_type in ("", "application/json", "application/octet-stream"):
        if "manifests" in doc:
            return oci.OCI_INDEX
        if "config" in doc and "layers" in doc:
            return oci.OCI_MANIFEST
    raise InvalidArgument(f"{what}: unsupported media type {declared or header_type or 'none'}")
