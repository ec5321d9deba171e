"""Which adapter versions are resident, which one a request gets, and when one may leave. No torch.

Invariants:
- A request resolves its adapter once (`acquire`) and holds a `Lease` until it ends; the version it got
  stays loaded in the engine until every lease on it is released (unload waits, eviction skips it).
- `NAME` means the highest loaded version of NAME; loading NAME@2 makes it the answer for new requests in
  one event-loop step (atomic swap) while requests running on NAME@1 keep NAME@1.
- Mutations (load, unload, pin, evict) hold one asyncio.Lock; validation reads files in a worker thread;
  unload waits for in-flight requests with the lock released (others load and pin meanwhile).
- Pinned versions are never evicted nor unloaded; eviction takes the least recently used idle version,
  and only once the new version is loaded and has passed its probe (a failed load evicts nothing).
- Identity: NAME@VERSION means one content (sha256 of its config and weights) for the life of the
  server: loading it again with other bytes is refused, so no cache keyed by the name can mix versions.
- A load's log line ("loaded adapter ...") ends with the wall time of each of its phases (`LoadPhases`):
  where a LoadAdapter's milliseconds go, without a profiler (bench/adapters.py reads them back).
- Every failure of a load is an EffllmError (anything unforeseen is logged and becomes
  failed_precondition): nothing about an adapter can surface as UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ...common.adapter_paths import (
    check_name,
    check_version,
    parse_ref,
    resolve_relative,
    resolve_version_dir,
)
from ...common.manifest import content_hash
from ...telemetry.genai import set_resident_adapters_source
from ...telemetry.tracing import adapter_span
from ..engines.base import AdapterHost, AdapterSpec, EffllmError
from .snapshot import Snapshots, sweep_stale
from .validate import BaseModules, Validated, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryConfig:
    root: Path | None = None  # None: the server runs without adapters
    max_resident: int = 16
    max_rank: int = 64
    unload_wait_s: float = 30.0  # default bound on waiting for in-flight requests

    def __post_init__(self) -> None:
        if self.max_resident < 1 or self.max_rank < 1 or self.unload_wait_s < 0:
            raise ValueError("max_resident >= 1, max_rank >= 1 and unload_wait_s >= 0 are required")


class LoadPhases:
    """Wall time per phase of one load, in the order they ran: validate (in place), snapshot (copy and
    content hash), scan (the snapshot validated again, every weight read for NaN/inf), lock (waiting
    for other mutations), engine_add, probe, evict. Both engines run their probe's work inside
    engine_add (hf: in the add's worker job; vLLM: beside add_lora), so probe is only reading it back."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - t0

    def text(self) -> str:
        """`validate=1.2ms snapshot=0.8ms ...`: the log line's tail, one token per phase."""
        return " ".join(f"{phase}={s * 1e3:.1f}ms" for phase, s in self.spent.items())


@dataclass(eq=False)
class Entry:
    """One resident version and its statistics."""

    spec: AdapterSpec
    validated: Validated
    load_s: float
    seq: int  # load order: ties between non-numeric versions go to the newest
    pinned: bool = False
    in_flight: int = 0
    requests_served: int = 0
    last_used_unix: float = 0.0
    last_touch: float = 0.0  # monotonic, for LRU
    routable: bool = True  # False while unloading or evicting: new requests no longer get it
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    source: Path | None = None  # the folder in the root; spec.path is the private snapshot the engine reads
    phases: dict[str, float] = field(default_factory=dict)  # seconds per load phase (LoadPhases)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def residency(self) -> str:
        # A version with requests in flight sits in the engine's batch slots; otherwise in its host cache.
        return "slot" if self.in_flight else "host"

    def order(self) -> tuple[int, int, int]:
        v = self.spec.version
        return (1, int(v), self.seq) if v.isdigit() else (0, 0, self.seq)


class Lease:
    """A request's hold on one adapter version; `release` is idempotent."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self._released = False
        entry.in_flight += 1
        entry.idle.clear()
        entry.last_used_unix = time.time()
        entry.last_touch = time.monotonic()

    @property
    def spec(self) -> AdapterSpec:
        return self.entry.spec

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        e = self.entry
        e.in_flight -= 1
        e.requests_served += 1
        e.last_touch = time.monotonic()
        if e.in_flight == 0:
            e.idle.set()


class AdapterRegistry:
    def __init__(self, engine: AdapterHost, base_path: Path | None, config: RegistryConfig) -> None:
        """`base_path`: the served base checkpoint (target modules and shapes are checked against it)."""
        self.engine = engine
        self.base_path = base_path
        self.config = config
        self._entries: dict[str, Entry] = {}  # key NAME@VERSION -> entry (routable or leaving)
        self._lock = asyncio.Lock()
        self._seq = itertools.count(1)
        self._base: BaseModules | None = None
        self._snapshots = Snapshots()
        # NAME@VERSION -> content sha256 of every version this server has loaded (kept after unload)
        self._identity: dict[str, str] = {}
        # On a server hosting several models (server/models.py): this registry's model, and the hosted model
        # a base fingerprint belongs to, so a wrong-base refusal names both models.
        self.model = ""
        self.model_of: Callable[[str], str | None] | None = None
        if config.root is not None:
            sweep_stale()  # snapshot folders of servers killed before they could remove theirs
        set_resident_adapters_source(lambda: list(self._entries))

    # -- requests ---------------------------------------------------------------------------------------
    def acquire(self, ref: str) -> Lease:
        """The version a request naming `ref` runs on; NOT_FOUND when none is loaded. Synchronous on purpose:
        choosing the entry and counting the lease happen in one step, so no swap or unload slips between."""
        name, version = parse_ref(ref)
        entry = self.latest(name) if version in ("", "latest") else self._routable(f"{name}@{version}")
        if entry is None:
            loaded = sorted(e.key for e in self._entries.values() if e.routable and e.spec.name == name)
            hint = f" (loaded: {', '.join(loaded)})" if loaded else " (LoadAdapter it first)"
            raise EffllmError("not_found", f"adapter: {ref!r} is not loaded{hint}")
        return Lease(entry)

    def peek(self, ref: str) -> str | None:
        """The NAME@VERSION a request naming `ref` would get now (no lease), None when none is loaded or
        `ref` is malformed: lets the router pick a variant holding it in the same step as `acquire`."""
        try:
            name, version = parse_ref(ref)
        except (EffllmError, ValueError):
            return None
        entry = self.latest(name) if version in ("", "latest") else self._routable(f"{name}@{version}")
        return entry.key if entry is not None else None

    def _routable(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.routable else None

    def latest(self, name: str) -> Entry | None:
        candidates = [e for e in self._entries.values() if e.routable and e.spec.name == name]
        return max(candidates, key=Entry.order, default=None)

    def entries(self) -> list[Entry]:
        return sorted(
            (e for e in self._entries.values() if e.routable), key=lambda e: (e.spec.name, e.order())
        )

    def is_latest(self, entry: Entry) -> bool:
        return self.latest(entry.spec.name) is entry

    # -- load -------------------------------------------------------------------------------------------
    def _root(self) -> Path:
        if self.config.root is None:
            raise EffllmError("failed_precondition", "this server was started without --adapter-root")
        return self.config.root

    def locate(self, name: str, version: str = "", path: str = "") -> tuple[str, str, Path]:
        """(name, version, folder) for a LoadAdapter request; raises invalid_argument / not_found."""
        root = self._root()
        check_name(name)
        if path:
            folder = resolve_relative(root, path)
            label = version or folder.name
            check_version(label, "version" if version else "path")
            return name, label, folder
        version, folder = resolve_version_dir(root, name, version)
        return name, version, folder

    def _validate(
        self, folder: Path, root: Path | None = None, values: bool = False, content_sha256: str = ""
    ) -> Validated:
        if self._base is None:
            if self.base_path is None:
                raise EffllmError(
                    "failed_precondition", "the base checkpoint is unknown; cannot validate adapters"
                )
            self._base = BaseModules(self.base_path)
        info = self.engine.info
        max_rank = min(self.config.max_rank, info.max_adapter_rank or self.config.max_rank)
        return validate(
            folder,
            root or self._root(),
            self._base,
            base_fingerprint=info.fingerprint,
            max_rank=max_rank,
            methods=tuple(info.adapter_methods),
            values=values,
            content_sha256=content_sha256,
            served_model=self.model,
            model_of=self.model_of,
        )

    async def load(self, name: str, version: str = "", path: str = "") -> Entry:
        """Validate, then make NAME@VERSION servable (idempotent). On any failure nothing has changed."""
        key = f"{name}@{version or path}"
        try:
            name, version, folder = self.locate(name, version, path)
            key = f"{name}@{version}"
            if (existing := self._routable(key)) is not None:
                await asyncio.to_thread(self._same_content, key, folder)
                return existing
            with adapter_span("load", name, version):
                return await self._load(name, version, folder)
        except EffllmError:
            raise
        except Exception as exc:  # unforeseen: the adapter's fault until shown otherwise, never UNKNOWN
            log.exception("loading adapter %s failed unexpectedly", key)
            raise EffllmError(
                "failed_precondition", f"adapter: {key} could not be loaded ({type(exc).__name__})"
            ) from exc

    def _same_content(self, key: str, folder: Path) -> None:
        """Refuse when the folder now holds other bytes than the loaded version `key` (re-published)."""
        try:
            digest = content_hash(folder, self._root())
        except ValueError as exc:
            raise EffllmError("failed_precondition", f"adapter: {key}: {exc}") from exc
        self._check_identity(key, digest)

    def _check_identity(self, key: str, digest: str) -> None:
        known = self._identity.get(key)
        if known is not None and known != digest:
            raise EffllmError(
                "failed_precondition",
                f"version: {key} was loaded before with content sha256 {known[:12]}…, the folder now holds "
                f"{digest[:12]}… (re-published under the same version?): publish it as a new version",
            )

    async def _load(self, name: str, version: str, folder: Path) -> Entry:
        key = f"{name}@{version}"
        t0 = time.perf_counter()
        phase = LoadPhases()
        root = self._root()
        with phase("validate"):
            await asyncio.to_thread(self._validate, folder)  # in place: path rules, then content
        # The engine gets a private copy, validated again with every weight read (see snapshot.py):
        # damage to the root after this point cannot reach the engine. The copy is hashed as it is made.
        with phase("snapshot"):
            hashing = hashlib.sha256()
            copy = await asyncio.to_thread(self._snapshots.take, folder, key, root, hashing)
            digest = hashing.hexdigest()
        kept = False
        try:
            with phase("scan"):
                validated = await asyncio.to_thread(self._validate, copy, self._snapshots.root, True, digest)
            self._check_identity(key, validated.content_sha256)
            waited = time.perf_counter()
            async with self._lock:
                phase.spent["lock"] = time.perf_counter() - waited
                if (existing := self._routable(key)) is not None:
                    self._check_identity(key, validated.content_sha256)
                    return existing
                if key in self._entries:
                    raise EffllmError(
                        "failed_precondition", f"name: {key} is being unloaded; retry when it is gone"
                    )
                self._check_identity(key, validated.content_sha256)  # a concurrent load may have set it
                self._room_exists()
                spec = AdapterSpec(
                    name=name,
                    version=version,
                    path=copy,
                    method=validated.method,
                    rank=validated.rank,
                    alpha=validated.alpha,
                    target_modules=validated.target_modules,
                    content_sha256=validated.content_sha256,
                )
                await self._engine_add(spec, phase)
                try:
                    with phase("evict"):
                        await self._make_room()  # the new one is good: only now may another one leave
                except BaseException:
                    await self.engine.remove_adapter(key)
                    raise
                entry = Entry(
                    spec,
                    validated,
                    load_s=time.perf_counter() - t0,
                    seq=next(self._seq),
                    source=folder,
                    phases=dict(phase.spent),
                )
                entry.last_touch = time.monotonic()
                self._entries[key] = entry  # from here on `NAME` resolves to the highest loaded version
                self._identity[key] = validated.content_sha256
                kept = True
        finally:
            if not kept:  # refused, or already loaded by a concurrent call: this copy is not needed
                self._snapshots.drop(copy)
        log.info(
            "loaded adapter %s (%s, r=%d, sha256 %s) in %.3fs: %s",
            key,
            spec.method,
            spec.rank,
            spec.content_sha256[:12],
            entry.load_s,
            phase.text(),
        )
        return entry

    async def _engine_add(self, spec: AdapterSpec, phase: LoadPhases | None = None) -> None:
        """Load into the engine, then probe it: an adapter whose logits are not finite never becomes
        routable (it would poison every row batched with it). Caller holds the lock."""
        key = spec.key
        phase = phase or LoadPhases()
        try:
            with phase("engine_add"):
                await self.engine.add_adapter(spec)
        except EffllmError:
            raise
        except Exception as exc:  # the engine refused it; keep the server and the others going
            log.exception("engine could not load %s", key)
            raise EffllmError("failed_precondition", f"engine could not load {key}: {exc}") from exc
        probe = getattr(self.engine, "probe_adapter", None)
        if probe is None:
            return
        try:
            with phase("probe"):
                finite = bool(await probe(spec))
            problem = "" if finite else "its logits on a probe prompt are not finite (NaN or inf)"
        except EffllmError as err:  # the engine's own words: which module, what is wrong
            problem = err.message
        except Exception as exc:
            log.exception("probe of adapter %s failed", key)
            problem = f"the probe failed ({type(exc).__name__}: {str(exc)[:120]})"
        if problem:
            await self.engine.remove_adapter(key)
            raise EffllmError("failed_precondition", f"adapter: {key} refused: {problem}")

    def _evictable(self) -> list[Entry]:
        return [e for e in self._entries.values() if e.routable and not e.pinned and e.in_flight == 0]

    def _room_exists(self) -> None:
        """Refuse before touching the engine when no resident version could make way for one more."""
        if len(self._entries) >= self.config.max_resident and not self._evictable():
            raise EffllmError(
                "resource_exhausted",
                f"all {len(self._entries)} resident adapters (max {self.config.max_resident}) are "
                "pinned or serving requests; unload or unpin one first",
            )

    async def _make_room(self) -> None:
        """Evict least recently used idle, unpinned versions until one more fits. Caller holds the lock."""
        while len(self._entries) >= self.config.max_resident:
            self._room_exists()
            victim = min(self._evictable(), key=lambda e: e.last_touch)
            victim.routable = False  # same step as the choice: no new lease can reach it
            await self._drop(victim, "evict")
            log.info("evicted adapter %s (least recently used)", victim.key)

    async def _drop(self, entry: Entry, action: str) -> None:
        try:
            with adapter_span(action, entry.spec.name, entry.spec.version):
                await self.engine.remove_adapter(entry.key)
        finally:
            self._entries.pop(entry.key, None)
            self._snapshots.drop(entry.spec.path)

    def close(self) -> None:
        """Remove this server's snapshot folder (at exit; the engine no longer reads it)."""
        self._snapshots.close()

    # -- unload / pin -----------------------------------------------------------------------------------
    def _find(self, name: str, version: str) -> list[Entry]:
        check_name(name)
        if version in ("", "*"):
            found = [e for e in self._entries.values() if e.routable and e.spec.name == name]
        elif version == "latest":
            found = [e] if (e := self.latest(name)) else []
        else:
            found = [e] if (e := self._routable(f"{name}@{check_version(version)}")) else []
        if not found:
            raise EffllmError("not_found", f"adapter: {name}{'@' + version if version else ''} is not loaded")
        return found

    async def unload(self, name: str, version: str = "", wait_s: float = 0.0) -> list[str]:
        """Stop routing new requests to the version(s), wait (bounded) for their in-flight requests, then
        drop them. If the wait runs out they are routable again and nothing was unloaded. The wait runs
        with the registry lock released: loads, pins and other unloads go on meanwhile (a version being
        unloaded is neither routable nor evictable, and loading its key again is refused until it is gone).
        """
        wait = wait_s if wait_s > 0 else self.config.unload_wait_s
        async with self._lock:
            found = self._find(name, version)
            pinned = [e.key for e in found if e.pinned]
            if pinned:
                raise EffllmError(
                    "failed_precondition", f"adapter: {', '.join(pinned)} is pinned; unpin it first"
                )
            for e in found:
                e.routable = False
        try:
            await asyncio.wait_for(asyncio.gather(*(e.idle.wait() for e in found)), timeout=wait)
        except BaseException as exc:  # timed out, or this call was cancelled: leave them as they were
            for e in found:
                e.routable = True
            if not isinstance(exc, asyncio.TimeoutError):
                raise
            busy = sum(e.in_flight for e in found)
            raise EffllmError(
                "failed_precondition",
                f"adapter: {busy} requests still in flight after {wait:.1f}s; nothing was unloaded",
            ) from None
        async with self._lock:
            for e in found:
                await self._drop(e, "unload")
        keys = [e.key for e in found]
        log.info("unloaded adapters %s", ", ".join(keys))
        return keys

    async def pin(self, name: str, version: str = "", pinned: bool = True) -> Entry:
        """Pin (or unpin) one version: VERSION, or the latest when empty or "latest". Version "*" pins
        every loaded version of NAME; the entry returned is then the latest of them."""
        async with self._lock:
            found = self._find(name, version or "latest")
            for entry in found:
                entry.pinned = pinned
            return max(found, key=Entry.order)
