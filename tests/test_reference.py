"""Image references: Docker's normalisation, printing, and refusals."""

from __future__ import annotations

import pytest

from core.distribution.reference import Reference, is_local_host
from core.errors import InvalidArgument

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest", "printed"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", "", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", "", "docker.io/library/busybox:1.36"),
        ("team/app", "docker.io", "team/app", "latest", "", "docker.io/team/app:latest"),
        ("index.docker.io/team/app", "docker.io", "team/app", "latest", "", "docker.io/team/app:latest"),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", "", "docker.io/library/busybox:latest"),
        ("localhost/app", "localhost", "app", "latest", "", "localhost/app:latest"),
        ("localhost:5000/a/b:v1", "localhost:5000", "a/b", "v1", "", "localhost:5000/a/b:v1"),
        ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", "", "127.0.0.1:5000/app:latest"),
        ("ghcr.io/o/r/x", "ghcr.io", "o/r/x", "latest", "", "ghcr.io/o/r/x:latest"),
        ("[::1]:5000/app:t", "[::1]:5000", "app", "t", "", "[::1]:5000/app:t"),
        (f"busybox@{DIGEST}", "docker.io", "library/busybox", "", DIGEST, f"docker.io/library/busybox@{DIGEST}"),
        (f"h:1/a:t@{DIGEST}", "h:1", "a", "t", DIGEST, f"h:1/a:t@{DIGEST}"),
        ("a.b/c_d/e__f/g-h/i.j", "a.b", "c_d/e__f/g-h/i.j", "latest", "", "a.b/c_d/e__f/g-h/i.j:latest"),
    ],
)
def test_parse_normalises_like_docker(text: str, domain: str, path: str, tag: str, digest: str, printed: str) -> None:
    ref = Reference.parse(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert str(ref) == printed
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("ab" * 32, "64-byte hexadecimal"),
        ("team/App", "lowercase"),
        ("app:", "invalid tag"),
        ("app:-x", "invalid tag"),
        ("app@sha256:abc", "sha256 needs 64"),
        ("app@md5:" + "a" * 32, "unsupported algorithm"),
        ("host:5000/", "missing repository"),
        ("host:5000/a//b", "path component"),
        ("a/-b", "path component"),
        ("bad_host:5000/x", "registry host"),
        ("x/" + "a" * 300, "longer than 255"),
    ],
)
def test_parse_refuses_malformed(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=f'invalid reference "{text}": .*{why}'):
        Reference.parse(text)


def test_properties_and_copies() -> None:
    ref = Reference.parse("127.0.0.1:5000/team/app:v1")
    assert ref.repository == "127.0.0.1:5000/team/app"
    assert ref.object == "v1"
    pinned = ref.with_digest(DIGEST)
    assert pinned.object == DIGEST and str(pinned) == f"127.0.0.1:5000/team/app:v1@{DIGEST}"
    assert pinned.with_tag("v2") == Reference("127.0.0.1:5000", "team/app", "v2")
    with pytest.raises(InvalidArgument):
        ref.with_digest("sha256:nothex")
    with pytest.raises(InvalidArgument):
        ref.with_tag("bad tag")


@pytest.mark.parametrize(
    ("domain", "local"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1", True),
        ("127.1.2.3:443", True),
        ("[::1]:5000", True),
        ("::1", True),
        ("docker.io", False),
        ("10.0.0.1:5000", False),
        ("localhost.example.com", False),
    ],
)
def test_is_local_host(domain: str, local: bool) -> None:
    assert is_local_host(domain) is local
