"""The locustfile: Locust users that speak gRPC to effllm servers (requests and calls: loadtest/wire.py).

Only ever imported by a Locust process: importing locust monkey-patches the stdlib with gevent, and grpc's
gevent support is initialised here, before any channel exists. Absolute imports only: Locust loads this
file by path. Two ways in:
  * standalone, as any Locust user starts: `locust -f loadtest/user.py --host HOST:PORT [--headless -u N
    -t 30s] [--effllm-rate 2 --effllm-adapters a,b ...]`: the workload comes from the `--effllm-*` custom
    arguments (loadtest/options.py; also in the web UI's start form, read again at each start) and the
    user class is `EffllmUser` (closed loop, or open loop with --effllm-rate > 0);
  * `effllm load`, which passes a whole LoadConfig in EFFLLM_LOAD_CONFIG and names OpenLoopUser or
    ClosedLoopUser (with a LoadTestShape when the workload has a shape).

Per request it fires Locust request events (request_type "grpc") with separate names so Locust's stats,
CSV and web UI show each: `ttft`, `tpot` (= (E2E − TTFT)/(n − 1), only when n > 1), `itl` (one per output
token after the first), `e2e`; response_length is the output token count. A failed request fires `e2e`
with an exception naming the gRPC status code. Each request also leaves one row in
RUN_DIR/requests-<pid>.jsonl (the report's per-request source: timings, its objective, the variant that
served it, budget_met and usage.energy_joules from the final message) and carries W3C trace context in its
metadata (effllm's client tracing), so the server's `generate` span shares this request's trace id.

Users: `OpenLoopUser` (one per process; arrivals at the workload's rate split over processes, each request
in its own greenlet, so slow replies never slow arrivals) and `ClosedLoopUser` (send, wait for the reply,
think, repeat). Both stop sending after `duration_s` and let in-flight requests finish.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import gevent
import gevent.pool
from grpc.experimental import gevent as grpc_gevent
from locust import LoadTestShape, User, constant, events, task
from locust.exception import StopUser
from locust.runners import LocalRunner, MasterRunner, WorkerRunner
from locust.user.task import LOCUST_STATE_STOPPING

grpc_gevent.init_gevent()  # before any channel: grpc's C core must cooperate with gevent's loop

import grpc  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

from effllm.client import EffllmClient  # noqa: E402
from effllm.client.tracing import configured_tracer  # noqa: E402
from effllm.loadtest.config import ENV, LoadConfig  # noqa: E402
from effllm.loadtest.options import add_options, config_from_options  # noqa: E402
from effllm.loadtest.wire import Caller, generate_request, reply_fields  # noqa: E402
from effllm.loadtest.workload import RequestSpec, RequestStream  # noqa: E402

# EFFLLM_LOAD_CONFIG set: `effllm load` runs us with a whole config; else the --effllm-* options do.
FROM_ENV = bool(os.environ.get(ENV))
_CONFIG: list[LoadConfig] = [LoadConfig.from_env()] if FROM_ENV else []


def config() -> LoadConfig:
    """The campaign's config: from EFFLLM_LOAD_CONFIG, or built from the options at test start."""
    if not _CONFIG:
        raise RuntimeError(f"no effllm load config yet: set {ENV} or start the test through Locust")
    return _CONFIG[-1]


@events.init_command_line_parser.add_listener
def _add_options(parser: Any, **_: Any) -> None:
    add_options(parser)


@events.test_start.add_listener
def _configure(environment: Any, **_: Any) -> None:
    """Standalone: (re)build the config from the options at each start (the web UI may change them)."""
    if FROM_ENV:
        return
    opts = environment.parsed_options
    runner = environment.runner
    users = getattr(runner, "target_user_count", None) or getattr(opts, "num_users", None) or 1
    _CONFIG.append(config_from_options(opts, environment.host, users))
    del _CONFIG[:-1]
    _Process.finished = False
    _Process.start = None


# An SDK provider so client spans have real trace ids; effllm's client (given this provider) opens a CLIENT
# span per call under our request span and sends its W3C context. Spans are not exported (the join key is
# the trace id, kept in each request row).
_PROVIDER = TracerProvider()
_TRACER = _PROVIDER.get_tracer("effllm.loadtest")
_CLIENT_TRACER = configured_tracer(_PROVIDER)  # the CLIENT span per call, as EffllmClient opens it


