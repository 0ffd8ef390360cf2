from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_FMP4: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_RAW_RGB: _ClassVar[OutputFormat]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_FMP4: OutputFormat
OUTPUT_FORMAT_RAW_RGB: OutputFormat

class PromptSegment(_message.Message):
    __slots__ = ("start_chunk", "text")
    START_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    start_chunk: int
    text: str
    def __init__(self, start_chunk: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt_segments", "image", "prefix_video", "num_chunks", "height", "width", "seed", "num_steps", "output_format", "job_id")
    PROMPT_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_VIDEO_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    prompt_segments: _containers.RepeatedCompositeFieldContainer[PromptSegment]
    image: bytes
    prefix_video: bytes
    num_chunks: int
    height: int
    width: int
    seed: int
    num_steps: int
    output_format: OutputFormat
    job_id: str
    def __init__(self, prompt_segments: _Optional[_Iterable[_Union[PromptSegment, _Mapping]]] = ..., image: _Optional[bytes] = ..., prefix_video: _Optional[bytes] = ..., num_chunks: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., seed: _Optional[int] = ..., num_steps: _Optional[int] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., job_id: _Optional[str] = ...) -> None: ...

class JobAccepted(_message.Message):
    __slots__ = ("job_id", "num_chunks", "num_frames", "frames_per_chunk", "fps", "width", "height", "num_steps", "output_format")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    num_chunks: int
    num_frames: int
    frames_per_chunk: int
    fps: int
    width: int
    height: int
    num_steps: int
    output_format: OutputFormat
    def __init__(self, job_id: _Optional[str] = ..., num_chunks: _Optional[int] = ..., num_frames: _Optional[int] = ..., frames_per_chunk: _Optional[int] = ..., fps: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_steps: _Optional[int] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("chunk", "step", "num_steps")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    chunk: int
    step: int
    num_steps: int
    def __init__(self, chunk: _Optional[int] = ..., step: _Optional[int] = ..., num_steps: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "num_frames", "data", "format", "part", "last_part")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    LAST_PART_FIELD_NUMBER: _ClassVar[int]
    index: int
    num_frames: int
    data: bytes
    format: OutputFormat
    part: int
    last_part: bool
    def __init__(self, index: _Optional[int] = ..., num_frames: _Optional[int] = ..., data: _Optional[bytes] = ..., format: _Optional[_Union[OutputFormat, str]] = ..., part: _Optional[int] = ..., last_part: _Optional[bool] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("ttfc_s", "tpoc_s", "total_s", "total_frames", "num_chunks")
    TTFC_S_FIELD_NUMBER: _ClassVar[int]
    TPOC_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ttfc_s: float
    tpoc_s: float
    total_s: float
    total_frames: int
    num_chunks: int
    def __init__(self, ttfc_s: _Optional[float] = ..., tpoc_s: _Optional[float] = ..., total_s: _Optional[float] = ..., total_frames: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class UpdatePromptRequest(_message.Message):
    __slots__ = ("job_id", "start_chunk", "text")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    START_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    start_chunk: int
    text: str
    def __init__(self, job_id: _Optional[str] = ..., start_chunk: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class UpdatePromptResponse(_message.Message):
    __slots__ = ("job_id", "start_chunk")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    START_CHUNK_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    start_chunk: int
    def __init__(self, job_id: _Optional[str] = ..., start_chunk: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("job_id", "was_active")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WAS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    was_active: bool
    def __init__(self, job_id: _Optional[str] = ..., was_active: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("accepted", "progress", "chunk", "done", "queued")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    accepted: JobAccepted
    progress: Progress
    chunk: Chunk
    done: Done
    queued: Queued
    def __init__(self, accepted: _Optional[_Union[JobAccepted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ...) -> None: ...
