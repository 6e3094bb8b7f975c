from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class UnpackRequest(_message.Message):
    __slots__ = ("image", "snapshotter", "platform")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTTER_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    image: str
    snapshotter: str
    platform: str
    def __init__(self, image: _Optional[str] = ..., snapshotter: _Optional[str] = ..., platform: _Optional[str] = ...) -> None: ...

class UnpackResponse(_message.Message):
    __slots__ = ("chain_id", "layers", "applied")
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    chain_id: str
    layers: int
    applied: int
    def __init__(self, chain_id: _Optional[str] = ..., layers: _Optional[int] = ..., applied: _Optional[int] = ...) -> None: ...
