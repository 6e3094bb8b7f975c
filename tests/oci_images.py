"""Build OCI image layouts from tar layers made in Python, for the real-client tests and the benchmarks.

A :class:`Layer` is assembled entry by entry as PAX tar bytes (exactly what the caller asks for, hostile
entries included: nothing is cleaned or checked); :class:`Layout` writes images (manifest, config with
the diff ids, compressed layer blobs) into an OCI image layout directory that ``skopeo copy oci:DIR:TAG``
pushes to a registry. :func:`busybox_layer` is a base layer with Debian's static busybox and its applets.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import zstandard

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
MTIME = 1_600_000_000
"""Default mtime of every entry (2020-09-13), so images built twice are byte for byte the same."""
BUSYBOX = Path("/bin/busybox")
BLOCK = 512


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: str) -> bytes:
    """``data`` as a ``tar``, ``gzip`` or ``zstd`` layer blob (deterministic: no gzip name or time)."""
    if compression == "tar":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    raise ValueError(f"unknown compression {compression!r}")


class Layer:
    """A layer's tar stream, built entry by entry; methods return ``self`` so calls chain.

    Paths are written as given (``etc/passwd``, ``/abs``, ``../x`` alike). ``compression`` is the blob's
    (``tar``, ``gzip`` or ``zstd``); ``mangle`` rewrites the compressed blob (truncate it, flip bytes),
    the config's diff id still being that of the intact tar.
    """

    def __init__(self, compression: str = "gzip", mangle: Callable[[bytes], bytes] | None = None) -> None:
        if compression not in MT_LAYER:
            raise ValueError(f"unknown compression {compression!r}")
        self.compression = compression
        self.mangle = mangle
        self._chunks: list[bytes] = []

    def add(self, info: tarfile.TarInfo, data: bytes = b"", xattrs: Mapping[str, str | bytes] | None = None) -> Layer:
        """One entry from a TarInfo (its size is set from ``data``); xattrs go in PAX ``SCHILY.xattr.*``."""
        info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        for key, value in (xattrs or {}).items():
            text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
            info.pax_headers["SCHILY.xattr." + key] = text
        self._chunks.append(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if data:
            self._chunks.append(data + b"\0" * (-len(data) % BLOCK))
        return self

    def raw(self, data: bytes) -> Layer:
        """Bytes appended as they are (hand-made headers, e.g. an absurd size with no data after it)."""
        self._chunks.append(data)
        return self

    @staticmethod
    def info(path: str, kind: bytes, mode: int, uid: int, gid: int, mtime: float | str) -> tarfile.TarInfo:
        """A header; ``mtime`` as a string is written as is into a PAX ``mtime`` (``"1.123456789"``: to the ns)."""
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, float(mtime)
        if isinstance(mtime, str):
            info.pax_headers["mtime"] = mtime
        info.uname = info.gname = ""
        return info

    def dir(
        self,
        path: str,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: float | str = MTIME,
        xattrs: Mapping[str, str | bytes] | None = None,
    ) -> Layer:
        return self.add(self.info(path.rstrip("/") + "/", tarfile.DIRTYPE, mode, uid, gid, mtime), xattrs=xattrs)

    def dirs(self, *paths: str, mode: int = 0o755) -> Layer:
        """Directory entries with the defaults, in the order given."""
        for path in paths:
            self.dir(path, mode=mode)
        return self

    def file(
        self,
        path: str,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: float | str = MTIME,
        xattrs: Mapping[str, str | bytes] | None = None,
    ) -> Layer:
        return self.add(self.info(path, tarfile.REGTYPE, mode, uid, gid, mtime), data, xattrs)

    def symlink(self, path: str, target: str, *, uid: int = 0, gid: int = 0, mtime: float | str = MTIME) -> Layer:
        info = self.info(path, tarfile.SYMTYPE, 0o777, uid, gid, mtime)
        info.linkname = target
        return self.add(info)

    def hardlink(self, path: str, target: str, *, mode: int = 0o644, mtime: float | str = MTIME) -> Layer:
        info = self.info(path, tarfile.LNKTYPE, mode, 0, 0, mtime)
        info.linkname = target
        return self.add(info)

    def device(
        self, path: str, kind: str, major: int, minor: int, *, mode: int = 0o600, uid: int = 0, gid: int = 0
    ) -> Layer:
        """A ``char`` or ``block`` device node, or a ``fifo`` (major and minor then ignored)."""
        types = {"char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
        info = self.info(path, types[kind], mode, uid, gid, MTIME)
        info.devmajor, info.devminor = major, minor
        return self.add(info)

    def whiteout(self, path: str) -> Layer:
        """Delete ``path`` from the layers below (OCI whiteout ``DIR/.wh.NAME``)."""
        parent, name = posixpath.split(path.rstrip("/"))
        return self.file(posixpath.join(parent, ".wh." + name), mode=0o600)

    def opaque(self, directory: str) -> Layer:
        """Hide what the layers below hold in ``directory`` (``DIR/.wh..wh..opq``); add its new contents after."""
        return self.file(posixpath.join(directory.rstrip("/"), ".wh..wh..opq"), mode=0o600)

    def tar(self) -> bytes:
        """The tar stream: the entries, then the two zero blocks ending an archive."""
        return b"".join(self._chunks) + b"\0" * (2 * BLOCK)


def busybox_layer(compression: str = "gzip") -> Layer:
    """Debian's static busybox as ``/bin/busybox`` with a symlink per applet (``/bin/sh -> busybox``, ...),
    plus the usual top-level directories and a minimal ``/etc``."""
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    layer = Layer(compression).dirs("bin", "dev", "etc", "home", "proc", "root", "sys", "tmp", "usr", "var")
    layer.dir("tmp", mode=0o1777).dir("root", mode=0o700)
    layer.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in sorted(set(applets) - {"busybox"}):
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    layer.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return layer


class Layout:
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/``) images are added to."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.blobs = self.directory / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (self.directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self.manifests: list[dict[str, Any]] = []
        self._write_index()

    def _write_index(self) -> None:
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": self.manifests}
        (self.directory / "index.json").write_text(json.dumps(index))

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        """Store ``data``; returns its descriptor."""
        digest = sha256(data)
        (self.blobs / digest.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_image(
        self,
        tag: str,
        layers: Iterable[Layer],
        *,
        diff_ids: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Write an image (linux/amd64) of ``layers`` tagged ``tag``; returns the manifest's descriptor.

        ``diff_ids`` overrides the config's list (a lie about the layers); ``config`` the runtime config;
        ``annotations`` go into the manifest.
        """
        descriptors, real_diff_ids = [], []
        for layer in layers:
            tar = layer.tar()
            real_diff_ids.append(sha256(tar))
            blob = compress(tar, layer.compression)
            descriptors.append(self.blob(layer.mangle(blob) if layer.mangle else blob, MT_LAYER[layer.compression]))
        image_config = {
            "architecture": "amd64",
            "os": "linux",
            "config": dict(config or {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}),
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids if diff_ids is not None else real_diff_ids)},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": self.blob(json.dumps(image_config).encode(), MT_CONFIG),
            "layers": descriptors,
            **({"annotations": dict(annotations)} if annotations else {}),
        }
        descriptor = self.blob(json.dumps(manifest).encode(), MT_MANIFEST)
        self.manifests = [m for m in self.manifests if m["annotations"]["org.opencontainers.image.ref.name"] != tag]
        self.manifests.append({**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}})
        self._write_index()
        return descriptor