class GrpcStatusError(Exception):
    """A failed request, named by its gRPC status code (so Locust groups failures by code)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code


class _Process:
    """Per-process state: clients per target, the request stream and the rows file."""

    start: float | None = None  # monotonic time the first user started (the campaign clock)
    clients: ClassVar[dict[str, EffllmClient]] = {}  # they own the channels
    callers: ClassVar[dict[str, Caller]] = {}
    rows: Any = None
    users = 0
    inflight = 0
    finished = False

    @classmethod
    def stream_id(cls, environment: Any) -> int:
        return int(getattr(environment.runner, "worker_index", 0) or 0) * 1000 + cls.users

    @classmethod
    def clock(cls) -> float:
        if cls.start is None:
            cls.start = time.monotonic()
        return time.monotonic() - cls.start

    @classmethod
    def caller(cls, target: str) -> Caller:
        if target not in cls.callers:
            client = EffllmClient(target, timeout=config().timeout_s)
            cls.clients[target] = client
            cls.callers[target] = Caller(client.channel, target, _CLIENT_TRACER, config().timeout_s)
        return cls.callers[target]

    @classmethod
    def write(cls, row: dict[str, Any]) -> None:
        if not config().run_dir:  # standalone without --effllm-run-dir: Locust's own stats only
            return
        if cls.rows is None:
            run_dir = Path(config().run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            # line-buffered: a row is on disk as soon as its request ends, whatever stops the process
            cls.rows = (run_dir / f"requests-{os.getpid()}.jsonl").open("a", buffering=1)
        cls.rows.write(json.dumps(row) + "\n")


@events.quitting.add_listener
def _close(**_: Any) -> None:
    if _Process.rows is not None:
        _Process.rows.close()
        _Process.rows = None


class _EffllmUser(User):
    abstract = True

    def on_start(self) -> None:
        self.stream_id = _Process.stream_id(self.environment)
        self.stream = RequestStream(config().workload, self.stream_id)
        _Process.users += 1
        _Process.clock()

    def _fire(
        self, name: str, seconds: float, tokens: int, exc: Exception | None = None, **context: Any
    ) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=seconds * 1000.0,
            response_length=tokens,
            exception=exc,
            context=context,
        )

    def send(self, spec: RequestSpec) -> None:
        """One request: stream it, measure it, fire its events, write its row."""
        _Process.inflight += 1
        try:
            self._send(spec)
        finally:
            _Process.inflight -= 1

    def _send(self, spec: RequestSpec) -> None:
        cfg = config()
        target = cfg.targets[spec.index % len(cfg.targets)]
        caller = _Process.caller(target)
        rid = uuid.uuid4().hex
        req = generate_request(spec, cfg.workload, rid)
        row: dict[str, Any] = {
            "rid": rid,
            "target": target,
            "adapter": spec.adapter,
            "stream": self.stream_id,
            "index": spec.index,  # (stream, index) names the same request in a replay of the same seed
            "objective": spec.objective or None,
            "model": spec.model or None,
            "t_start": time.time(),
            "t_campaign": _Process.clock(),
            "max_new_tokens": spec.max_new_tokens,
        }
        with _TRACER.start_as_current_span(f"locust request {spec.adapter or 'base'}") as span:
            row["trace_id"] = format(span.get_span_context().trace_id, "032x")
            start = time.perf_counter()
            ttft: float | None = None
            last = start
            itl: list[float] = []
            n = 0
            final: Any = None
            try:
                if cfg.stream:
                    for chunk in caller.stream(req):
                        now = time.perf_counter()
                        k = len(chunk.token_ids)
                        if k:
                            if ttft is None:
                                ttft = now - start
                                itl.extend([0.0] * (k - 1))  # tokens that came with the first one
                            else:  # a chunk of k tokens: the gap is shared by its tokens
                                itl.extend([(now - last) / k] * k)
                            last = now
                            n += k
                        if chunk.HasField("final"):
                            final = chunk.final
                else:
                    final = caller.generate(req)
                    ttft = None
            except grpc.RpcError as err:
                code = err.code().name if err.code() else "UNKNOWN"
                self._fail(row, start, code, err.details() or "", received=n)
                return
            except gevent.GreenletExit:  # Locust killed the user mid-request: the server sees a cancel
                # Standalone, the test's end (-t, the stop button) cuts requests short: not a failure of
                # the server, so no Locust event (the row still says so); `effllm load` counts it.
                self._fail(row, start, "CANCELLED", "stopped by locust", fire=FROM_ENV, received=n)
                raise
            e2e = time.perf_counter() - start
        if final is not None and final.usage.output_tokens:
            n = final.usage.output_tokens
        tpot = (e2e - ttft) / (n - 1) if ttft is not None and n > 1 else None
        if ttft is not None:
            self._fire("ttft", ttft, n)
        if tpot is not None:
            self._fire("tpot", tpot, n)
        for gap in itl:
            self._fire("itl", gap, 1)
        self._fire("e2e", e2e, n)
        row.update(
            status="OK", e2e_s=e2e, ttft_s=ttft, tpot_s=tpot, output_tokens=n, itl_s=itl, t_end=time.time()
        )
        if final is not None:  # timings, variant, budget_met, per-request energy (loadtest/wire.py)
            row.update(reply_fields(final))
        _Process.write(row)

    def open_loop(self, share: float) -> None:
        """Send arrivals at `share` of the workload's rate until its duration (or until Locust stops)."""
        cfg = config()
        pool = gevent.pool.Group()
        next_at: float | None = _Process.clock()
        while self._state != LOCUST_STATE_STOPPING:
            assert next_at is not None
            next_at = self.stream.next_arrival(next_at, share=share)
            if next_at is None or next_at >= cfg.duration_s:
                break
            # Sleep to the planned arrival time (not by the gap) so send() overheads never slow the rate.
            gevent.sleep(max(0.0, next_at - _Process.clock()))
            pool.spawn(self.send, self.stream.next())
        pool.join(timeout=cfg.timeout_s + 5)
        _done(self)

    def closed_loop_step(self) -> None:
        if _Process.clock() >= config().duration_s:
            _done(self)
            return
        self.send(self.stream.next())

    def _fail(
        self, row: dict[str, Any], start: float, code: str, details: str, fire: bool = True, received: int = 0
    ) -> None:
        """A failed request's row: `received` tokens had streamed in before it failed (0: it produced
        nothing, the kind a balancer may retry; its output_tokens stay 0, a failure has no output)."""
        e2e = time.perf_counter() - start
        if fire:
            self._fire("e2e", e2e, 0, GrpcStatusError(code, details))
        row.update(
            status=code,
            details=details[:300],
            e2e_s=e2e,
            output_tokens=0,
            received_tokens=received,
            t_end=time.time(),
        )
        _Process.write(row)


