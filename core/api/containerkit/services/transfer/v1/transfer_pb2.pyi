from core.api.containerd.services.images.v1 import images_pb2 as _images_pb2
from core.api.containerd.types import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("ref", "platforms", "snapshotter", "skip_unpack", "plain_http", "username", "password", "labels", "max_concurrent", "signatures")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTTER_FIELD_NUMBER: _ClassVar[int]
    SKIP_UNPACK_FIELD_NUMBER: _ClassVar[int]
    PLAIN_HTTP_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    ref: str
    platforms: _containers.RepeatedScalarFieldContainer[str]
    snapshotter: str
    skip_unpack: bool
    plain_http: bool
    username: str
    password: str
    labels: _containers.ScalarMap[str, str]
    max_concurrent: int
    signatures: bool
    def __init__(self, ref: _Optional[str] = ..., platforms: _Optional[_Iterable[str]] = ..., snapshotter: _Optional[str] = ..., skip_unpack: _Optional[bool] = ..., plain_http: _Optional[bool] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., max_concurrent: _Optional[int] = ..., signatures: _Optional[bool] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("ref", "local_name", "platforms", "plain_http", "username", "password", "chunk_size", "compression")
    REF_FIELD_NUMBER: _ClassVar[int]
    LOCAL_NAME_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    PLAIN_HTTP_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    ref: str
    local_name: str
    platforms: _containers.RepeatedScalarFieldContainer[str]
    plain_http: bool
    username: str
    password: str
    chunk_size: int
    compression: str
    def __init__(self, ref: _Optional[str] = ..., local_name: _Optional[str] = ..., platforms: _Optional[_Iterable[str]] = ..., plain_http: _Optional[bool] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., chunk_size: _Optional[int] = ..., compression: _Optional[str] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("ref", "kind", "digest", "state", "offset", "total", "message", "image")
    REF_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ref: str
    kind: str
    digest: str
    state: str
    offset: int
    total: int
    message: str
    image: _images_pb2.Image
    def __init__(self, ref: _Optional[str] = ..., kind: _Optional[str] = ..., digest: _Optional[str] = ..., state: _Optional[str] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ..., image: _Optional[_Union[_images_pb2.Image, _Mapping]] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("names", "platforms")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    platforms: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ..., platforms: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImportOptions(_message.Message):
    __slots__ = ("snapshotter", "skip_unpack", "base_name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SNAPSHOTTER_FIELD_NUMBER: _ClassVar[int]
    SKIP_UNPACK_FIELD_NUMBER: _ClassVar[int]
    BASE_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    snapshotter: str
    skip_unpack: bool
    base_name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, snapshotter: _Optional[str] = ..., skip_unpack: _Optional[bool] = ..., base_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ImportChunk(_message.Message):
    __slots__ = ("options", "data")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    options: ImportOptions
    data: bytes
    def __init__(self, options: _Optional[_Union[ImportOptions, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImportResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_images_pb2.Image]
    def __init__(self, images: _Optional[_Iterable[_Union[_images_pb2.Image, _Mapping]]] = ...) -> None: ...

class ConvertRequest(_message.Message):
    __slots__ = ("source", "target", "compression", "level")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    compression: str
    level: int
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ..., compression: _Optional[str] = ..., level: _Optional[int] = ...) -> None: ...

class ConvertResponse(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: _images_pb2.Image
    def __init__(self, image: _Optional[_Union[_images_pb2.Image, _Mapping]] = ...) -> None: ...

class SignRequest(_message.Message):
    __slots__ = ("name", "key_path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    key_path: str
    def __init__(self, name: _Optional[str] = ..., key_path: _Optional[str] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("signature", "key_id")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    signature: _descriptor_pb2.Descriptor
    key_id: str
    def __init__(self, signature: _Optional[_Union[_descriptor_pb2.Descriptor, _Mapping]] = ..., key_id: _Optional[str] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("name", "public_key_paths")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PATHS_FIELD_NUMBER: _ClassVar[int]
    name: str
    public_key_paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., public_key_paths: _Optional[_Iterable[str]] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("key_id", "artifact")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    artifact: _descriptor_pb2.Descriptor
    def __init__(self, key_id: _Optional[str] = ..., artifact: _Optional[_Union[_descriptor_pb2.Descriptor, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("signatures",)
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    signatures: _containers.RepeatedCompositeFieldContainer[Signature]
    def __init__(self, signatures: _Optional[_Iterable[_Union[Signature, _Mapping]]] = ...) -> None: ...

class LoginRequest(_message.Message):
    __slots__ = ("host", "username", "password", "plain_http")
    HOST_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    PLAIN_HTTP_FIELD_NUMBER: _ClassVar[int]
    host: str
    username: str
    password: str
    plain_http: bool
    def __init__(self, host: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., plain_http: _Optional[bool] = ...) -> None: ...

class LoginResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
