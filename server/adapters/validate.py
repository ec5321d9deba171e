"""Check an adapter folder against the served base model before anything changes. No torch.

Reads only adapter_config.json, manifest.json and safetensors headers (plus file sizes), so a check costs
milliseconds. Invariant: `validate` either returns a `Validated` that an engine can load, or raises an
EffllmError — `failed_precondition` when the thing on disk does not fit this server, with the reason.
Base module names and shapes come from the base checkpoint's safetensors headers (`BaseModules`).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...common.adapter_paths import file_inside
from ...common.manifest import Manifest, read_manifest
from ..engines.base import AdapterMethod, EffllmError

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
_MAX_HEADER = 100 << 20
# module.lora_A.weight -> (module, kind); DoRA's magnitude vector has no ".weight" suffix.
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$"
)
_DORA_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(\.weight)?$")


def _fail(message: str) -> EffllmError:
    return EffllmError("failed_precondition", message)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file, after checking that the file holds all of its data."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise _fail(f"{path.name}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise _fail(
                f"{path.name}: header claims {n} bytes but the file has {size} (truncated or not safetensors)"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _fail(f"{path.name}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _fail(f"{path.name}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    end_max = 0
    for key, meta in header.items():
        try:
            dtype, shape, (start, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            count = 1
            for dim in shape:
                count *= int(dim)
            nbytes = count * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(f"{path.name}: tensor {key!r} has a malformed entry ({exc})") from exc
        if not 0 <= start <= end or end - start != nbytes:
            raise _fail(f"{path.name}: tensor {key!r} offsets {start}..{end} do not hold {shape} {dtype}")
        end_max = max(end_max, end)
    if end_max != data_len:
        raise _fail(
            f"{path.name}: tensors need {end_max} data bytes but the file holds {data_len} "
            f"({'truncated' if data_len < end_max else 'trailing bytes'})"
        )
    return header


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


def _method(config: dict[str, Any]) -> AdapterMethod:
    if config.get("use_dora"):
        return "dora"
    return "rslora" if config.get("use_rslora") else "lora"


def _read_config(folder: Path, root: Path) -> dict[str, Any]:
    path = file_inside(root, folder, CONFIG)
    if not path.is_file():
        raise _fail(f"{CONFIG}: missing in {folder.name}/ (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"{CONFIG}: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise _fail(f"{CONFIG}: not a JSON object")
    return config


def validate(
    folder: Path,
    root: Path,
    base: BaseModules,
    *,
    base_fingerprint: str,
    max_rank: int,
    methods: tuple[str, ...],
) -> Validated:
    """All checks, cheapest first; raise on the first failure."""
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
        manifest = read_manifest(folder)
    except ValueError as exc:
        raise _fail(f"manifest.json: {exc}") from exc

    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise _fail(
            f"{CONFIG}: peft_type {config.get('peft_type')!r} is not LORA "
            "(only LoRA-family adapters are served)"
        )
    method = _method(config)
    if manifest and manifest.method and manifest.method != method:
        raise _fail(
            f"manifest.json: method {manifest.method!r} disagrees with {CONFIG}, which describes {method!r}"
        )
    if method not in methods:
        offered = ", ".join(methods) or "none (the server runs without adapters)"
        raise _fail(f"method: {method} adapters are not supported by this engine (it serves: {offered})")
    if manifest and manifest.base_fingerprint and manifest.base_fingerprint != base_fingerprint:
        raise _fail(
            f"manifest.json: base_fingerprint {manifest.base_fingerprint[:12]}… was trained on another base "
            f"model than the one served ({base_fingerprint[:12]}…)"
        )
    try:
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(f"{CONFIG}: r / lora_alpha missing or not numbers ({exc})") from exc
    ranks = [rank, *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    if rank < 1 or max(ranks) > max_rank:
        raise _fail(
            f"rank: {max(ranks)} is over this server's max adapter rank {max_rank}"
            if rank >= 1
            else f"rank: r={rank} must be >= 1"
        )

    targets_raw = config.get("target_modules") or []
    if isinstance(targets_raw, str):  # PEFT allows one regex over full module names
        pattern = re.compile(targets_raw)
        if not any(pattern.fullmatch(m) for m in base.shapes):
            raise _fail(f"target_modules: regex {targets_raw!r} matches no module of the base model")
        targets: tuple[str, ...] = (targets_raw,)
    else:
        targets = tuple(str(t) for t in targets_raw)
        missing = [t for t in targets if not base.matches(t)]
        if missing:
            raise _fail(
                f"target_modules: {missing} do not exist in the base model {base.architectures or ''}"
            )

    header = read_safetensors_header(weights)
    _check_shapes(header, base, max_rank)
    nbytes = weights.stat().st_size
    return Validated(method, rank, alpha, targets, manifest, nbytes)


def _check_shapes(header: dict[str, Any], base: BaseModules, max_rank: int) -> None:
    if not header:
        raise _fail(f"{WEIGHTS}: holds no tensors")
    for key, meta in header.items():
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
        if r > max_rank:
            raise _fail(f"rank: {key!r} has rank {r}, over this server's max adapter rank {max_rank}")
