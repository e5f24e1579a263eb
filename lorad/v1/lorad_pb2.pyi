from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class AdapterLocation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_LOCATION_UNSPECIFIED: _ClassVar[AdapterLocation]
    ADAPTER_LOCATION_DISK: _ClassVar[AdapterLocation]
    ADAPTER_LOCATION_HOST: _ClassVar[AdapterLocation]
    ADAPTER_LOCATION_DEVICE: _ClassVar[AdapterLocation]

class BaseMatch(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BASE_MATCH_UNKNOWN: _ClassVar[BaseMatch]
    BASE_MATCH_YES: _ClassVar[BaseMatch]
    BASE_MATCH_NO: _ClassVar[BaseMatch]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CANCELLED: FinishReason
ADAPTER_LOCATION_UNSPECIFIED: AdapterLocation
ADAPTER_LOCATION_DISK: AdapterLocation
ADAPTER_LOCATION_HOST: AdapterLocation
ADAPTER_LOCATION_DEVICE: AdapterLocation
BASE_MATCH_UNKNOWN: BaseMatch
BASE_MATCH_YES: BaseMatch
BASE_MATCH_NO: BaseMatch

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "adapter_id", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop", "logprobs")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    adapter_id: str
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    repetition_penalty: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: bool
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., adapter_id: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "token_logprobs", "adapter_version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    adapter_version: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., adapter_version: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("chunk", "final")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    chunk: TokenChunk
    final: GenerateResponse
    def __init__(self, chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("text", "token_ids", "token_logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., token_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("id", "rank", "target_modules", "size_bytes", "location", "lora_alpha", "error", "digest", "pinned", "requests_running", "last_used_unix_seconds", "trained_for_base", "base_match", "same_content_as", "old_versions_resident", "saved_modules")
    ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FOR_BASE_FIELD_NUMBER: _ClassVar[int]
    BASE_MATCH_FIELD_NUMBER: _ClassVar[int]
    SAME_CONTENT_AS_FIELD_NUMBER: _ClassVar[int]
    OLD_VERSIONS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    SAVED_MODULES_FIELD_NUMBER: _ClassVar[int]
    id: str
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    location: AdapterLocation
    lora_alpha: float
    error: str
    digest: str
    pinned: bool
    requests_running: int
    last_used_unix_seconds: float
    trained_for_base: str
    base_match: BaseMatch
    same_content_as: _containers.RepeatedScalarFieldContainer[str]
    old_versions_resident: int
    saved_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., location: _Optional[_Union[AdapterLocation, str]] = ..., lora_alpha: _Optional[float] = ..., error: _Optional[str] = ..., digest: _Optional[str] = ..., pinned: _Optional[bool] = ..., requests_running: _Optional[int] = ..., last_used_unix_seconds: _Optional[float] = ..., trained_for_base: _Optional[str] = ..., base_match: _Optional[_Union[BaseMatch, str]] = ..., same_content_as: _Optional[_Iterable[str]] = ..., old_versions_resident: _Optional[int] = ..., saved_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "base_model", "max_loras", "max_lora_rank", "max_pinned")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_PINNED_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    base_model: str
    max_loras: int
    max_lora_rank: int
    max_pinned: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., base_model: _Optional[str] = ..., max_loras: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., max_pinned: _Optional[int] = ...) -> None: ...

class WeightedAdapter(_message.Message):
    __slots__ = ("id", "weight")
    ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    weight: float
    def __init__(self, id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class CombineAdaptersRequest(_message.Message):
    __slots__ = ("inputs", "method", "rank", "density", "majority_sign_method", "seed", "output_id", "replace")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SIGN_METHOD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[WeightedAdapter]
    method: str
    rank: int
    density: float
    majority_sign_method: str
    seed: int
    output_id: str
    replace: bool
    def __init__(self, inputs: _Optional[_Iterable[_Union[WeightedAdapter, _Mapping]]] = ..., method: _Optional[str] = ..., rank: _Optional[int] = ..., density: _Optional[float] = ..., majority_sign_method: _Optional[str] = ..., seed: _Optional[int] = ..., output_id: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class CombineAdaptersResponse(_message.Message):
    __slots__ = ("adapter", "replaced", "previous_digest", "overall_error", "max_module_error", "rank", "seconds", "warnings")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    OVERALL_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_MODULE_ERROR_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    replaced: bool
    previous_digest: str
    overall_error: float
    max_module_error: float
    rank: int
    seconds: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., replaced: _Optional[bool] = ..., previous_digest: _Optional[str] = ..., overall_error: _Optional[float] = ..., max_module_error: _Optional[float] = ..., rank: _Optional[int] = ..., seconds: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class MergeAdapterRequest(_message.Message):
    __slots__ = ("id", "format", "output_name", "dtype", "outtype", "overwrite")
    ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTTYPE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    id: str
    format: str
    output_name: str
    dtype: str
    outtype: str
    overwrite: bool
    def __init__(self, id: _Optional[str] = ..., format: _Optional[str] = ..., output_name: _Optional[str] = ..., dtype: _Optional[str] = ..., outtype: _Optional[str] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class MergeAdapterResponse(_message.Message):
    __slots__ = ("path", "format", "bytes", "verified", "verification", "max_logprob_error", "seconds")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGPROB_ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    format: str
    bytes: int
    verified: bool
    verification: _containers.RepeatedScalarFieldContainer[str]
    max_logprob_error: float
    seconds: float
    def __init__(self, path: _Optional[str] = ..., format: _Optional[str] = ..., bytes: _Optional[int] = ..., verified: _Optional[bool] = ..., verification: _Optional[_Iterable[str]] = ..., max_logprob_error: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("id", "pin")
    ID_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    id: str
    pin: bool
    def __init__(self, id: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter", "host_load_seconds", "device_load_seconds")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    HOST_LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    host_load_seconds: float
    device_load_seconds: float
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., host_load_seconds: _Optional[float] = ..., device_load_seconds: _Optional[float] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ("adapter", "requests_drained", "seconds", "freed_host_bytes", "freed_slot")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DRAINED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FREED_HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREED_SLOT_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    requests_drained: int
    seconds: float
    freed_host_bytes: int
    freed_slot: bool
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., requests_drained: _Optional[int] = ..., seconds: _Optional[float] = ..., freed_host_bytes: _Optional[int] = ..., freed_slot: _Optional[bool] = ...) -> None: ...

class UnpinAdapterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("id", "digest", "requests_drained", "seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DRAINED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    digest: str
    requests_drained: int
    seconds: float
    def __init__(self, id: _Optional[str] = ..., digest: _Optional[str] = ..., requests_drained: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("id", "replace", "expected_digest")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    replace: bool
    expected_digest: str
    def __init__(self, id: _Optional[str] = ..., replace: _Optional[bool] = ..., expected_digest: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: FileChunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class UploadAdapterResponse(_message.Message):
    __slots__ = ("adapter", "replaced", "previous_digest", "bytes_received")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    replaced: bool
    previous_digest: str
    bytes_received: int
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., replaced: _Optional[bool] = ..., previous_digest: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
