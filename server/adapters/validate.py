"""Check an adapter folder against the served base model before anything changes. No torch.

Every file is hostile: adapter_config.json and manifest.json are read with a size limit and type-checked
field by field (numbers finite and in range, module patterns compiled under a guard), safetensors headers
are checked entry by entry, and — on the private snapshot the engine will read (`values=True`) — the
weights are checked for NaN/inf through a read-only memory map, and the content hash is taken.
Invariant: `validate` either returns a `Validated` that an engine can load, or raises an EffllmError —
`failed_precondition` naming the file and field when the thing on disk does not fit this server
(`invalid_argument` when a file resolves outside the root); anything unforeseen is logged and becomes
`failed_precondition`, never an uncaught exception.
Base module names and shapes come from the base checkpoint's safetensors headers (`BaseModules`).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...common.adapter_paths import file_inside
from ...common.manifest import (
    MANIFEST,
    Manifest,
    content_hash,
    nonfinite_path,
    read_json_limited,
    read_manifest,
)
from ..engines.base import AdapterMethod, EffllmError

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# Non-finite test per float dtype on the raw bits (numpy has no bf16/fp8): (unsigned view, mask, value);
# an element is NaN/inf when bits & mask == value, i.e. its exponent is all ones (E4M3: only 0x7f is NaN).
_NONFINITE_BITS = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000, 0x7FF0_0000_0000_0000),
    "F32": ("<u4", 0x7F80_0000, 0x7F80_0000),
    "F16": ("<u2", 0x7C00, 0x7C00),
    "BF16": ("<u2", 0x7F80, 0x7F80),
    "F8_E4M3": ("u1", 0x7F, 0x7F),
    "F8_E5M2": ("u1", 0x7C, 0x7C),
}
_MAX_HEADER = 16 << 20  # an adapter's tensor table is KiB; a base checkpoint's at most a few MiB
_MAX_TENSORS = 100_000
_MAX_DIMS = 8
_MAX_PATTERN = 1024  # characters of a target_modules regex
_MAX_TARGETS = 1024  # names in target_modules / keys in rank_pattern, alpha_pattern
_MAX_TARGET_CHARS = 256
_MAX_ALPHA = 1e6
_REGEX_BUDGET_S = 0.25  # all fullmatch calls of one pattern over the base modules together
_CHUNK = 1 << 24  # elements per NaN check (bounds the temporary to 16 MiB of bools)
# module.lora_A.weight -> (module, kind); DoRA's magnitude vector has no ".weight" suffix.
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$"
)
_DORA_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(\.weight)?$")


def _fail(message: str) -> EffllmError:
    return EffllmError("failed_precondition", message)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path, max_header: int = _MAX_HEADER) -> dict[str, Any]:
    """The tensor table of a safetensors file, after checking that the file holds all of its data and
    that every entry is well formed (dtype known, shape and data_offsets lists of non-negative ints)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise _fail(f"{path.name}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, max_header):
            raise _fail(
                f"{path.name}: header claims {n} bytes but the file has {size} (truncated, over the "
                f"{max_header}-byte header limit, or not safetensors)"
            )
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _fail(f"{path.name}: header is not valid JSON ({str(exc)[:120]})") from exc
    if not isinstance(header, dict):
        raise _fail(f"{path.name}: header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > _MAX_TENSORS:
        raise _fail(f"{path.name}: {len(header)} tensors is over the limit of {_MAX_TENSORS}")
    data_len = size - 8 - n
    end_max = 0
    for key, meta in header.items():
        where = f"{path.name}: tensor {_short(key)}"
        if not isinstance(meta, dict):
            raise _fail(f"{where}: entry is not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise _fail(f"{where}: dtype {_short(dtype)} is not a safetensors dtype")
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(map(_nonneg_int, shape)):
            raise _fail(f"{where}: shape {_short(shape)} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_nonneg_int, offsets)):
            raise _fail(f"{where}: data_offsets {_short(offsets)} is not [start, end]")
        start, end = offsets
        nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        if not start <= end or end - start != nbytes:
            raise _fail(f"{where}: data_offsets {start}..{end} do not hold {shape} {dtype}")
        end_max = max(end_max, end)
    if end_max != data_len:
        raise _fail(
            f"{path.name}: tensors need {end_max} data bytes but the file holds {data_len} "
            f"({'truncated' if data_len < end_max else 'trailing bytes'})"
        )
    return header


def check_weight_values(path: Path, header: dict[str, Any]) -> None:
    """Refuse NaN/inf anywhere in the weights. Reads the file through a read-only memory map, one chunk
    of one tensor at a time (pages are file-backed: nothing is copied onto the heap); `header` is the
    checked table of `path` (read_safetensors_header). The safetensors library parses the file first:
    what the engines will read must pass its own checks (overlaps, gaps), not only ours."""
    import numpy as np
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as exc:  # SafetensorError: the engine's loader would refuse (or die on) it
        raise _fail(f"{path.name}: the safetensors library refuses it ({str(exc)[:160]})") from exc
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if path.stat().st_size == 8 + n:
            return  # no tensor data at all (empty tensors only): nothing to check, nothing to map
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for key, meta in header.items():
                bits = _NONFINITE_BITS.get(meta["dtype"])
                if bits is None:
                    continue  # integers and bools are always finite
                view, mask, value = bits
                item = np.dtype(view).itemsize
                start, end = meta["data_offsets"]
                count = (end - start) // item
                for first in range(0, count, _CHUNK):
                    chunk = np.frombuffer(
                        mm, dtype=view, count=min(_CHUNK, count - first), offset=8 + n + start + first * item
                    )
                    bad = bool(np.any((chunk & mask) == value))
                    del chunk  # release the exported buffer before the map closes
                    if bad:
                        raise _fail(
                            f"{path.name}: tensor {_short(key)} holds NaN or inf values "
                            "(the adapter would poison the model's output)"
                        )


class BaseModules:
    """Weight shapes of the base checkpoint by module name (e.g. model.layers.0.self_attn.q_proj)."""

    def __init__(self, base_path: Path) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        for p in sorted(Path(base_path).glob("*.safetensors")):
            for key, meta in read_safetensors_header(p).items():
                if key.endswith(".weight"):
                    self.shapes[key[: -len(".weight")]] = tuple(meta["shape"])
        config_path = Path(base_path) / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.architectures: tuple[str, ...] = tuple(config.get("architectures") or ())
        # Tied embeddings: lm_head shares embed_tokens' weight and is absent from the checkpoint.
        if config.get("tie_word_embeddings") and "lm_head" not in self.shapes:
            embed = next((k for k in self.shapes if k.endswith("embed_tokens")), None)
            if embed is not None:
                self.shapes["lm_head"] = self.shapes[embed]

    def matches(self, target: str) -> bool:
        """PEFT's rule: a target names a module when it is the full name or a suffix after a '.'."""
        return any(m == target or m.endswith("." + target) for m in self.shapes)


@dataclass(frozen=True)
class Validated:
    method: AdapterMethod
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    manifest: Manifest | None
    weight_bytes: int
    content_sha256: str = ""  # set when the values were checked (the snapshot); see manifest.content_hash


def _flag(config: dict[str, Any], key: str) -> bool:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise _fail(f"{CONFIG}: {key}: {_short(value)} is not true or false")
    return bool(value)


def _method(config: dict[str, Any]) -> AdapterMethod:
    dora, rslora = _flag(config, "use_dora"), _flag(config, "use_rslora")
    return "dora" if dora else "rslora" if rslora else "lora"


def _rank(value: Any, field: str, max_rank: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(f"{CONFIG}: {field}: {_short(value)} is not an integer")
    if value < 1:
        raise _fail(f"{CONFIG}: {field}: rank {value} must be >= 1")
    if value > max_rank:
        raise _fail(f"rank: {value} is over this server's max adapter rank {max_rank} ({CONFIG} {field})")
    return value


def _alpha(value: Any, field: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _fail(f"{CONFIG}: {field}: {_short(value)} is not a number")
    alpha = float(value)  # an int too large for a float raises OverflowError: caught by the caller
    if not (math.isfinite(alpha) and 0 < alpha <= _MAX_ALPHA):
        raise _fail(f"{CONFIG}: {field}: {_short(value)} is out of range (0, {_MAX_ALPHA:g}]")
    return alpha


def _pattern_map(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"{CONFIG}: {key}: {_short(value)} is not an object of module pattern -> value")
    if len(value) > _MAX_TARGETS or any(len(k) > _MAX_TARGET_CHARS for k in value):
        raise _fail(f"{CONFIG}: {key}: more than {_MAX_TARGETS} patterns or a pattern over the limit")
    return value


def _targets(config: dict[str, Any], base: BaseModules) -> tuple[str, ...]:
    raw = config.get("target_modules")
    if raw is None:
        return ()
    if isinstance(raw, str):  # PEFT allows one regex over full module names (re.fullmatch)
        return (_check_pattern(raw, base),)
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise _fail(f"{CONFIG}: target_modules: {_short(raw)} is not a list of module names or one regex")
    if len(raw) > _MAX_TARGETS or any(not 0 < len(t) <= _MAX_TARGET_CHARS for t in raw):
        raise _fail(
            f"{CONFIG}: target_modules: at most {_MAX_TARGETS} names of 1-{_MAX_TARGET_CHARS} characters"
        )
    missing = [t for t in raw if not base.matches(t)]
    if missing:
        raise _fail(
            f"target_modules: {_short(missing)} do not exist in the base model {base.architectures or ''}"
        )
    return tuple(raw)


def _check_pattern(pattern: str, base: BaseModules) -> str:
    """An untrusted regex: bounded length, compiles with `re` (what PEFT and vLLM use), matches at least
    one base module, and all its matching over the base modules ends within a time budget (the `regex`
    module's timeout: a catastrophically backtracking pattern is refused, not run to the end)."""
    import regex

    if not 0 < len(pattern) <= _MAX_PATTERN:
        raise _fail(f"{CONFIG}: target_modules: a regex of 1-{_MAX_PATTERN} characters is required")
    try:
        re.compile(pattern)
        compiled = regex.compile(pattern, flags=regex.VERSION0)
    except (re.error, regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise _fail(f"{CONFIG}: target_modules: {_short(pattern)} is not a valid regex ({exc})") from exc
    deadline = time.monotonic() + _REGEX_BUDGET_S
    matched = False
    try:
        for module in base.shapes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            matched |= compiled.fullmatch(module, timeout=left) is not None
    except TimeoutError:
        raise _fail(
            f"{CONFIG}: target_modules: regex {_short(pattern)} takes too long to match module names"
        ) from None
    if not matched:
        raise _fail(f"target_modules: regex {_short(pattern)} matches no module of the base model")
    return pattern


def _read_config(folder: Path, root: Path) -> dict[str, Any]:
    path = file_inside(root, folder, CONFIG)
    if not path.is_file():
        raise _fail(f"{CONFIG}: missing in {folder.name}/ (not a PEFT adapter folder)")
    try:
        config = read_json_limited(path, CONFIG)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if not isinstance(config, dict):
        raise _fail(f"{CONFIG}: not a JSON object")
    if (where := nonfinite_path(config)) is not None:
        raise _fail(f"{CONFIG}: {where}: is not a finite number")
    return config


def validate(
    folder: Path,
    root: Path,
    base: BaseModules,
    *,
    base_fingerprint: str,
    max_rank: int,
    methods: tuple[str, ...],
    values: bool = False,
    content_sha256: str = "",
    served_model: str = "",
    model_of: Callable[[str], str | None] | None = None,
) -> Validated:
    """All checks, cheapest first; raise on the first failure. `values`: also read every weight (NaN/inf)
    and take the content hash (done on the snapshot the engine reads, not in the shared root).
    `content_sha256`: the folder's content hash when the caller already has it (the snapshot is hashed
    as it is copied, see snapshot.py): it is not read again for it. `served_model` / `model_of` (fingerprint
    -> a hosted model's name): a server hosting several models names both in a wrong-base refusal."""
    try:
        return _validate(
            folder,
            root,
            base,
            base_fingerprint,
            max_rank,
            methods,
            values,
            content_sha256,
            served_model,
            model_of,
        )
    except EffllmError:
        raise
    except Exception as exc:  # a case no check foresaw: still the adapter's fault, never UNKNOWN
        log.exception("unforeseen failure validating %s", folder)
        raise _fail(f"adapter: {folder.name}/ could not be validated ({type(exc).__name__})") from exc


def _validate(
    folder: Path,
    root: Path,
    base: BaseModules,
    base_fingerprint: str,
    max_rank: int,
    methods: tuple[str, ...],
    values: bool,
    known_digest: str,
    served_model: str = "",
    model_of: Callable[[str], str | None] | None = None,
) -> Validated:
    config = _read_config(folder, root)
    weights = file_inside(root, folder, WEIGHTS)
    if not weights.is_file():
        alt = (
            " (only adapter_model.bin: convert it to safetensors)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise _fail(f"{WEIGHTS}: missing in {folder.name}/{alt}")
    try:
        manifest = read_manifest(folder, root)
    except ValueError as exc:
        message = str(exc)
        raise _fail(message if message.startswith(MANIFEST) else f"{MANIFEST}: {message}") from exc

    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise _fail(
            f"{CONFIG}: peft_type {_short(peft_type)} is not LORA (only LoRA-family adapters are served)"
        )
    method = _method(config)
    if manifest and manifest.method and manifest.method != method:
        raise _fail(
            f"{MANIFEST}: method {manifest.method!r} disagrees with {CONFIG}, which describes {method!r}"
        )
    if method not in methods:
        offered = ", ".join(methods) or "none (the server runs without adapters)"
        raise _fail(f"method: {method} adapters are not supported by this engine (it serves: {offered})")
    if manifest and manifest.base_fingerprint and manifest.base_fingerprint != base_fingerprint:
        owner = model_of(manifest.base_fingerprint) if model_of is not None else None
        if owner is not None:
            raise _fail(
                f"model: adapter {folder.parent.name}/{folder.name}/ belongs to model {owner} (its "
                f"{MANIFEST} base_fingerprint {manifest.base_fingerprint[:12]}…), not to model "
                f"{served_model} ({base_fingerprint[:12]}…); load it with model={owner}"
            )
        raise _fail(
            f"{MANIFEST}: base_fingerprint {manifest.base_fingerprint[:12]}… was trained on another base "
            f"model than the one served ({base_fingerprint[:12]}…)"
        )
    if "r" not in config:
        raise _fail(f"{CONFIG}: r: missing (the LoRA rank)")
    rank = _rank(config["r"], "r", max_rank)
    alpha = _alpha(config.get("lora_alpha", rank), "lora_alpha")
    for pattern, r in _pattern_map(config, "rank_pattern").items():
        _rank(r, f"rank_pattern[{_short(pattern)}]", max_rank)
    for pattern, a in _pattern_map(config, "alpha_pattern").items():
        _alpha(a, f"alpha_pattern[{_short(pattern)}]")
    bias = config.get("bias", "none")
    if not isinstance(bias, str):
        raise _fail(f"{CONFIG}: bias: {_short(bias)} is not a string")
    targets = _targets(config, base)

    header = read_safetensors_header(weights)
    _check_shapes(header, base, max_rank)
    nbytes = weights.stat().st_size
    digest = ""
    if values:
        check_weight_values(weights, header)
        digest = known_digest or content_hash(folder, root)
        if manifest and manifest.content_sha256 and manifest.content_sha256 != digest:
            raise _fail(
                f"{MANIFEST}: content_sha256 {manifest.content_sha256[:12]}… does not match the adapter's "
                f"files ({digest[:12]}…): changed after it was published"
            )
    return Validated(method, rank, alpha, targets, manifest, nbytes, digest)


def _check_shapes(header: dict[str, Any], base: BaseModules, max_rank: int) -> None:
    if not header:
        raise _fail(f"{WEIGHTS}: holds no tensors")
    for key, meta in header.items():
        key = str(key)
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        shape = tuple(meta["shape"])
        if m := _DORA_KEY.match(name):
            module = m["module"]
            if module not in base.shapes:
                raise _fail(f"{WEIGHTS}: {key!r} adapts {module!r}, which the base model does not have")
            if shape[-1:] != base.shapes[module][:1]:
                raise _fail(
                    f"{WEIGHTS}: {key!r} has shape {list(shape)}, "
                    f"base {module} is {list(base.shapes[module])}"
                )
            continue
        m = _LORA_KEY.match(name)
        if m is None:
            raise _fail(
                f"{WEIGHTS}: tensor {key!r} is not a LoRA A/B weight "
                "(modules_to_save or biases are not served)"
            )
        module, kind = m["module"], m["kind"]
        if module not in base.shapes:
            raise _fail(f"{WEIGHTS}: {key!r} adapts {module!r}, which the base model does not have")
        bshape = base.shapes[module]
        if len(shape) != 2 or len(bshape) != 2:
            raise _fail(f"{WEIGHTS}: {key!r} has shape {list(shape)}; LoRA weights are matrices")
        # Linear weight is [out, in]: A [r, in], B [out, r].
        # Embedding weight is [num, dim]: A [r, num], B [dim, r].
        out_dim, in_dim = (bshape[1], bshape[0]) if kind.startswith("lora_embedding") else bshape
        r = shape[0] if kind.endswith("A") else shape[1]
        want = (r, in_dim) if kind.endswith("A") else (out_dim, r)
        if shape != want:
            raise _fail(
                f"{WEIGHTS}: {key!r} has shape {list(shape)} "
                f"but base {module} {list(bshape)} needs {list(want)}"
            )
        if not 1 <= r <= max_rank:
            raise _fail(f"rank: {_short(key)} has rank {r}, outside this server's 1..{max_rank}")
