"""AdapterService: gRPC <-> AdapterRegistry. Maps requests onto registry calls and EffllmErrors onto status
codes; no torch, no file access of its own (the registry validates and resolves paths)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import grpc

from ...api.status import STATUS
from ...api.v1 import adapters_pb2 as apb
from ...api.v1 import adapters_pb2_grpc as apb_grpc
from ..engines.base import EffllmError
from .registry import AdapterRegistry, Entry

SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AdapterService"].full_name


def adapter_info(
    entry: Entry,
    latest: bool,
    holders: Callable[[str], tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
) -> apb.AdapterInfo:
    """`holders`: NAME@VERSION -> (variants holding it, skipped variants with why)."""
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
    )


class AdapterService(apb_grpc.AdapterServiceServicer):
    def __init__(
        self,
        registry: AdapterRegistry,
        holders: Callable[[str], tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
    ) -> None:
        self.registry = registry
        self.holders = holders  # which variants hold a version (VariantSet.holders)
        self.ready = False  # set once the engine has started

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
            entry = await self.registry.load(request.name, request.version, request.path)
        except EffllmError as err:
            await self._abort(context, err)
        return adapter_info(entry, self.registry.is_latest(entry), self.holders)

    async def UnloadAdapter(
        self, request: apb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.UnloadAdapterResponse:
        await self._check_ready(context)
        if request.wait_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wait_s: {request.wait_s} must be >= 0")
        try:
            keys = await self.registry.unload(request.name, request.version, request.wait_s)
        except EffllmError as err:
            await self._abort(context, err)
        return apb.UnloadAdapterResponse(unloaded=keys)

    async def ListAdapters(
        self, request: apb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> apb.ListAdaptersResponse:
        entries = self.registry.entries()
        return apb.ListAdaptersResponse(
            adapters=[adapter_info(e, self.registry.is_latest(e), self.holders) for e in entries]
        )

    async def PinAdapter(
        self, request: apb.PinAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.AdapterInfo:
        await self._check_ready(context)
        try:
            entry = await self.registry.pin(request.name, request.version, request.pinned)
        except EffllmError as err:
            await self._abort(context, err)
        return adapter_info(entry, self.registry.is_latest(entry), self.holders)
