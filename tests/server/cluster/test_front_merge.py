"""The front's merge of every replica's GetTelemetry (server/cluster/front.py merge_telemetry), without a
cluster: replies in, one Telemetry out, each replica's own kept."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="the ray extra (scripts/setup.sh installs it)")

from effllm.api.v1 import generation_pb2 as pb
from effllm.server.cluster.front import merge_telemetry


def _replica(start: float, end: float, tokens: int, joules: float, watts: float) -> pb.Telemetry:
    t = pb.Telemetry(model="m", precision="fp32", engine="hf", enabled=True)
    t.start_unix_s, t.end_unix_s = start, end
    t.requests.add(request_id=f"r{start}", adapter="a@1", output_tokens=tokens)
    t.groups.add(adapter="a@1", precision="fp32", requests=1, output_tokens=tokens, energy_j=joules,
                 energy_source="estimated", amu=0.5)  # fmt: skip
    t.groups.add(adapter="ALL", precision="fp32", requests=1, errors=1, output_tokens=tokens)
    t.resources.CopyFrom(pb.ResourceSummary(samples=10, window_s=end - start, amu=0.2, amu_bytes=100,
                                            peak_memory_bytes=200, pcu=0.4, aec_w=watts, energy_j=joules,
                                            energy_source="estimated", device="cpu"))  # fmt: skip
    return t


def test_replicas_telemetry_merges_sums_and_keeps_each() -> None:
    r1, r2 = _replica(10.0, 40.0, 10, 1.0, 15.0), _replica(20.0, 50.0, 30, 3.0, 5.0)
    merged = merge_telemetry({"r2": r2, "r1": r1})
    assert merged.enabled and (merged.start_unix_s, merged.end_unix_s) == (10.0, 50.0)
    assert set(merged.replicas) == {"r1", "r2"} and merged.replicas["r2"].groups[0].output_tokens == 30
    assert len(merged.requests) == 2
    groups = {g.adapter: g for g in merged.groups}
    a = groups["a@1"]
    assert (a.requests, a.output_tokens, a.energy_j) == (2, 40, 4.0)
    assert a.j_per_token == pytest.approx(0.1) and a.energy_source == "estimated"
    assert not a.HasField("amu")  # a per-replica utilisation does not add up: it stays in `replicas`
    assert (groups["ALL"].requests, groups["ALL"].errors, groups["ALL"].HasField("energy_j")) == (2, 2, False)
    r = merged.resources
    assert (r.samples, r.energy_j, r.aec_w, r.amu_bytes, r.peak_memory_bytes) == (20, 4.0, 20.0, 200, 400)
    assert r.pcu == pytest.approx(0.4) and r.window_s == 30.0


def test_telemetry_off_on_every_replica_stays_off() -> None:
    off = pb.Telemetry(model="m", precision="fp32", engine="hf", enabled=False)
    merged = merge_telemetry({"r1": off, "r2": off})
    assert not merged.enabled and not merged.HasField("resources") and len(merged.replicas) == 2
