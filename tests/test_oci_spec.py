"""core.oci_spec: containerd's default spec, specs from image configs, users from the image's files, mounts."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import oci_spec
from core.errors import InvalidArgument
from core.oci import ImageConfig
from core.types import Platform

PLATFORM = Platform("linux", "amd64")
PASSWD = """root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:100::/home/bob:/bin/sh
"""
GROUP = """root:x:0:
daemon:x:1:
users:x:100:alice
alice:x:1000:
wheel:x:10:root,alice
audio:x:29:bob,alice
"""


def image(**fields: object) -> ImageConfig:
    return ImageConfig(diff_ids=(), platform=PLATFORM, **fields)  # type: ignore[arg-type]


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    return tmp_path


def test_default_spec_is_containerds() -> None:
    spec = oci_spec.default_spec("web", namespace="prod")
    assert spec["ociVersion"] == "1.0.2-dev"
    assert spec["root"] == {"path": "rootfs"}
    assert spec["hostname"] == "web"
    process = spec["process"]
    assert process["cwd"] == "/" and process["user"] == {"uid": 0, "gid": 0}
    assert process["env"] == [oci_spec.DEFAULT_PATH_ENV]
    assert process["noNewPrivileges"] is True
    caps = process["capabilities"]
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == list(oci_spec.DEFAULT_CAPABILITIES)
    assert len(caps["bounding"]) == 14 and "CAP_SYS_ADMIN" not in caps["bounding"]
    linux = spec["linux"]
    assert linux["cgroupsPath"] == "/prod/web"
    assert [ns["type"] for ns in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    devices = linux["resources"]["devices"]
    assert devices[0] == {"allow": False, "access": "rwm"}
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"} in devices  # /dev/null
    assert {"allow": True, "type": "c", "major": 136, "access": "rwm"} in devices  # every pts
    json.dumps(spec)  # plain JSON all the way down


def test_default_mounts() -> None:
    mounts = {m["destination"]: m for m in oci_spec.default_spec("c", namespace="default")["mounts"]}
    assert set(mounts) >= {"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"}
    assert mounts["/proc"]["type"] == "proc"
    assert mounts["/dev"]["type"] == "tmpfs"
    assert mounts["/dev/pts"]["type"] == "devpts" and "newinstance" in mounts["/dev/pts"]["options"]
    assert mounts["/dev/shm"]["source"] == "shm"
    assert "ro" in mounts["/sys"]["options"]
    assert mounts["/sys/fs/cgroup"]["type"] == "cgroup" and "ro" in mounts["/sys/fs/cgroup"]["options"]


def test_rlimits_never_exceed_the_hosts_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)
    assert oci_spec.default_spec("c", namespace="n")["process"]["rlimits"] == [
        {"type": "RLIMIT_NOFILE", "hard": expected, "soft": expected}
    ]
    nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    (nproc,) = oci_spec.host_rlimits([("RLIMIT_NPROC", 2**40)])
    assert nproc_hard == resource.RLIM_INFINITY or nproc["hard"] == nproc["soft"] == nproc_hard
    assert oci_spec.host_rlimits([("RLIMIT_NO_SUCH_THING", 5)]) == []


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "args", "expected"),
    [
        ((), ("/bin/sh",), (), ["/bin/sh"]),
        ((), ("/bin/sh",), ("echo", "hi"), ["echo", "hi"]),
        (("/entry", "-x"), ("default",), (), ["/entry", "-x", "default"]),
        (("/entry",), ("default",), ("given",), ["/entry", "given"]),
        (("/entry",), (), (), ["/entry"]),
    ],
)
def test_args_are_entrypoint_then_args_or_cmd(
    entrypoint: tuple[str, ...], cmd: tuple[str, ...], args: tuple[str, ...], expected: list[str]
) -> None:
    config = image(entrypoint=entrypoint, cmd=cmd)
    spec = oci_spec.spec_from_image(config, None, id="c", namespace="n", args=args, user="0:0")
    assert spec["process"]["args"] == expected


def test_no_command_at_all_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="no command"):
        oci_spec.spec_from_image(image(), None, id="c", namespace="n", user="0:0")


def test_env_merges_over_the_images_or_the_default_path() -> None:
    config = image(cmd=("sh",), env=("PATH=/bin", "A=1", "B=2"))
    spec = oci_spec.spec_from_image(config, None, id="c", namespace="n", env=["B=3", "C=4", "A"], user="0:0")
    assert spec["process"]["env"] == ["PATH=/bin", "B=3", "C=4"]
    bare = oci_spec.spec_from_image(image(cmd=("sh",)), None, id="c", namespace="n", env=["X=1"], user="0:0")
    assert bare["process"]["env"] == [oci_spec.DEFAULT_PATH_ENV, "X=1"]


def test_terminal_sets_term_unless_given() -> None:
    spec = oci_spec.spec_from_image(image(cmd=("sh",)), None, id="c", namespace="n", terminal=True, user="0:0")
    assert spec["process"]["terminal"] is True and "TERM=xterm" in spec["process"]["env"]
    given = oci_spec.spec_from_image(
        image(cmd=("sh",)), None, id="c", namespace="n", terminal=True, env=["TERM=vt100"], user="0:0"
    )
    assert [e for e in given["process"]["env"] if e.startswith("TERM=")] == ["TERM=vt100"]


def test_working_dir_from_image_or_given_and_absolute() -> None:
    config = image(cmd=("sh",), working_dir="/srv")
    assert oci_spec.spec_from_image(config, None, id="c", namespace="n", user="0:0")["process"]["cwd"] == "/srv"
    given = oci_spec.spec_from_image(config, None, id="c", namespace="n", cwd="/tmp", user="0:0")
    assert given["process"]["cwd"] == "/tmp"
    with pytest.raises(InvalidArgument, match="not an absolute path"):
        oci_spec.spec_from_image(config, None, id="c", namespace="n", cwd="tmp", user="0:0")


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", {"uid": 0, "gid": 0, "additionalGids": [0, 10]}),
        ("root", {"uid": 0, "gid": 0, "additionalGids": [0, 10]}),
        ("alice", {"uid": 1000, "gid": 1000, "additionalGids": [1000, 100, 10, 29]}),
        ("1000", {"uid": 1000, "gid": 1000, "additionalGids": [1000, 100, 10, 29]}),
        ("bob", {"uid": 1001, "gid": 100, "additionalGids": [100, 29]}),
        ("4242", {"uid": 4242, "gid": 0, "additionalGids": [0]}),
        ("alice:daemon", {"uid": 1000, "gid": 1, "additionalGids": [1, 100, 10, 29]}),
        ("alice:7", {"uid": 1000, "gid": 7, "additionalGids": [7, 100, 10, 29]}),
        ("1001:wheel", {"uid": 1001, "gid": 10, "additionalGids": [10, 29]}),
        ("5:6", {"uid": 5, "gid": 6, "additionalGids": [6]}),
        ("1000:1000", {"uid": 1000, "gid": 1000, "additionalGids": [1000, 100, 10, 29]}),
    ],
)
def test_user_resolution_through_passwd_and_group(rootfs: Path, user: str, expected: dict[str, object]) -> None:
    assert oci_spec.resolve_user(user, rootfs) == expected


def test_user_from_image_and_override(rootfs: Path) -> None:
    config = image(cmd=("sh",), user="alice")
    assert oci_spec.spec_from_image(config, rootfs, id="c", namespace="n")["process"]["user"]["uid"] == 1000
    assert oci_spec.spec_from_image(config, rootfs, id="c", namespace="n", user="bob")["process"]["user"]["uid"] == 1001


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("mallory", "unable to find user 'mallory'"),
        ("alice:nogroup", "unable to find group 'nogroup'"),
        ("a:b:c", "invalid user"),
        ("alice:", "invalid user"),
        (":0", "invalid user"),
    ],
)
def test_unknown_or_malformed_user_is_invalid_argument(rootfs: Path, user: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        oci_spec.resolve_user(user, rootfs)


@pytest.mark.parametrize("where", ["empty rootfs", "no rootfs"])
def test_missing_passwd_and_group_files(tmp_path: Path, where: str) -> None:
    rootfs = tmp_path if where == "empty rootfs" else None
    assert oci_spec.resolve_user("", rootfs) == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert oci_spec.resolve_user("1000", rootfs) == {"uid": 1000, "gid": 0, "additionalGids": [0]}
    assert oci_spec.resolve_user("3:4", rootfs) == {"uid": 3, "gid": 4, "additionalGids": [4]}
    with pytest.raises(InvalidArgument, match="unable to find user 'alice'"):
        oci_spec.resolve_user("alice", rootfs)
    with pytest.raises(InvalidArgument, match="unable to find group 'staff'"):
        oci_spec.resolve_user("0:staff", rootfs)


def test_passwd_symlinks_resolve_inside_the_rootfs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "data").mkdir()
    (rootfs / "data" / "passwd").write_text("carol:x:77:88::/:/bin/sh\n")
    (rootfs / "etc" / "passwd").symlink_to("/data/passwd")  # absolute: must mean the rootfs' /data
    assert oci_spec.resolve_user("carol", rootfs)["uid"] == 77
    host_group = tmp_path / "host-group"
    host_group.write_text("evil:x:99:carol\n")
    (rootfs / "etc" / "group").symlink_to(f"../../../..{host_group}")  # may not leave the rootfs
    assert oci_spec.resolve_user("carol", rootfs)["additionalGids"] == [88]


def test_parse_mount_as_ctr(tmp_path: Path) -> None:
    mount = oci_spec.parse_mount(f"type=bind,src={tmp_path},dst=/data,options=ro")
    assert mount == {"destination": "/data", "type": "bind", "source": str(tmp_path), "options": ["rbind", "ro"]}
    long_form = oci_spec.parse_mount(f"type=bind,source={tmp_path},destination=/d,options=bind:rw")
    assert long_form["options"] == ["bind", "rw"]
    tmpfs = oci_spec.parse_mount("type=tmpfs,source=tmpfs,destination=/scratch,options=size=1m")
    assert tmpfs == {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}


def test_parse_volume_mounts_keeps_them_for_the_daemon() -> None:
    """A volume mount stays ``type: volume`` (the daemon's volumes service makes it a bind): its source is
    the volume's name, its options as given (no ``rbind`` added here), empty options dropped."""
    mount = oci_spec.parse_mount("type=volume,src=data,dst=/data")
    assert mount == {"destination": "/data", "type": "volume", "source": "data", "options": []}
    read_only = oci_spec.parse_mount("type=volume,source=my.data-1,destination=/d,options=ro::nosuid")
    assert read_only == {"destination": "/d", "type": "volume", "source": "my.data-1", "options": ["ro", "nosuid"]}


def test_relative_bind_source_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert oci_spec.parse_mount("type=bind,src=sub,dst=/x")["source"] == str(tmp_path / "sub")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type=volume,src=../etc,dst=/data", r"volume mount on '/data': volume name \"../etc\" must match"),
        ("type=volume,src=a/b,dst=/data", "volume name"),
        ("type=volume,dst=/data", "volume name must not be empty"),
        ("type=volume,src=" + "v" * 65 + ",dst=/data", "longer than 64 characters"),
        ("type=volume,src=data,dst=/data,options=ro:size=1m", "'size=1m' not supported"),
        ("type=volume,src=data,dst=data", "must be an absolute path"),
        ("src=/a,dst=/b", "missing type"),
        ("type=bind,src=/a,dst=b", "must be an absolute path"),
        ("type=bind,src=/a", "must be an absolute path"),
        ("type=bind,src=/a,dst=/b,flavour=x", "key 'flavour' is not supported"),
        ("type=bind,/a", "expected key=value"),
    ],
)
def test_bad_mounts_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        oci_spec.parse_mount(text)


