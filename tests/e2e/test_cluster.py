"""`effllm serve --replicas 2` on one local Ray cluster for the whole module: two replicas of the hf engine
on the real default model behind our front. Adapter affinity and a burst on a new adapter (loaded on one
replica), spill under overload, cluster-wide LoadAdapter/PinAdapter, a replica killed mid-traffic (requests
that produced nothing are retried and succeed; Ray's replacement loads the pinned set first), cancel frees
the replica's slot, and SIGTERM drains the whole cluster and leaves no Ray process behind."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from effllm.api.v1 import adapters_pb2 as apb
from effllm.api.v1 import adapters_pb2_grpc as apb_grpc
from effllm.api.v1 import generation_pb2 as pb
from effllm.api.v1 import generation_pb2_grpc as pb_grpc

from ..adapterroot import AdapterRoot
from ..serverproc import ServerProcess, start_server

pytest.importorskip(
    "ray.serve", reason="the ray extra (pip install -e '.[ray]'; scripts/setup.sh installs it)"
)
SLOTS = 2


@dataclass
class Front:
    server: ServerProcess
    channel: grpc.Channel
    gen: pb_grpc.GenerationServiceStub
    adapters: apb_grpc.AdapterServiceStub
    ray_pids: set[int]

    def generate(
        self, adapter: str = "", request_id: str = "", tokens: int = 4
    ) -> tuple[pb.GenerateResponse, str]:
        req = pb.GenerateRequest(
            prompt="Name a colour.",
            adapter=adapter,
            request_id=request_id,
            sampling=pb.SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True),
        )
        reply, call = self.gen.Generate.with_call(req, timeout=240)
        replica = dict(call.trailing_metadata())["effllm-replica"]
        assert reply.replica == replica  # named in the reply as in the trailing metadata
        return reply, replica

    def residency(self) -> dict[str, set[str]]:
        """NAME@VERSION -> replicas holding it."""
        listed = self.adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=60)
        return {f"{a.name}@{a.version}": {r.replica for r in a.replicas} for a in listed.adapters}

    def replicas(self) -> dict[str, pb.ServerStats]:
        return dict(self.gen.GetStats(pb.GetStatsRequest(), timeout=60).replicas)


@pytest.fixture(scope="module")
def front(
    logs_dir: Path, adapter_root: AdapterRoot, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Front]:
    once = tmp_path_factory.mktemp("failpoint") / "exited"
    server = start_server(
        "--replicas", "2", "--engine", "hf", "--precision", "fp32", "--max-concurrency", str(SLOTS),
        "--queue-size", "8", "--max-context", "256", "--adapter-root", str(adapter_root.root),
        "--ray-cpus", "2", "--replica-cpus", "0.5", "--no-telemetry", "--grace", "60",
        log_dir=logs_dir,
        ready_timeout=420,
        env={"EFFLLM_FAILPOINTS": f"engine_delay_prefix=slow-,engine_delay_s=3600,process_exit_prefix=die-,"
             f"process_exit_once={once}"},
    )  # fmt: skip
    channel = grpc.insecure_channel(server.target)
    ray_pids = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
    try:
        yield Front(
            server,
            channel,
            pb_grpc.GenerationServiceStub(channel),
            apb_grpc.AdapterServiceStub(channel),
            ray_pids,
        )
    finally:
        channel.close()
        server.stop(timeout=120)
        _wait_gone(ray_pids, 60)


def _wait_gone(pids: set[int], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        if not alive or time.monotonic() > deadline:
            for pid in alive:  # never leave Ray behind, even when the test fails
                psutil.Process(pid).kill()
            return [psutil.Process(p).name() for p in alive if psutil.pid_exists(p)]
        time.sleep(0.5)


def test_the_front_serves_health_and_our_status_table(front: Front) -> None:
    reply, replica = front.generate()
    assert reply.usage.output_tokens == 4 and replica in front.replicas()
    assert len(front.replicas()) == 2
    with pytest.raises(grpc.RpcError) as bad:
        front.gen.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=2.0)), timeout=60)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.top_p" in bad.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        front.generate(adapter="nosuch")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "Traceback" not in missing.value.details()
    telemetry = front.gen.GetTelemetry(pb.GetTelemetryRequest(), timeout=60)  # merged, each replica's kept
    assert set(telemetry.replicas) == set(front.replicas()) and not telemetry.enabled  # --no-telemetry


def test_a_burst_on_a_new_adapter_loads_it_on_one_replica_and_then_sticks_to_it(front: Front) -> None:
    before = front.gen.GetStats(pb.GetStatsRequest(), timeout=60)
    with ThreadPoolExecutor(3) as pool:  # one round of slots and one more: below the spill point
        served = list(pool.map(lambda _: front.generate("f1")[1], range(3)))
    assert len(set(served)) == 1, served
    assert front.residency()["f1@1"] == set(served)
    for _ in range(2):  # paced requests: affinity holds
        assert front.generate("f1")[1] == served[0]
    after = front.gen.GetStats(pb.GetStatsRequest(), timeout=60)
    # the burst waited for one load on one replica (cold), the paced ones found it there (warm)
    assert after.adapter_loads_on_demand - before.adapter_loads_on_demand == 1
    assert after.adapter_requests_cold - before.adapter_requests_cold == 3
    assert after.adapter_requests_warm - before.adapter_requests_warm == 2
    assert after.replicas[served[0]].adapter_requests_warm >= 2


def test_overload_spills_to_the_other_replica_which_loads_the_adapter(front: Front) -> None:
    with ThreadPoolExecutor(8) as pool:
        served = Counter(pool.map(lambda _: front.generate("f2", tokens=24)[1], range(8)))
    assert len(served) == 2, served  # the first replica had two rounds of its slots in work
    assert front.residency()["f2@1"] == set(served)


def test_cancel_frees_the_replicas_slot(front: Front) -> None:
    stub = pb_grpc.GenerationServiceStub(front.channel)
    call = stub.GenerateStream(pb.GenerateRequest(prompt="hi", request_id="slow-cancel"), timeout=240)
    deadline = time.monotonic() + 60
    while sum(s.running for s in front.replicas().values()) < 1:
        assert time.monotonic() < deadline, "the stalled request never took a slot"
        time.sleep(0.2)
    call.cancel()
    deadline = time.monotonic() + 60
    while sum(s.running + s.queued for s in front.replicas().values()) > 0:
        assert time.monotonic() < deadline, f"slot still held after cancel: {front.replicas()}"
        time.sleep(0.2)
    assert sum(s.requests_cancelled for s in front.replicas().values()) >= 1


def test_admin_calls_are_cluster_wide_and_a_replacement_replica_loads_the_set(front: Front) -> None:
    loaded = front.adapters.LoadAdapter(apb.LoadAdapterRequest(name="demo", version="1"), timeout=120)
    before = set(front.replicas())
    assert {r.replica for r in loaded.replicas} == before
    pinned = front.adapters.PinAdapter(
        apb.PinAdapterRequest(name="demo", version="1", pinned=True), timeout=60
    )
    assert pinned.pinned and len(pinned.replicas) == 2
    # A replica dies mid-traffic: a stream on adapter f3 is producing tokens on it when a die- request for
    # f3 (so routed to the same replica) kills its process. The stream fails UNAVAILABLE; every request that
    # had produced nothing, the die- one included, is retried on the other replica and succeeds.
    stream = front.gen.GenerateStream(
        pb.GenerateRequest(
            prompt="Count.", adapter="f3", sampling=pb.SamplingParams(max_new_tokens=200, ignore_eos=True)
        ),
        timeout=300,
    )
    assert next(stream).token_ids  # producing
    with ThreadPoolExecutor(5) as pool:
        # the die- request first, while f3's holder has only the stream in flight (below the spill point,
        # so it lands there whatever the demo requests do); then traffic while that replica dies
        die = pool.submit(front.generate, "f3", "die-now", 4)
        time.sleep(0.2)
        work = [pool.submit(front.generate, "demo@1", "", 8) for _ in range(4)]
        results = [w.result(timeout=300) for w in [die, *work]]
    assert all(reply.usage.output_tokens >= 1 for reply, _ in results)
    with pytest.raises(grpc.RpcError) as cut:
        list(stream)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE and "mid-stream" in cut.value.details()
    # Ray replaces it; the replacement loads the pinned set before it takes traffic
    deadline = time.monotonic() + 240
    while True:
        now = set(front.replicas())
        if len(now) == 2 and now != before:
            break
        assert time.monotonic() < deadline, f"no replacement replica: {now}"
        time.sleep(1.0)
    listed = {
        f"{a.name}@{a.version}": a for a in front.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters
    }
    assert {r.replica for r in listed["demo@1"].replicas} == now and listed["demo@1"].pinned


def test_sigterm_drains_the_whole_cluster_and_stops_every_ray_process(front: Front) -> None:
    """Last in the module: it stops the front."""
    stub = pb_grpc.GenerationServiceStub(front.channel)
    stream = stub.GenerateStream(
        pb.GenerateRequest(prompt="Count.", sampling=pb.SamplingParams(max_new_tokens=24, ignore_eos=True)),
        timeout=240,
    )
    first = next(stream)  # in flight when the signal comes
    front.server.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    with pytest.raises(grpc.RpcError) as refused:
        front.generate()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(stream)
    assert rest[-1].final.usage.output_tokens == 24 and first.text is not None
    assert front.server.proc.wait(180) == 0
    assert _wait_gone(front.ray_pids, 60) == []
