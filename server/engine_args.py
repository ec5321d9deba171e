"""The engine factory: `EngineArgs` (typed engine configuration, THE source of the engine flags' defaults)
-> Engine, in the style of vLLM's `EngineArgs` + `from_cli_args`.

`EngineArgs.add_cli_args` generates the engine flags of `effllm serve` and `effllm calibrate` from the
fields (each field's default is its flag's default, its metadata the flag's help); `from_cli_args` reads
them back; `build_engine` / `build_engines` hold the engine-selection policy (`auto` precision, engine and
compiled decode from a stored calibration or the machine's rule, hf wherever vLLM cannot serve) and build
the engines without argparse, so tests and tools build them the way the server does.
Invariant: a flag generated here has its field's default (tests/server/test_engine_args.py pins it, and
that the engine configs' shared defaults, HfConfig / VllmConfig / ServerConfig, are the same numbers).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..common.architecture import require_support
from ..telemetry.machine import machine
from . import calibration
from .calibration import Choice
from .engines.base import PRECISIONS, Engine, Precision

if TYPE_CHECKING:
    from ..common.model import ResolvedModel

log = logging.getLogger("effllm.server")

ENGINES = ("auto", "vllm", "hf")
DEVICES = ("auto", "cpu", "cuda")


def _flag(text: str, group: str = "", **argparse_kwargs: Any) -> dict[str, Any]:
    """A field's flag: its help, its argument group ("" = the parser itself) and argparse's other kwargs
    (type, choices, action, flag name); the default is always the field's."""
    return {"help": text, "group": group, "argparse": argparse_kwargs}