def test_mounts_are_appended_after_the_defaults(tmp_path: Path) -> None:
    extra = oci_spec.parse_mount(f"type=bind,src={tmp_path},dst=/data,options=ro")
    spec = oci_spec.spec_from_image(image(cmd=("sh",)), None, id="c", namespace="n", mounts=[extra], user="0:0")
    assert spec["mounts"][-1] == extra
    volume = {"type": "volume", "source": "data", "destination": "/v", "options": ["ro"]}
    spec = oci_spec.spec_from_image(image(cmd=("sh",)), None, id="c", namespace="n", mounts=[volume], user="0:0")
    assert spec["mounts"][-1] == volume
    with pytest.raises(InvalidArgument, match="volume name"):
        oci_spec.spec_from_image(
            image(cmd=("sh",)),
            None,
            id="c",
            namespace="n",
            user="0:0",
            mounts=[{"type": "volume", "destination": "/v"}],
        )


# -- the spec as runc takes it ---------------------------------------------------------------------


@pytest.fixture
def busybox_bundle(tmp_path: Path) -> Iterator[Path]:
    """A bundle directory whose rootfs holds Debian's static busybox (/bin/sh and friends) and an /etc."""
    rootfs = tmp_path / "rootfs"
    for directory in ("bin", "etc", "dev", "proc", "sys", "tmp", "data"):
        (rootfs / directory).mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "cat", "id", "hostname", "ls", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(PASSWD)
    (rootfs / "etc" / "group").write_text(GROUP)
    yield tmp_path


