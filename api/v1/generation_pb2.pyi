from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Objective(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_UNSPECIFIED: _ClassVar[Objective]
    OBJECTIVE_LATENCY: _ClassVar[Objective]
    OBJECTIVE_ENERGY: _ClassVar[Objective]
    OBJECTIVE_QUALITY: _ClassVar[Objective]
    OBJECTIVE_BALANCED: _ClassVar[Objective]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]

class VariantState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VARIANT_STATE_UNSPECIFIED: _ClassVar[VariantState]
    VARIANT_STATE_SERVING: _ClassVar[VariantState]
    VARIANT_STATE_DEAD: _ClassVar[VariantState]
OBJECTIVE_UNSPECIFIED: Objective
OBJECTIVE_LATENCY: Objective
OBJECTIVE_ENERGY: Objective
OBJECTIVE_QUALITY: Objective
OBJECTIVE_BALANCED: Objective
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_ERROR: FinishReason
VARIANT_STATE_UNSPECIFIED: VariantState
VARIANT_STATE_SERVING: VariantState
VARIANT_STATE_DEAD: VariantState

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Messages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    repetition_penalty: float
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., repetition_penalty: _Optional[float] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "adapter", "request_id", "sampling", "objective", "budget", "strict_budget", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    STRICT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: Messages
    adapter: str
    request_id: str
    sampling: SamplingParams
    objective: Objective
    budget: Budget
    strict_budget: bool
    model: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Union[Messages, _Mapping]] = ..., adapter: _Optional[str] = ..., request_id: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., objective: _Optional[_Union[Objective, str]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., strict_budget: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("max_time_to_first_token_s", "max_time_per_output_token_s", "max_joules_per_token", "min_quality")
    MAX_TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    MAX_TIME_PER_OUTPUT_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    MAX_JOULES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MIN_QUALITY_FIELD_NUMBER: _ClassVar[int]
    max_time_to_first_token_s: float
    max_time_per_output_token_s: float
    max_joules_per_token: float
    min_quality: float
    def __init__(self, max_time_to_first_token_s: _Optional[float] = ..., max_time_per_output_token_s: _Optional[float] = ..., max_joules_per_token: _Optional[float] = ..., min_quality: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "energy_joules", "energy_source")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    energy_joules: float
    energy_source: str
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., energy_joules: _Optional[float] = ..., energy_source: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_s", "time_to_first_token_s", "decode_s", "total_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    time_to_first_token_s: float
    decode_s: float
    total_s: float
    def __init__(self, queue_s: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "usage", "timings", "adapter", "variant", "budget_met", "replica", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MET_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    adapter: str
    variant: str
    budget_met: bool
    replica: str
    model: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., adapter: _Optional[str] = ..., variant: _Optional[str] = ..., budget_met: _Optional[bool] = ..., replica: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class StreamFinal(_message.Message):
    __slots__ = ("finish_reason", "usage", "timings", "adapter", "variant", "budget_met", "replica", "model")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MET_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    adapter: str
    variant: str
    budget_met: bool
    replica: str
    model: str
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., adapter: _Optional[str] = ..., variant: _Optional[str] = ..., budget_met: _Optional[bool] = ..., replica: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    final: StreamFinal
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., final: _Optional[_Union[StreamFinal, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ArchitectureInfo(_message.Message):
    __slots__ = ("model_type", "family", "attention", "layers", "heads", "kv_heads", "experts", "top_k", "ssm", "active_parameters", "kv_cache_bytes_per_token", "random_init")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SSM_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RANDOM_INIT_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    family: str
    attention: str
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    ssm: bool
    active_parameters: int
    kv_cache_bytes_per_token: int
    random_init: bool
    def __init__(self, model_type: _Optional[str] = ..., family: _Optional[str] = ..., attention: _Optional[str] = ..., layers: _Optional[int] = ..., heads: _Optional[int] = ..., kv_heads: _Optional[int] = ..., experts: _Optional[int] = ..., top_k: _Optional[int] = ..., ssm: _Optional[bool] = ..., active_parameters: _Optional[int] = ..., kv_cache_bytes_per_token: _Optional[int] = ..., random_init: _Optional[bool] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("precisions", "adapter_methods", "max_adapter_rank", "max_adapters_per_batch")
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_METHODS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTER_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    precisions: _containers.RepeatedScalarFieldContainer[str]
    adapter_methods: _containers.RepeatedScalarFieldContainer[str]
    max_adapter_rank: int
    max_adapters_per_batch: int
    def __init__(self, precisions: _Optional[_Iterable[str]] = ..., adapter_methods: _Optional[_Iterable[str]] = ..., max_adapter_rank: _Optional[int] = ..., max_adapters_per_batch: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "fingerprint", "engine", "precision", "max_context", "capabilities", "weight_bytes", "weight_ratio_to_bf16", "device", "parameters", "max_concurrency", "queue_size", "sampling_defaults", "chat_template", "variants", "replicas", "name", "architecture")
    class ReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ModelInfo
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_RATIO_TO_BF16_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    model: str
    fingerprint: str
    engine: str
    precision: str
    max_context: int
    capabilities: Capabilities
    weight_bytes: int
    weight_ratio_to_bf16: float
    device: str
    parameters: int
    max_concurrency: int
    queue_size: int
    sampling_defaults: SamplingDefaults
    chat_template: bool
    variants: _containers.RepeatedCompositeFieldContainer[VariantInfo]
    replicas: _containers.MessageMap[str, ModelInfo]
    name: str
    architecture: ArchitectureInfo
    def __init__(self, model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., engine: _Optional[str] = ..., precision: _Optional[str] = ..., max_context: _Optional[int] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., weight_bytes: _Optional[int] = ..., weight_ratio_to_bf16: _Optional[float] = ..., device: _Optional[str] = ..., parameters: _Optional[int] = ..., max_concurrency: _Optional[int] = ..., queue_size: _Optional[int] = ..., sampling_defaults: _Optional[_Union[SamplingDefaults, _Mapping]] = ..., chat_template: _Optional[bool] = ..., variants: _Optional[_Iterable[_Union[VariantInfo, _Mapping]]] = ..., replicas: _Optional[_Mapping[str, ModelInfo]] = ..., name: _Optional[str] = ..., architecture: _Optional[_Union[ArchitectureInfo, _Mapping]] = ...) -> None: ...

class VariantInfo(_message.Message):
    __slots__ = ("name", "precision", "engine", "weight_bytes", "perplexity", "quality", "live", "adapter_methods", "state", "explored", "engine_state")
    class EngineStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_METHODS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPLORED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    precision: str
    engine: str
    weight_bytes: int
    perplexity: float
    quality: float
    live: VariantFigures
    adapter_methods: _containers.RepeatedScalarFieldContainer[str]
    state: VariantState
    explored: int
    engine_state: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., precision: _Optional[str] = ..., engine: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., perplexity: _Optional[float] = ..., quality: _Optional[float] = ..., live: _Optional[_Union[VariantFigures, _Mapping]] = ..., adapter_methods: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[VariantState, str]] = ..., explored: _Optional[int] = ..., engine_state: _Optional[_Mapping[str, str]] = ...) -> None: ...

class FigureSpread(_message.Message):
    __slots__ = ("median", "low", "high", "samples")
    MEDIAN_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    median: float
    low: float
    high: float
    samples: int
    def __init__(self, median: _Optional[float] = ..., low: _Optional[float] = ..., high: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class VariantFigures(_message.Message):
    __slots__ = ("time_to_first_token_s", "time_per_output_token_s", "joules_per_token", "energy_source", "queue_depth", "running", "requests", "time_to_first_token", "time_per_output_token", "joules", "newest_sample_age_s")
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    TIME_PER_OUTPUT_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    JOULES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIME_PER_OUTPUT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    JOULES_FIELD_NUMBER: _ClassVar[int]
    NEWEST_SAMPLE_AGE_S_FIELD_NUMBER: _ClassVar[int]
    time_to_first_token_s: float
    time_per_output_token_s: float
    joules_per_token: float
    energy_source: str
    queue_depth: int
    running: int
    requests: int
    time_to_first_token: FigureSpread
    time_per_output_token: FigureSpread
    joules: FigureSpread
    newest_sample_age_s: float
    def __init__(self, time_to_first_token_s: _Optional[float] = ..., time_per_output_token_s: _Optional[float] = ..., joules_per_token: _Optional[float] = ..., energy_source: _Optional[str] = ..., queue_depth: _Optional[int] = ..., running: _Optional[int] = ..., requests: _Optional[int] = ..., time_to_first_token: _Optional[_Union[FigureSpread, _Mapping]] = ..., time_per_output_token: _Optional[_Union[FigureSpread, _Mapping]] = ..., joules: _Optional[_Union[FigureSpread, _Mapping]] = ..., newest_sample_age_s: _Optional[float] = ...) -> None: ...

class SamplingDefaults(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "from_model")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FROM_MODEL_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    from_model: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., from_model: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("running", "queued", "engine_running", "requests_total", "requests_cancelled", "requests_rejected", "output_tokens_total", "replicas", "adapter_requests_warm", "adapter_requests_cold", "adapter_loads_on_demand")
    class ReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ServerStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ServerStats, _Mapping]] = ...) -> None: ...
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_REQUESTS_WARM_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_REQUESTS_COLD_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LOADS_ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    running: int
    queued: int
    engine_running: int
    requests_total: int
    requests_cancelled: int
    requests_rejected: int
    output_tokens_total: int
    replicas: _containers.MessageMap[str, ServerStats]
    adapter_requests_warm: int
    adapter_requests_cold: int
    adapter_loads_on_demand: int
    def __init__(self, running: _Optional[int] = ..., queued: _Optional[int] = ..., engine_running: _Optional[int] = ..., requests_total: _Optional[int] = ..., requests_cancelled: _Optional[int] = ..., requests_rejected: _Optional[int] = ..., output_tokens_total: _Optional[int] = ..., replicas: _Optional[_Mapping[str, ServerStats]] = ..., adapter_requests_warm: _Optional[int] = ..., adapter_requests_cold: _Optional[int] = ..., adapter_loads_on_demand: _Optional[int] = ...) -> None: ...

class GetTelemetryRequest(_message.Message):
    __slots__ = ("start_unix_s", "end_unix_s", "include_samples")
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    start_unix_s: float
    end_unix_s: float
    include_samples: bool
    def __init__(self, start_unix_s: _Optional[float] = ..., end_unix_s: _Optional[float] = ..., include_samples: _Optional[bool] = ...) -> None: ...

class ResourceSummary(_message.Message):
    __slots__ = ("samples", "window_s", "amu", "amu_bytes", "peak_memory_bytes", "pcu", "aec_w", "energy_j", "energy_source", "device")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    AMU_FIELD_NUMBER: _ClassVar[int]
    AMU_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PCU_FIELD_NUMBER: _ClassVar[int]
    AEC_W_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    samples: int
    window_s: float
    amu: float
    amu_bytes: float
    peak_memory_bytes: int
    pcu: float
    aec_w: float
    energy_j: float
    energy_source: str
    device: str
    def __init__(self, samples: _Optional[int] = ..., window_s: _Optional[float] = ..., amu: _Optional[float] = ..., amu_bytes: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., pcu: _Optional[float] = ..., aec_w: _Optional[float] = ..., energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class ResourceSample(_message.Message):
    __slots__ = ("t_unix_s", "memory_utilisation", "utilisation", "power_w", "energy_j", "memory_used_bytes")
    T_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTILISATION_FIELD_NUMBER: _ClassVar[int]
    UTILISATION_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    t_unix_s: float
    memory_utilisation: float
    utilisation: float
    power_w: float
    energy_j: float
    memory_used_bytes: int
    def __init__(self, t_unix_s: _Optional[float] = ..., memory_utilisation: _Optional[float] = ..., utilisation: _Optional[float] = ..., power_w: _Optional[float] = ..., energy_j: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ...) -> None: ...

class RequestFigures(_message.Message):
    __slots__ = ("request_id", "adapter", "start_unix_s", "end_unix_s", "input_tokens", "output_tokens", "queue_s", "time_to_first_token_s", "decode_s", "energy_j", "energy_source", "error", "variant", "objective", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    adapter: str
    start_unix_s: float
    end_unix_s: float
    input_tokens: int
    output_tokens: int
    queue_s: float
    time_to_first_token_s: float
    decode_s: float
    energy_j: float
    energy_source: str
    error: str
    variant: str
    objective: str
    model: str
    def __init__(self, request_id: _Optional[str] = ..., adapter: _Optional[str] = ..., start_unix_s: _Optional[float] = ..., end_unix_s: _Optional[float] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., error: _Optional[str] = ..., variant: _Optional[str] = ..., objective: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class GroupFigures(_message.Message):
    __slots__ = ("adapter", "precision", "requests", "errors", "output_tokens", "energy_j", "j_per_token", "energy_source", "amu", "pcu", "aec_w")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    J_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    AMU_FIELD_NUMBER: _ClassVar[int]
    PCU_FIELD_NUMBER: _ClassVar[int]
    AEC_W_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    precision: str
    requests: int
    errors: int
    output_tokens: int
    energy_j: float
    j_per_token: float
    energy_source: str
    amu: float
    pcu: float
    aec_w: float
    def __init__(self, adapter: _Optional[str] = ..., precision: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., output_tokens: _Optional[int] = ..., energy_j: _Optional[float] = ..., j_per_token: _Optional[float] = ..., energy_source: _Optional[str] = ..., amu: _Optional[float] = ..., pcu: _Optional[float] = ..., aec_w: _Optional[float] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("model", "precision", "engine", "start_unix_s", "end_unix_s", "resources", "requests", "groups", "samples", "enabled", "replicas")
    class ReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Telemetry
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Telemetry, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    precision: str
    engine: str
    start_unix_s: float
    end_unix_s: float
    resources: ResourceSummary
    requests: _containers.RepeatedCompositeFieldContainer[RequestFigures]
    groups: _containers.RepeatedCompositeFieldContainer[GroupFigures]
    samples: _containers.RepeatedCompositeFieldContainer[ResourceSample]
    enabled: bool
    replicas: _containers.MessageMap[str, Telemetry]
    def __init__(self, model: _Optional[str] = ..., precision: _Optional[str] = ..., engine: _Optional[str] = ..., start_unix_s: _Optional[float] = ..., end_unix_s: _Optional[float] = ..., resources: _Optional[_Union[ResourceSummary, _Mapping]] = ..., requests: _Optional[_Iterable[_Union[RequestFigures, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupFigures, _Mapping]]] = ..., samples: _Optional[_Iterable[_Union[ResourceSample, _Mapping]]] = ..., enabled: _Optional[bool] = ..., replicas: _Optional[_Mapping[str, Telemetry]] = ...) -> None: ...
