"""The cluster's replica choice (server/cluster/placement.py), without a cluster: states in, ranking out."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack

import pytest

from effllm.server.cluster.placement import (
    SPILL_ROUNDS,
    Dispatcher,
    Placement,
    ReplicaState,
    Want,
    choose,
    parse_replicas,
)


def r(rid: str, *adapters: str, in_flight: int = 0, slots: int = 2, **figures: float) -> ReplicaState:
    return ReplicaState(rid, frozenset(adapters), in_flight, slots, **figures)


def test_a_replica_holding_the_adapter_comes_first_even_when_busier() -> None:
    placed = choose([r("a", in_flight=0), r("b", "x", in_flight=1)], Want("x"))
    assert placed.ranking[0] == "b" and placed.assign == ""


def test_a_new_adapter_is_assigned_to_the_least_loaded_replica() -> None:
    placed = choose([r("a", in_flight=1), r("b", in_flight=0)], Want("x"))
    assert placed == Placement(("b", "a"), assign="b", why=placed.why)


def test_a_burst_on_a_new_adapter_stays_on_the_replica_first_assigned() -> None:
    """The load is still under way (no replica reports the adapter yet): the assignment routes the burst."""
    replicas = [r("a"), r("b")]
    first = choose(replicas, Want("x"))
    assigned = {"x": frozenset({first.assign})}
    # its slots taken and one more waiting: the rest of the burst still queues there, no second load
    busy = [r(i, in_flight=3) if i == first.assign else r(i) for i in ("a", "b")]
    again = choose(busy, Want("x"), assigned)
    assert again.ranking[0] == first.assign and again.assign == ""


def test_overload_spills_to_a_free_replica_which_is_assigned_the_adapter() -> None:
    placed = choose([r("a", "x", in_flight=4), r("b", in_flight=0)], Want("x"))
    assert placed.ranking == ("b", "a") and placed.assign == "b"


def test_when_every_replica_is_full_the_request_stays_with_a_holder() -> None:
    placed = choose([r("a", "x", in_flight=5), r("b", in_flight=4)], Want("x"))
    assert placed.ranking[0] == "a" and placed.assign == ""


def test_energy_and_latency_choose_different_replicas_from_their_figures() -> None:
    fast = r("fast", ttft_s=0.05, tpot_s=0.01, j_per_token=2.0)
    frugal = r("frugal", ttft_s=0.20, tpot_s=0.03, j_per_token=0.5)
    assert choose([fast, frugal], Want(objective="latency")).ranking[0] == "fast"
    assert choose([fast, frugal], Want(objective="energy")).ranking[0] == "frugal"
    # the same among the holders of an adapter
    fast_x, frugal_x = (ReplicaState(**{**s.__dict__, "adapters": frozenset({"x"})}) for s in (fast, frugal))
    assert choose([fast_x, frugal_x], Want("x", "energy")).ranking[0] == "frugal"


def test_a_full_replica_goes_behind_a_free_one_whatever_its_figures() -> None:
    fast = r("fast", in_flight=4, ttft_s=0.01, tpot_s=0.01)
    slow = r("slow", ttft_s=1.0, tpot_s=0.1)
    assert choose([fast, slow], Want()).ranking == ("slow", "fast")


def test_a_replica_that_failed_the_request_is_avoided_unless_it_is_the_only_one() -> None:
    assert choose([r("a", "x"), r("b")], Want("x", avoid=frozenset({"a"}))).ranking == ("b",)
    assert choose([r("a")], Want(avoid=frozenset({"a"}))).ranking == ("a",)


def test_the_same_inputs_give_the_same_ranking() -> None:
    replicas = [r("c"), r("a"), r("b")]
    assert choose(replicas, Want("x")) == choose(list(reversed(replicas)), Want("x"))


def test_no_replica_and_bad_input_are_refused() -> None:
    with pytest.raises(ValueError):
        choose([], Want())
    with pytest.raises(ValueError, match="objective"):
        Want(objective="fastest")
    with pytest.raises(ValueError):
        ReplicaState("a", slots=0)


def stats(slots: int = 2, *adapters: str) -> dict[str, object]:
    """A replica's routing stats as record_routing_stats sends them (running/queued lag: never read)."""
    return {"slots": slots, "adapters": list(adapters), "running": 0, "queued": 0}


def test_the_front_counts_its_own_requests_so_a_burst_spills_at_two_rounds_of_slots() -> None:
    """The flaky e2e spill: a burst placed before any routing stats moved. The front's own count moves at
    once: 2 x slots requests go to the adapter's first replica, the next spills to the other."""
    d = Dispatcher()
    view = {"a": stats(), "b": stats()}  # the stats never change during the burst
    held = []
    with ExitStack() as open_calls:
        for _ in range(SPILL_ROUNDS * 2):
            placed = d.place(view, Want("x"))
            held.append(placed.ranking[0])
            open_calls.enter_context(d.sending(placed.ranking[0]))
        assert len(set(held)) == 1 and d.in_flight[held[0]] == 4
        spill = d.place(view, Want("x"))
        assert spill.ranking[0] != held[0] and spill.assign == spill.ranking[0]
    assert d.in_flight == {held[0]: 0}  # every call ended: nothing counted
    assert d.place(view, Want("x")).ranking[0] == held[0]  # the first holder again, below the spill point


def test_a_call_leaves_the_count_however_it_ends() -> None:
    d = Dispatcher()
    with pytest.raises(RuntimeError), d.sending("a"):
        assert d.in_flight == {"a": 1}
        raise RuntimeError("the replica died")
    with d.sending("a") as sent:
        sent.on("b")  # Serve passed over the first choice: the count follows the request
        assert d.in_flight == {"a": 0, "b": 1}
    assert d.in_flight == {"a": 0, "b": 0}


def test_a_replica_gone_from_the_cluster_leaves_counts_and_assignments() -> None:
    d = Dispatcher()
    first = d.place({"a": stats(), "b": stats()}, Want("x")).assign
    with d.sending(first):
        pass
    other = "b" if first == "a" else "a"
    placed = d.place({other: stats()}, Want("x"))  # the assigned replica died and was replaced
    assert placed.ranking == (other,) and placed.assign == other
    assert d.in_flight == {}


@pytest.mark.parametrize(("spec", "want"), [("2", (2, 2)), ("1:4", (1, 4)), (" 3 ", (3, 3))])
def test_replicas_flag(spec: str, want: tuple[int, int]) -> None:
    assert parse_replicas(spec) == want


@pytest.mark.parametrize("spec", ["0", "3:2", "x", "1:", "-1:2"])
def test_bad_replicas_flag_names_it(spec: str) -> None:
    with pytest.raises(ValueError, match="--replicas"):
        parse_replicas(spec)


def test_serve_without_replicas_never_imports_ray() -> None:
    """Ray is imported only when --replicas is given: the single server's flags, parser and modules stay
    free of it (checked in a fresh interpreter)."""
    code = (
        "import sys\n"
        "from effllm.cli.main import build_parser\n"
        "import effllm.server.cli, effllm.server.app, effllm.server.cluster.placement\n"
        "args = build_parser().parse_args(['serve', '--engine', 'hf'])\n"
        "assert args.replicas is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
