"""What a Locust process needs to know about a campaign, passed as a JSON file (env EFFLLM_LOAD_CONFIG).

Pure (no locust, no grpc): the campaign runner writes it, the locustfile (loadtest/user.py) reads it, in
every process of a distributed run alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .workload import Workload

ENV = "EFFLLM_LOAD_CONFIG"


@dataclass(frozen=True)
class LoadConfig:
    targets: tuple[str, ...] = ("127.0.0.1:50051",)
    workload: Workload = field(default_factory=Workload)
    duration_s: float = 30.0  # no new request after this; in-flight ones finish (bounded by timeout_s)
    timeout_s: float = 120.0  # gRPC deadline per request
    run_dir: str = "runs/load"  # per-request rows land here as requests-*.jsonl
    stream: bool = True  # GenerateStream (TTFT, inter-token latency) or unary Generate (E2E only)
    processes: int = 1  # Locust processes (workers) sharing an open-loop rate

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: at least one server address is needed")
        if self.duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError("duration_s and timeout_s must be > 0")
        if self.processes < 1:
            raise ValueError("processes must be >= 1")
        object.__setattr__(self, "targets", tuple(self.targets))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadConfig:
        d = dict(d)
        d["workload"] = Workload.from_dict(d.get("workload", {}))
        d["targets"] = tuple(d.get("targets", ()))
        return cls(**d)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_env(cls) -> LoadConfig:
        path = os.environ.get(ENV)
        if not path:
            raise RuntimeError(
                f"{ENV} is not set: run through `effllm load`, or point it at a LoadConfig JSON"
            )
        return cls.from_dict(json.loads(Path(path).read_text()))
