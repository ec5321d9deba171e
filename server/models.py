"""The base models one server hosts: each with its own variants, adapters and admission.

- `HostedModel`: what the caller hands EffllmServer for one model (frozen): the name requests use, its
  engines (its variants, the first the default), optionally its adapter registry, its sampling defaults,
  chat template and batch size.
- `ModelHost`: one model live: its `VariantSet` (each engine with its own Runner: own slots and queue, so a
  flood on one model fills that model's queue only), its `AdapterRegistry` (the versions loaded for it) and
  its architecture (common/architecture.py, from the checkpoint's config.json).
- `Models`: the hosts in order; the first serves a request that names no model.
Invariant: a request runs only on its own model's variants and adapters; a name not hosted is NOT_FOUND
naming `model`; an adapter belongs to the model whose fingerprint its manifest names, and loading or naming
it for another hosted model is FAILED_PRECONDITION naming both. No torch here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..common.architecture import Architecture, describe
from ..telemetry.genai import set_resident_adapters_source
from .adapters.registry import AdapterRegistry, RegistryConfig
from .defaults import SamplingDefaults
from .engines.base import AdapterHost, EffllmError, Engine
from .runner import Runner
from .variants import LiveFigures, Variant, VariantAdapters, VariantSet

if TYPE_CHECKING:
    from ..telemetry.genai import RequestObserver

log = logging.getLogger("effllm.server")

# KV-cache bytes per element at each precision (int4 quantises the weights; its KV cache stays bf16)
_KV_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int4": 2}


@dataclass(frozen=True)
class HostedModel:
    """One base model for EffllmServer. `name`: what GenerateRequest.model says ("" = the first engine's
    model). None fields take the server's (ServerConfig) values."""

    engines: tuple[Engine, ...]
    name: str = ""
    adapters: AdapterRegistry | None = None
    sampling_defaults: SamplingDefaults | None = None
    chat_template: bool | None = None
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not self.engines:
            raise ValueError(f"model {self.name or '?'}: needs at least one engine")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"model {self.name or '?'}: max_concurrency must be >= 1")


@dataclass(frozen=True)
class HostSettings:
    """The server-wide settings each ModelHost is built with (ServerConfig's, resolved)."""

    max_concurrency: int
    queue_size: int
    default_objective: str
    explore_share: float
    watts_per_core: float
    sampling_defaults: SamplingDefaults
    chat_template: bool
    # several models on this server: each request's telemetry names its model (with one, the served model's
    # labels stay as they were)
    several: bool = False


class ModelHost:
    """One hosted model: its variants (each its own runner: slots and queue), its adapters, its figures."""

    def __init__(
        self, spec: HostedModel, settings: HostSettings, observer: RequestObserver | None = None
    ) -> None:
        engines = list(spec.engines)
        self.engines = engines
        self.name = spec.name or engines[0].info.model
        self.sampling_defaults = spec.sampling_defaults or settings.sampling_defaults
        self.chat_template = settings.chat_template if spec.chat_template is None else spec.chat_template
        host: AdapterHost = engines[0] if len(engines) == 1 else VariantAdapters(engines)
        self.adapters = spec.adapters or AdapterRegistry(host, None, RegistryConfig())
        self.adapters.model = self.name
        shared = self.adapters.engine
        if len(engines) > 1 and not isinstance(shared, VariantAdapters):
            raise ValueError("several variants need an AdapterRegistry over VariantAdapters(engines)")
        slots = spec.max_concurrency or settings.max_concurrency
        variants = []
        for e in engines:
            # with several variants, live J/token from each engine's own CPU (LiveFigures.own_joules)
            watts = settings.watts_per_core
            own = (lambda e=e, w=watts: e.cpu_seconds() * w) if len(engines) > 1 else None
            figures = LiveFigures(own_joules=own)
            runner = Runner(
                e,
                slots,
                settings.queue_size,
                self.adapters,
                observer=observer,
                on_finish=figures.observe,
                model=self.name if settings.several else "",
            )
            variants.append(Variant(e, runner, figures))
        self.variants = VariantSet(
            variants,
            settings.default_objective,
            shared if isinstance(shared, VariantAdapters) else None,
            settings.explore_share,
        )
        self.variants.peek = self.adapters.peek
        self.architecture = _architecture(engines[0])

    @property
    def fingerprint(self) -> str:
        return self.engines[0].info.fingerprint

    def kv_bytes_per_token(self) -> int:
        if self.architecture is None:
            return 0
        return self.architecture.kv_bytes_per_token(_KV_BYTES.get(self.engines[0].info.precision, 2))


def _architecture(engine: Engine) -> Architecture | None:
    """From the checkpoint's config.json when the engine names its checkpoint (`engine.model`, a
    ResolvedModel); None otherwise (a test's fake engine) or when the config cannot be read."""
    path = getattr(getattr(engine, "model", None), "path", None)
    if path is None:
        return None
    try:
        return describe(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("%s: its architecture could not be read from config.json (%s)", path, exc)
        return None


class Models:
    """The hosted models in order, by name; the first is the default."""

    def __init__(self, hosts: Sequence[ModelHost]) -> None:
        if not hosts:
            raise ValueError("a server hosts at least one model")
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"models: {', '.join(names)} has a duplicate name")
        self.hosts = list(hosts)
        self.by_name = {h.name: h for h in self.hosts}
        self.default = self.hosts[0]
        by_fingerprint: dict[str, str] = {}
        for h in self.hosts:
            by_fingerprint.setdefault(h.fingerprint, h.name)
            h.adapters.model_of = by_fingerprint.get  # names another model in a wrong-base refusal
        if len(self.hosts) > 1:  # the gauge counts every model's resident versions
            set_resident_adapters_source(lambda: [e.key for h in self.hosts for e in h.adapters.entries()])

    def __iter__(self) -> Iterator[ModelHost]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def get(self, name: str | None) -> ModelHost:
        """The host for a request's `model` (None or "": the default); NOT_FOUND naming `model`."""
        if not name:
            return self.default
        host = self.by_name.get(name)
        if host is None:
            raise EffllmError(
                "not_found", f"model: {name[:80]!r} is not hosted here (hosted: {', '.join(self.by_name)})"
            )
        return host

    def check_adapter(self, host: ModelHost, ref: str) -> None:
        """A request on `host` naming adapter `ref` that only another model has loaded: FAILED_PRECONDITION
        naming both models (a ref no model has is left to the runner's NOT_FOUND)."""
        if not ref or len(self.hosts) == 1 or host.adapters.peek(ref) is not None:
            return
        owners = [h.name for h in self.hosts if h is not host and h.adapters.peek(ref) is not None]
        if owners:
            raise EffllmError(
                "failed_precondition",
                f"adapter: {ref} is loaded for model {', '.join(owners)}, not for model {host.name} "
                f"(an adapter runs on the base model it was trained on; set model={owners[0]})",
            )

    def variants(self) -> Iterator[tuple[ModelHost, Variant]]:
        for h in self.hosts:
            for v in h.variants.variants:
                yield h, v

    def states(self) -> dict[str, bool]:
        """Variant -> alive for the `effllm.variant.alive` gauge: with one model its variants' names, with
        several MODEL/VARIANT so names stay unique."""
        if len(self.hosts) == 1:
            return self.default.variants.states()
        return {f"{h.name}/{name}": alive for h in self.hosts for name, alive in h.variants.states().items()}

    @property
    def queued(self) -> int:
        return sum(h.variants.queued for h in self.hosts)

    @property
    def running(self) -> int:
        return sum(h.variants.running for h in self.hosts)