class OpenLoopUser(_EffllmUser):
    """Arrivals at the workload's rate (its shape, if any, over the campaign clock), split over processes."""

    abstract = not FROM_ENV
    wait_time = constant(0)

    @task
    def arrivals(self) -> None:
        self.open_loop(1.0 / config().processes)


class ClosedLoopUser(_EffllmUser):
    """Send, wait for the whole reply, think `think_s`, repeat (Locust's own model)."""

    abstract = not FROM_ENV

    def wait_time(self) -> float:
        return config().workload.think_s

    @task
    def one(self) -> None:
        self.closed_loop_step()


class EffllmUser(_EffllmUser):
    """Standalone Locust runs: closed loop (-u users, each one request at a time, --effllm-think apart),
    or open loop with --effllm-rate R > 0 (R req/s over all users, each sending its share)."""

    abstract = FROM_ENV

    def wait_time(self) -> float:
        return config().workload.think_s

    @task
    def request(self) -> None:
        if config().workload.mode == "open":
            users = getattr(self.environment.runner, "target_user_count", None) or 1
            self.open_loop(1.0 / max(1, int(users)))
        else:
            self.closed_loop_step()


def _done(user: User) -> None:
    """The campaign is over for this user. Once nothing is in flight in this process, a local run quits
    and a worker tells the master, which quits when every worker has said so (no idle tail to run-time)."""
    runner = user.environment.runner
    while _Process.inflight:
        gevent.sleep(0.05)
    if not _Process.finished:
        _Process.finished = True
        if isinstance(runner, WorkerRunner):
            # Stats first, on the same ordered channel: the master quits as soon as all workers are done.
            runner._send_stats()
            runner.send_message("effllm_done", {"worker": runner.worker_index})
        elif isinstance(runner, LocalRunner) and FROM_ENV:  # standalone: -t or the web UI ends the test
            gevent.spawn_later(1.5, runner.quit)  # > Locust's 1 s CSV interval: the CSV has all
    raise StopUser()  # this user is finished; Locust's quit then has nothing left to wait for


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        done: set[int] = set()

        def on_done(msg: Any, **__: Any) -> None:
            done.add(int(msg.data["worker"]))
            if len(done) >= max(1, int(environment.parsed_options.expect_workers)):
                gevent.spawn_later(1.5, runner.quit)

        runner.register_message("effllm_done", on_done)


if FROM_ENV and config().workload.shape is not None and config().workload.mode == "closed":

    class CampaignShape(LoadTestShape):
        """Closed-loop users over time from the workload's step/ramp shape."""

        def tick(self) -> tuple[int, float] | None:
            t = self.get_run_time()
            users = config().workload.target(t) if t < config().duration_s else None
            if users is None:
                return None
            return max(1, round(users)), 100.0