@dataclass(frozen=True)
class EngineArgs:
    """What `effllm serve` needs to build its engines. "auto" and None mean "resolved at build time"."""

    model: str | None = field(
        default=None,
        metadata=_flag(
            "a catalogue name (effllm models list), a local HF dir (named by its folder's name), NAME=DIR "
            "or a hub id; repeatable: each is a base model of its own (own variants, adapters and queue), "
            "requests name it in `model`, the first serves those that name none; default: embedded "
            "SmolLM2-135M-Instruct",
            action="append",
            metavar="MODEL",
        ),
    )
    # the second and later --model (from_cli_args splits them off); the flag is hidden
    more_models: tuple[str, ...] = field(
        default=(),
        metadata=_flag("", action="append", help=argparse.SUPPRESS),
    )
    engine: str = field(
        default="auto",
        metadata=_flag(
            "auto: the stored `effllm calibrate` figures' best for this machine, else hf for bf16 on CPU "
            "and vllm otherwise; hf whenever the precision or an adapter method needs it "
            "(int4 on CPU, or dora in --adapter-methods); int4 on CUDA: vllm runs the checkpoint's AWQ/GPTQ "
            "weights or bitsandbytes in-flight, hf runs bitsandbytes NF4",
            choices=ENGINES,
        ),
    )
    adapter_methods: str = field(
        default="lora,rslora",
        metadata=_flag(
            "adapter methods this server must serve (comma list of lora, rslora, dora); "
            "dora is served by the hf engine only"
        ),
    )
    precision: str = field(
        default="auto",
        metadata=_flag(
            "auto: the stored `effllm calibrate` figures' best for this machine (int4 never), else bf16 "
            "on CUDA or a CPU with native bf16 (amx_bf16, avx512_bf16) and fp32 otherwise",
            choices=("auto", *PRECISIONS),
        ),
    )
    variants: tuple[str, ...] = field(
        default=(),
        metadata=_flag(
            "host this variant of the model (repeatable; ENGINE defaults to --engine): each is its own "
            "engine with its own batch, and the router picks one per request by its objective; none: one "
            "variant from --precision and --engine. MODEL=PRECISION[:ENGINE]: a variant of that --model "
            "(its name: the catalogue name, the folder's name or NAME); without MODEL=: the first model's",
            flag="--variant",
            action="append",
            metavar="[MODEL=]PRECISION[:ENGINE]",
        ),
    )
    device: str = field(default="auto", metadata=_flag("", choices=DEVICES))
    max_concurrency: int = field(
        default=32, metadata=_flag("requests decoded together (batch slots)", type=int)
    )
    model_max_concurrency: tuple[str, ...] = field(
        default=(),
        metadata=_flag(
            "with several --model: this model's --max-concurrency (repeatable), e.g. gemma3-270m=1 (the hf "
            "engine batches Gemma 3's sliding-window caches one row at a time) while the others batch",
            action="append",
            metavar="MODEL=N",
        ),
    )
    max_context: int = field(default=2048, metadata=_flag("prompt + new tokens", type=int))
    kv_cache_gib: float = field(
        default=1.0,
        metadata=_flag("vLLM CPU KV cache size (GiB), reserved up front by each vLLM variant", type=float),
    )
    tensor_parallel_size: int = field(
        default=1, metadata=_flag("vLLM: shard the model over this many GPUs of this host", type=int)
    )
    vllm_compile: bool = field(
        default=False,
        metadata=_flag(
            "vLLM: compiled mode (torch.compile; inductor on CPU) instead of enforce_eager; start-up "
            "pays the compile. vLLM turns it off itself on CPU when adapters are enabled",
            action="store_true",
        ),
    )
    compile_decode: bool | None = field(
        default=None,
        metadata=_flag(
            "hf engine: decode base and LoRA/rsLoRA rows on a static KV cache with one torch.compile'd "
            "step (batch buckets 1, 2, 4, ... up to --max-concurrency), compiled at start-up before SERVING "
            "(Inductor's caches persist under the effllm cache dir: a second start reuses the kernels); "
            "DoRA rows stay eager. Unset: on where a stored calibration says it wins with "
            "--engine/--precision auto, else off",
            action=argparse.BooleanOptionalAction,
        ),
    )
    compile_threads: int = field(
        default=1,
        metadata=_flag(
            "hf engine, --compile-decode: threads of each Inductor C++ kernel (1: multi-threaded "
            "kernels stall at OpenMP barriers when another process takes a core; 0: torch's thread count)",
            type=int,
        ),
    )
    stream_interval: int = field(
        default=1,
        metadata=_flag(
            "tokens a stream gathers per message after the first, which is sent alone at once: the server "
            "coalesces every engine's tokens (vLLM also gathers them in its engine); fewer messages cost "
            "less per token on every hop, a cluster front's above all",
            type=int,
        ),
    )
    cpu_omp_bind: str | None = field(
        default=None,
        metadata=_flag(
            "vLLM on CPU: OpenMP thread binding (VLLM_CPU_OMP_THREADS_BIND): nobind, auto (one pinned "
            "thread per core, one core kept for the scheduler and gRPC) or CPU lists like 0-3|4-7; "
            "default: the environment's, else nobind. Every vLLM variant's engine core binds the same CPUs"
        ),
    )
    seed: int = field(default=0, metadata=_flag("", type=int))
    adapter_root: Path | None = field(
        default=None,
        metadata=_flag("folder of NAME/VERSION/ PEFT adapters", group="adapters", type=Path),
    )
    max_adapters_per_batch: int = field(
        default=8, metadata=_flag("distinct adapters in one batch", group="adapters", type=int)
    )
    max_adapters_resident: int = field(
        default=16, metadata=_flag("loaded versions before LRU eviction", group="adapters", type=int)
    )
    max_adapter_rank: int = field(default=64, metadata=_flag("", group="adapters", type=int))

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is one of {', '.join(ENGINES)}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision {self.precision!r} is one of auto, {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is one of {', '.join(DEVICES)}")

    @property
    def methods(self) -> set[str]:
        """--adapter-methods as a set."""
        return {m.strip() for m in self.adapter_methods.split(",") if m.strip()}

    # --- argparse ---------------------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
        """Add one flag per field (its default the field's); returns the "adapters" argument group, which
        the server's registry flags join."""
        groups = {"": parser, "adapters": parser.add_argument_group("adapters")}
        for f in fields(EngineArgs):
            meta = f.metadata
            kwargs = dict(meta["argparse"])
            name = kwargs.pop("flag", "--" + f.name.replace("_", "-"))
            default = f.default
            if kwargs.get("action") == "append" and default is not None:
                default = list(cast(tuple[str, ...], default))  # argparse appends to a copy of it
            if meta["help"]:
                kwargs["help"] = meta["help"]
            groups[meta["group"]].add_argument(name, dest=f.name, default=default, **kwargs)
        return cast(argparse._ArgumentGroup, groups["adapters"])

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The fields from parsed flags (or a Namespace rebuilt from their JSON: lists, str paths)."""
        values: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(cls)}
        values["variants"] = tuple(values["variants"])
        values["model_max_concurrency"] = tuple(values["model_max_concurrency"])
        models = values["model"]
        if isinstance(models, list):  # --model is repeatable: the first is `model`, the rest `more_models`
            values["model"] = models[0] if models else None
            values["more_models"] = tuple(models[1:]) + tuple(values["more_models"])
        else:
            values["more_models"] = tuple(values["more_models"])
        if values["adapter_root"] is not None:
            values["adapter_root"] = Path(values["adapter_root"])
        return cls(**values)


# --- the policy ------------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def choose_engine(engine: str, precision: str, device: str, adapter_methods: str) -> str:
    """`auto` -> vllm, unless hf is needed: int4 on CPU (vLLM's CPU backend has no int4) or DoRA."""
    if engine != "auto":
        return engine
    methods = {m.strip() for m in adapter_methods.split(",") if m.strip()}
    return "hf" if (precision == "int4" and device == "cpu") or "dora" in methods else "vllm"


def parse_variants(specs: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """["bf16", "int4:hf"] -> [("bf16", ""), ("int4", "hf")] (engine "" = --engine); ValueError names the
    bad one."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        precision, _, engine = spec.strip().partition(":")
        if precision not in PRECISIONS:
            raise ValueError(f"--variant {spec!r}: precision is one of {', '.join(PRECISIONS)}")
        if engine not in ("", "auto", "vllm", "hf"):
            raise ValueError(f"--variant {spec!r}: engine is one of auto, vllm, hf")
        out.append((precision, "" if engine == "auto" else engine))
    return out


def model_name(spec: str | None) -> str:
    """The name requests use for a --model: NAME of NAME=DIR, a catalogue name itself, a folder's base
    name, a hub id itself; "" for the default (the server names it by its checkpoint)."""
    if not spec:
        return ""
    name, sep, _ = spec.partition("=")
    if sep and not Path(spec).expanduser().exists():
        return name
    path = Path(spec).expanduser()
    return path.resolve().name if path.is_dir() else spec


def model_source(spec: str | None) -> str | None:
    """What resolve_model gets for a --model: DIR of NAME=DIR, else the spec."""
    if spec and "=" in spec and not Path(spec).expanduser().exists():
        return spec.partition("=")[2]
    return spec


def models_with_variants(args: EngineArgs) -> list[tuple[str, EngineArgs]]:
    """One (name, EngineArgs) per --model, in order: each with `model` its source, `variants` its own
    (MODEL=PRECISION[:ENGINE] by name; a plain PRECISION[:ENGINE] is the first model's) and its
    --model-max-concurrency if given. ValueError for a variant or a concurrency naming no hosted model, or
    two models with one name."""
    specs = [args.model, *args.more_models]
    names = [model_name(s) for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--model: {', '.join(n or '(default)' for n in names)} names a model twice")
    own: dict[str, list[str]] = {n: [] for n in names}
    for v in args.variants:
        model, sep, variant = v.rpartition("=")
        key = model if sep else names[0]
        if key not in own:
            raise ValueError(f"--variant {v!r}: model {model!r} is not a --model ({', '.join(names)})")
        own[key].append(variant)
    slots = {n: args.max_concurrency for n in names}
    for spec in args.model_max_concurrency:
        model, _, n = spec.rpartition("=")
        if model not in slots:
            raise ValueError(
                f"--model-max-concurrency {spec!r}: {model!r} is not a --model ({', '.join(names)})"
            )
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--model-max-concurrency {spec!r}: N is a whole number >= 1")
        slots[model] = int(n)
    return [
        (
            n,
            replace(
                args,
                model=model_source(s),
                more_models=(),
                variants=tuple(own[n]),
                max_concurrency=slots[n],
                model_max_concurrency=(),
            ),
        )
        for n, s in zip(names, specs, strict=True)
    ]


def resolve_auto(args: EngineArgs, model: ResolvedModel, device: str) -> Choice:
    """What `--precision auto` / `--engine auto` / an unset `--compile-decode` become for this server: a
    stored calibration's best when one matches this machine, model and library versions exactly, else the
    machine's rule (server/calibration.py). The flags the user set stay fixed."""
    engine = args.engine if args.engine != "auto" else ("hf" if "dora" in args.methods else None)
    here = machine(device)
    cal = calibration.load(calibration.Key(here, model.fingerprint, calibration.library_versions()))
    return calibration.choose_auto(
        here,
        cal,
        precision=None if args.precision == "auto" else args.precision,
        engine=engine,
        compiled=args.compile_decode,
    )


# --- building ---------------------------------------------------------------------------------------------
def build_engines(args: EngineArgs) -> list[Engine]:
    """One engine per variant (none given: one from precision and engine); refuses duplicates."""
    specs = parse_variants(args.variants) if args.variants else [("", "")]
    engines = [build_engine(args, precision, engine) for precision, engine in specs]
    names = [f"{e.info.precision}:{e.info.engine}" for e in engines]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant: {', '.join(names)} names a variant twice")
    return engines


def build_engine(args: EngineArgs, precision_arg: str = "", engine_arg: str = "") -> Engine:
    """The engine `args` ask for (precision_arg / engine_arg: one variant's, "" = args'), not started."""
    from ..common.model import resolve_model
    from .engines.vllm_engine import VllmConfig, VllmEngine

    device = resolve_device(args.device)
    model = resolve_model(args.model)
    wanted = precision_arg or args.precision
    compile_decode = bool(args.compile_decode)
    if not precision_arg and "auto" in (args.precision, args.engine):  # one variant from the flags
        choice = resolve_auto(args, model, device)
        log.info("auto: %s", choice.reason)
        wanted, engine_arg, compile_decode = choice.precision, choice.engine, choice.compile_decode
    precision = cast(Precision, wanted)
    chosen = choose_engine(engine_arg or args.engine, precision, device, args.adapter_methods)
    # an architecture this engine cannot run is refused here, before it loads, not in traffic
    require_support(chosen, model.path, precision=precision, max_concurrency=args.max_concurrency)
    if chosen == "hf":
        from .engines.hf_engine import HfConfig, HfEngine

        return HfEngine(
            model,
            HfConfig(
                precision=precision,
                max_context=args.max_context,
                max_concurrency=args.max_concurrency,
                device=device,
                seed=args.seed,
                compile_decode=compile_decode,
                compile_threads=args.compile_threads,
                max_adapter_rank=args.max_adapter_rank,
                max_adapters_per_batch=args.max_adapters_per_batch,
                max_adapters_resident=args.max_adapters_resident,
            ),
        )
    config = VllmConfig(
        precision=precision,
        max_context=args.max_context,
        max_concurrency=args.max_concurrency,
        kv_cache_gib=args.kv_cache_gib,
        device=device,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=not args.vllm_compile,
        stream_interval=args.stream_interval,
        cpu_omp_bind=args.cpu_omp_bind,
    )
    if args.adapter_root is not None:  # vLLM reserves its LoRA slots up front
        config = replace(
            config,
            enable_lora=True,
            max_lora_rank=args.max_adapter_rank,
            max_loras=args.max_adapters_per_batch,
            max_cpu_loras=max(args.max_adapters_resident, args.max_adapters_per_batch),
        )
    return VllmEngine(model, config)
