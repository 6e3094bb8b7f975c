"""The generated protobuf/gRPC modules under core/api/ are fresh and wire-correct."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_genproto():
    spec = importlib.util.spec_from_file_location("_genproto", REPO_ROOT / "tools" / "genproto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


genproto = _load_genproto()

SERVICE_MODULES = {
    "core.api.containerd.services.version.v1.version": ["containerd.services.version.v1.Version"],
    "core.api.containerd.services.introspection.v1.introspection": [
        "containerd.services.introspection.v1.Introspection"
    ],
    "core.api.containerd.services.namespaces.v1.namespace": ["containerd.services.namespaces.v1.Namespaces"],
    "core.api.containerd.services.content.v1.content": ["containerd.services.content.v1.Content"],
    "core.api.containerd.services.images.v1.images": ["containerd.services.images.v1.Images"],
    "core.api.containerd.services.leases.v1.leases": ["containerd.services.leases.v1.Leases"],
}

T = FieldDescriptor


def test_generated_code_is_up_to_date():
    problems = genproto.check()
    assert not problems, "generated protobuf code is stale; run python tools/genproto.py\n" + "\n".join(problems)


def test_every_proto_has_generated_modules():
    protos = genproto.proto_files()
    assert protos, "no .proto files found under core/api/"
    for proto in protos:
        module = proto[: -len(".proto")].replace("/", ".")
        importlib.import_module(module + "_pb2")
        importlib.import_module(module + "_pb2_grpc")


def test_real_google_package_not_shadowed():
    import google.protobuf
    from google.protobuf import empty_pb2

    assert "core" not in Path(google.protobuf.__file__).parts
    assert empty_pb2.DESCRIPTOR.name == "google/protobuf/empty.proto"


@pytest.mark.parametrize("module", sorted(SERVICE_MODULES))
def test_service_modules_import_and_register(module):
    pb2 = importlib.import_module(module + "_pb2")
    grpc_mod = importlib.import_module(module + "_pb2_grpc")
    pool = descriptor_pool.Default()
    for full_name in SERVICE_MODULES[module]:
        service = pool.FindServiceByName(full_name)
        assert service.full_name == full_name
        assert pb2.DESCRIPTOR.services_by_name[full_name.rsplit(".", 1)[1]] is service
        short = full_name.rsplit(".", 1)[1]
        for attr in (f"{short}Stub", f"{short}Servicer", f"add_{short}Servicer_to_server"):
            assert hasattr(grpc_mod, attr), f"{module}_pb2_grpc lacks {attr}"


def _fields(full_name):
    msg = descriptor_pool.Default().FindMessageTypeByName(full_name)
    return {f.name: f for f in msg.fields}


def test_version_service_shape():
    importlib.import_module("core.api.containerd.services.version.v1.version_pb2")
    svc = descriptor_pool.Default().FindServiceByName("containerd.services.version.v1.Version")
    method = svc.methods_by_name["Version"]
    assert method.input_type.full_name == "google.protobuf.Empty"
    assert method.output_type.full_name == "containerd.services.version.v1.VersionResponse"
    fields = _fields("containerd.services.version.v1.VersionResponse")
    assert {n: f.number for n, f in fields.items()} == {"version": 1, "revision": 2}


def test_introspection_plugin_field_numbers():
    importlib.import_module("core.api.containerd.services.introspection.v1.introspection_pb2")
    fields = _fields("containerd.services.introspection.v1.Plugin")
    assert {n: f.number for n, f in fields.items()} == {
        "type": 1,
        "id": 2,
        "requires": 3,
        "platforms": 4,
        "exports": 5,
        "capabilities": 6,
        "init_err": 7,
    }
    assert fields["platforms"].message_type.full_name == "containerd.types.Platform"
    assert fields["init_err"].message_type.full_name == "google.rpc.Status"
    assert fields["exports"].message_type.GetOptions().map_entry
    assert fields["requires"].is_repeated


def test_descriptor_skips_field_four():
    importlib.import_module("core.api.containerd.types.descriptor_pb2")
    fields = _fields("containerd.types.Descriptor")
    assert {n: (f.number, f.type) for n, f in fields.items()} == {
        "media_type": (1, T.TYPE_STRING),
        "digest": (2, T.TYPE_STRING),
        "size": (3, T.TYPE_INT64),
        "annotations": (5, T.TYPE_MESSAGE),
    }


def test_plugin_wire_roundtrip():
    from core.api.containerd.services.introspection.v1 import introspection_pb2
    from core.api.containerd.types import platform_pb2
    from core.api.google.rpc import status_pb2

    plugin = introspection_pb2.Plugin(
        type="io.containerd.snapshotter.v1",
        id="overlayfs",
        platforms=[platform_pb2.Platform(os="linux", architecture="amd64")],
        exports={"root": "/var/lib/containerkit"},
        init_err=status_pb2.Status(code=9, message="skip"),
    )
    data = plugin.SerializeToString(deterministic=True)
    # Field 1 (type), wire type 2 (length-delimited) => tag byte 0x0a.
    assert data[0] == 0x0A
    assert introspection_pb2.Plugin.FromString(data) == plugin


def _numbers(full_name):
    return {n: (f.number, f.type) for n, f in _fields(full_name).items()}


def test_content_write_messages_match_containerd():
    importlib.import_module("core.api.containerd.services.content.v1.content_pb2")
    assert _numbers("containerd.services.content.v1.WriteContentRequest") == {
        "action": (1, T.TYPE_ENUM),
        "ref": (2, T.TYPE_STRING),
        "total": (3, T.TYPE_INT64),
        "expected": (4, T.TYPE_STRING),
        "offset": (5, T.TYPE_INT64),
        "data": (6, T.TYPE_BYTES),
        "labels": (7, T.TYPE_MESSAGE),
    }
    assert _numbers("containerd.services.content.v1.WriteContentResponse") == {
        "action": (1, T.TYPE_ENUM),
        "started_at": (2, T.TYPE_MESSAGE),
        "updated_at": (3, T.TYPE_MESSAGE),
        "offset": (4, T.TYPE_INT64),
        "total": (5, T.TYPE_INT64),
        "digest": (6, T.TYPE_STRING),
    }
    assert _numbers("containerd.services.content.v1.Status") == {
        "started_at": (1, T.TYPE_MESSAGE),
        "updated_at": (2, T.TYPE_MESSAGE),
        "ref": (3, T.TYPE_STRING),
        "offset": (4, T.TYPE_INT64),
        "total": (5, T.TYPE_INT64),
        "expected": (6, T.TYPE_STRING),
    }
    action = descriptor_pool.Default().FindEnumTypeByName("containerd.services.content.v1.WriteAction")
    assert {v.name: v.number for v in action.values} == {"STAT": 0, "WRITE": 1, "COMMIT": 2}
    svc = descriptor_pool.Default().FindServiceByName("containerd.services.content.v1.Content")
    write, read = svc.methods_by_name["Write"], svc.methods_by_name["Read"]
    assert (write.client_streaming, write.server_streaming) == (True, True)
    assert (read.client_streaming, read.server_streaming) == (False, True)
    assert svc.methods_by_name["List"].server_streaming


def test_image_skips_fields_four_to_six():
    importlib.import_module("core.api.containerd.services.images.v1.images_pb2")
    fields = _fields("containerd.services.images.v1.Image")
    assert {n: f.number for n, f in fields.items()} == {
        "name": 1,
        "labels": 2,
        "target": 3,
        "created_at": 7,
        "updated_at": 8,
    }
    assert fields["target"].message_type.full_name == "containerd.types.Descriptor"
    assert fields["created_at"].message_type.full_name == "google.protobuf.Timestamp"
    assert _numbers("containerd.services.images.v1.DeleteImageRequest") == {
        "name": (1, T.TYPE_STRING),
        "sync": (2, T.TYPE_BOOL),
    }


def test_lease_messages_match_containerd():
    importlib.import_module("core.api.containerd.services.leases.v1.leases_pb2")
    assert {n: f.number for n, f in _fields("containerd.services.leases.v1.Lease").items()} == {
        "id": 1,
        "created_at": 2,
        "labels": 3,
    }
    # CreateRequest has no field 2.
    assert {n: f.number for n, f in _fields("containerd.services.leases.v1.CreateRequest").items()} == {
        "id": 1,
        "labels": 3,
    }
    assert _numbers("containerd.services.leases.v1.Resource") == {"id": (1, T.TYPE_STRING), "type": (2, T.TYPE_STRING)}


def test_event_type_names_match_containerd():
    # ctr and event subscribers resolve payloads by these full names (the type URL).
    from core.api.containerd.events import content_pb2, image_pb2

    assert content_pb2.ContentDelete.DESCRIPTOR.full_name == "containerd.events.ContentDelete"
    for name in ("ImageCreate", "ImageUpdate", "ImageDelete"):
        assert getattr(image_pb2, name).DESCRIPTOR.full_name == f"containerd.services.images.v1.{name}"