def test_runc_runs_a_spec_from_an_image(busybox_bundle: Path, tmp_path: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello").write_text("from the host\n")
    config = image(cmd=("/bin/sh", "-c", "exit 3"), env=("PATH=/bin",), user="alice")
    script = "id; hostname; cat /data/hello; echo $GREETING; touch /data/x 2>/dev/null || echo read-only"
    namespace, container = f"ck-spec-{uuid.uuid4().hex[:12]}", "spec-test"
    spec = oci_spec.spec_from_image(
        config,
        busybox_bundle / "rootfs",
        id=container,
        namespace=namespace,
        args=["/bin/sh", "-c", script],
        env=["GREETING=hi"],
        mounts=[oci_spec.parse_mount(f"type=bind,src={shared},dst=/data,options=ro")],
    )
    (busybox_bundle / "config.json").write_text(json.dumps(spec))
    runc_root = tmp_path / "runc"
    result = subprocess.run(
        ["runc", "--root", str(runc_root), "run", "--bundle", str(busybox_bundle), container],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    subprocess.run(["runc", "--root", str(runc_root), "delete", "-f", container], capture_output=True, timeout=30)
    for parent in Path("/sys/fs/cgroup").glob(f"*/{namespace}"):  # runc removes the container's, not its parent
        parent.rmdir()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("uid=1000(alice) gid=1000(alice) groups=")
    assert "10(wheel)" in lines[0] and "29(audio)" in lines[0] and "100(users)" in lines[0]
    assert lines[1:] == ["spec-test", "from the host", "hi", "read-only"]
