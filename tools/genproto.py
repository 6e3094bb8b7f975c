#!/usr/bin/env python3
"""Generate the Python gRPC/protobuf modules for the .proto files under core/api/.

Usage (from anywhere; paths are resolved from this file):

    python tools/genproto.py           # regenerate in place
    python tools/genproto.py --check   # exit 1 and list stale/missing/orphaned files

Every ``X.proto`` yields ``X_pb2.py``, ``X_pb2.pyi`` and ``X_pb2_grpc.py`` next to it.
Protos import each other by repo-root-relative path (``core/api/...``), so the generated
code imports ``core.api...``; ``google/protobuf/*`` comes from grpc_tools' bundled includes.

Output is deterministic: protoc is run once, from the repo root, over a sorted list of
relative paths, into a scratch directory; files are copied into the tree only when their
bytes differ. The generated code still depends on the grpcio-tools version (it embeds the
protobuf/grpc versions), so regenerate with the version pinned for the project.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
API_DIR = Path("core") / "api"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
REGEN_HINT = "run python tools/genproto.py"


def proto_files(root: Path = REPO_ROOT) -> list[str]:
    """All .proto files under core/api/, as sorted repo-relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in (root / API_DIR).rglob("*.proto"))


def expected_outputs(protos: list[str]) -> list[str]:
    """The generated files (repo-relative POSIX paths) the given protos should produce."""
    out = []
    for proto in protos:
        stem = proto[: -len(".proto")]
        out.extend(stem + suffix for suffix in GENERATED_SUFFIXES)
    return sorted(out)


def existing_outputs(root: Path = REPO_ROOT) -> list[str]:
    """Generated-looking files currently present under core/api/."""
    found = set()
    for suffix in GENERATED_SUFFIXES:
        for p in (root / API_DIR).rglob("*" + suffix):
            found.add(p.relative_to(root).as_posix())
    return sorted(found)


def required_inits(protos: list[str]) -> list[str]:
    """__init__.py files needed so every proto directory is a regular package."""
    inits = set()
    for proto in protos:
        parent = Path(proto).parent
        while parent != Path("core") and parent != Path("."):
            inits.add((parent / "__init__.py").as_posix())
            parent = parent.parent
    return sorted(inits)


def _well_known_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).resolve().parent / "_proto")


def run_protoc(out_dir: Path, root: Path = REPO_ROOT) -> list[str]:
    """Run protoc over every proto into out_dir; return the repo-relative generated paths."""
    protos = proto_files(root)
    if not protos:
        raise SystemExit(f"no .proto files under {root / API_DIR}")
    out = str(out_dir)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"-I{_well_known_include()}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"protoc failed ({proc.returncode}):\n{proc.stderr}")
    outputs = expected_outputs(protos)
    missing = [p for p in outputs if not (out_dir / p).is_file()]
    if missing:
        raise SystemExit("protoc did not produce: " + ", ".join(missing))
    return outputs


def check(root: Path = REPO_ROOT) -> list[str]:
    """Regenerate into a temp dir and compare with the tree. Return one line per problem."""
    problems = []
    protos = proto_files(root)
    with tempfile.TemporaryDirectory(prefix="genproto-") as tmp:
        outputs = run_protoc(Path(tmp), root)
        for rel in outputs:
            target = root / rel
            if not target.is_file():
                problems.append(f"missing: {rel}")
            elif target.read_bytes() != (Path(tmp) / rel).read_bytes():
                problems.append(f"stale: {rel}")
    for rel in sorted(set(existing_outputs(root)) - set(outputs)):
        problems.append(f"orphaned (no .proto): {rel}")
    for rel in required_inits(protos):
        if not (root / rel).is_file():
            problems.append(f"missing package marker: {rel}")
    return problems


def generate(root: Path = REPO_ROOT) -> list[str]:
    """Regenerate in place; return one line per file written or removed."""
    changes = []
    protos = proto_files(root)
    with tempfile.TemporaryDirectory(prefix="genproto-") as tmp:
        outputs = run_protoc(Path(tmp), root)
        for rel in outputs:
            new = (Path(tmp) / rel).read_bytes()
            target = root / rel
            if not target.is_file() or target.read_bytes() != new:
                target.write_bytes(new)
                changes.append(f"wrote {rel}")
    for rel in sorted(set(existing_outputs(root)) - set(outputs)):
        (root / rel).unlink()
        changes.append(f"removed orphan {rel}")
    for rel in required_inits(protos):
        if not (root / rel).is_file():
            (root / rel).write_bytes(b"")
            changes.append(f"created {rel}")
    # Drop stale bytecode of removed modules so they cannot be imported by accident.
    for cache in (root / API_DIR).rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the generated code is up to date; do not write")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        if problems:
            print(f"generated protobuf code is out of date ({REGEN_HINT}):", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            return 1
        print(f"generated code is up to date ({len(proto_files())} protos)")
        return 0
    changes = generate()
    for line in changes:
        print(line)
    print(f"{len(proto_files())} protos, {len(changes)} change(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
