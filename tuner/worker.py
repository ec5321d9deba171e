"""One tuning job end to end: train, save atomically, optionally publish + LoadAdapter. Also a process entry.

`execute` is what `effllm tune` runs in-process. `python -m effllm.tuner.worker SPEC_JSON` runs the same in a
child process for the TuningService: it prints one event per line on stdout (events.py: progress, phases,
the staging dir while saving, the final result or the error). On SIGTERM it stops where the run next polls
(every ~1,000 examples generated, 256 encoded, after the model loads, each micro-batch), removing anything
it had started to write; where a phase does not poll (a model load, a save, a compile) the JobManager
SIGKILLs it after a short grace and removes the staging dir it announced.
Invariant: the last stdout line of a worker is a DoneEvent, CancelledEvent or ErrorEvent.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import events
from .config import ConfigError, TuneConfig, default_output_dir
from .events import Cancelled, CancelledEvent, DoneEvent, ErrorEvent, Event, PhaseEvent, StagingEvent

if TYPE_CHECKING:
    from effllm.client.channel import ClientSecurity


@dataclass(frozen=True)
class PublishTarget:
    server: str  # host:port of a running `effllm serve`
    name: str
    adapter_root: str
    # TLS to that server (PEM paths; a CA means TLS); the token comes from $EFFLLM_AUTH_TOKEN, never argv
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        from .publish import check_name

        check_name(self.name)
        if not self.server:
            raise ConfigError("publish: needs the server address host:port")
        if not self.adapter_root:
            raise ConfigError("adapter_root: needed to publish (flag --adapter-root or EFFLLM_ADAPTER_ROOT)")

    def security(self) -> ClientSecurity:
        from effllm.client.channel import ClientSecurity

        return ClientSecurity.from_files(
            root_cert=Path(self.tls_ca) if self.tls_ca else None,
            client_cert=Path(self.tls_cert) if self.tls_cert else None,
            client_key=Path(self.tls_key) if self.tls_key else None,
        )


def execute(
    config: TuneConfig,
    *,
    publish: PublishTarget | None = None,
    emit: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress_bar: bool = True,
) -> DoneEvent:
    """Returns the DoneEvent: output dir, published version, metrics."""
    from . import export, train

    sink = emit or (lambda e: None)
    if publish is not None and not config.is_lora_family:
        raise ConfigError(
            f"publish: the server serves LoRA-family adapters; method {config.method} makes a full checkpoint"
        )
    output = Path(config.output_dir or default_output_dir(config))
    export.check_output_dir(output)
    result = train.run(
        config.replace(output_dir=str(output)),
        on_event=sink,
        should_stop=should_stop,
        progress_bar=progress_bar,
    )
    if should_stop is not None and should_stop():
        raise Cancelled()
    sink(PhaseEvent("saving"))
    saved = export.save(result, output, on_staging=lambda p: sink(StagingEvent(str(p))))
    done = DoneEvent(output_dir=str(saved), metrics=_brief(result.metrics))
    if publish is not None:
        from .publish import load_on_server
        from .publish import publish as publish_dir

        sink(PhaseEvent("publishing"))
        version = publish_dir(saved, Path(publish.adapter_root), publish.name)
        info = load_on_server(publish.server, publish.name, version, security=publish.security())
        done = dataclasses.replace(
            done,
            published=f"{publish.name}@{version}",
            adapter_root=publish.adapter_root,
            residency=info.residency,
        )
    return done


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "method",
        "params",
        "step_latency_s",
        "samples_per_s",
        "tokens_per_s",
        "tokens_per_s_steady",
        "first_step_s",
        "step_breakdown_s",
        "padding_waste",
        "autocast",
        "speedups",
        "samples_per_param_s",
        "memory",
        "pcu",
        "energy",
        "eval_before",
        "eval_after",
        "train_time_s",
    )
    out = {k: metrics[k] for k in keep if k in metrics}
    out["train_loss_first"] = metrics["train_loss"][0] if metrics["train_loss"] else None
    out["train_loss_last"] = metrics["train_loss"][-1] if metrics["train_loss"] else None
    return out


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def emit(event: Event) -> None:
        print(events.to_json(event), flush=True)

    try:
        config = TuneConfig.from_dict(spec["config"])
        target = PublishTarget(**spec["publish"]) if spec.get("publish") else None
        emit(execute(config, publish=target, emit=emit, should_stop=stop.is_set, progress_bar=False))
        return 0
    except Exception as exc:
        if isinstance(exc, Cancelled) or stop.is_set():
            emit(CancelledEvent())
            return 3
        emit(ErrorEvent(f"{type(exc).__name__}: {exc}"))
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
