"""AdapterService: gRPC <-> AdapterRegistry. Maps requests onto registry calls and EffllmErrors onto status
codes; no torch, no file access of its own (the registry validates and resolves paths)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from ...api.status import STATUS
from ...api.v1 import adapters_pb2 as apb
from ...api.v1 import adapters_pb2_grpc as apb_grpc
from ..engines.base import EffllmError
from .registry import AdapterRegistry, Entry

if TYPE_CHECKING:
    from ..models import Models

SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AdapterService"].full_name


def adapter_info(
    entry: Entry,
    latest: bool,
    holders: Callable[[str], tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
    model: str = "",
) -> apb.AdapterInfo:
    """`holders`: NAME@VERSION -> (variants holding it, skipped variants with why); `model`: the base
    model it is loaded for."""
    spec, manifest = entry.spec, entry.validated.manifest
    held, skipped = holders(spec.key) if holders is not None else ((), ())
    return apb.AdapterInfo(
        name=spec.name,
        version=spec.version,
        method=spec.method,
        rank=spec.rank,
        alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        base_fingerprint=manifest.base_fingerprint if manifest else "",
        residency=entry.residency,
        pinned=entry.pinned,
        load_s=entry.load_s,
        requests_served=entry.requests_served,
        last_used_unix=entry.last_used_unix,
        in_flight=entry.in_flight,
        latest=latest,
        content_sha256=spec.content_sha256,
        variants=list(held),
        skipped_variants=list(skipped),
        model=model,
    )


class AdapterService(apb_grpc.AdapterServiceServicer):
    """`registry` / `holders`: the (first) model's; `models`: every hosted model (server/models.py), whose
    own registry serves a request naming it in `model`."""

    def __init__(
        self,
        registry: AdapterRegistry,
        holders: Callable[[str], tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
        models: Models | None = None,
    ) -> None:
        self.registry = registry
        self.holders = holders  # which variants hold a version (VariantSet.holders)
        self.models = models
        self.ready = False  # set once the engine has started

    def _for(self, model: str | None, name: str = "", version: str = "") -> _Target:
        """The registry, holders and model name a request's `model` names (unset: the first model);
        NOT_FOUND naming `model`. With `name`: an adapter only another model has loaded is
        FAILED_PRECONDITION naming both."""
        if self.models is None:
            if model and model != self.registry.engine.info.model:
                raise EffllmError("not_found", f"model: {model[:80]!r} is not hosted here")
            return _Target(
                self.registry, self.holders, self.registry.model or self.registry.engine.info.model
            )
        host = self.models.get(model)
        if name:
            self.models.check_adapter(host, name if version in ("", "*", "latest") else f"{name}@{version}")
        return _Target(host.adapters, host.variants.holders, host.name)

    async def _abort(self, context: grpc.aio.ServicerContext, err: EffllmError) -> NoReturn:
        await context.abort(STATUS[err.code], err.message)
        raise AssertionError("unreachable")  # context.abort raises

    async def _check_ready(self, context: grpc.aio.ServicerContext) -> None:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is loading")

    async def LoadAdapter(
        self, request: apb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.AdapterInfo:
        await self._check_ready(context)
        if request.version and request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "version, path: give one of them, not both")
        try:
            t = self._for(_model(request))
            entry = await t.registry.load(request.name, request.version, request.path)
        except EffllmError as err:
            await self._abort(context, err)
        return adapter_info(entry, t.registry.is_latest(entry), t.holders, t.model)

    async def UnloadAdapter(
        self, request: apb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.UnloadAdapterResponse:
        await self._check_ready(context)
        if request.wait_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wait_s: {request.wait_s} must be >= 0")
        try:
            t = self._for(_model(request), request.name, request.version)
            keys = await t.registry.unload(request.name, request.version, request.wait_s)
        except EffllmError as err:
            await self._abort(context, err)
        return apb.UnloadAdapterResponse(unloaded=keys)

    async def ListAdapters(
        self, request: apb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> apb.ListAdaptersResponse:
        try:
            t = self._for(_model(request))
        except EffllmError as err:
            await self._abort(context, err)
        return apb.ListAdaptersResponse(
            adapters=[
                adapter_info(e, t.registry.is_latest(e), t.holders, t.model) for e in t.registry.entries()
            ]
        )

    async def PinAdapter(
        self, request: apb.PinAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.AdapterInfo:
        await self._check_ready(context)
        try:
            t = self._for(_model(request), request.name, request.version)
            entry = await t.registry.pin(request.name, request.version, request.pinned)
        except EffllmError as err:
            await self._abort(context, err)
        return adapter_info(entry, t.registry.is_latest(entry), t.holders, t.model)


@dataclass(frozen=True)
class _Target:
    """What one request's `model` selects: its registry, which variants hold a version, its name."""

    registry: AdapterRegistry
    holders: Callable[[str], tuple[tuple[str, ...], tuple[str, ...]]] | None
    model: str


def _model(request: Any) -> str | None:
    """The request's optional `model` field (None: unset)."""
    return request.model if request.HasField("model") else None
