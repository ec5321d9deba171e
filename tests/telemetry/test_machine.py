"""The machine description: /proc/cpuinfo's model and the flags that decide precision, from fake texts."""

from __future__ import annotations

from effllm.telemetry.machine import machine, parse_cpuinfo


def cpuinfo(flags: str, model: str = "Fake CPU @ 2.0GHz") -> str:
    one = f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: fpu sse2 {flags}\n\n"
    return one + one.replace("processor\t: 0", "processor\t: 1")


def test_model_and_relevant_flags_in_a_fixed_order() -> None:
    m = parse_cpuinfo(cpuinfo("amx_bf16 avx2 avx512_bf16 avx512f"), cores=2)
    assert m.cpu_model == "Fake CPU @ 2.0GHz" and m.cores == 2 and m.gpu == ""
    assert m.cpu_flags == ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # fpu, sse2: not relevant
    assert m.cpu_bf16 == "amx_bf16"


def test_native_bf16_flag() -> None:
    assert parse_cpuinfo(cpuinfo("avx2"), 4).cpu_bf16 == ""
    assert parse_cpuinfo(cpuinfo("avx2 avx512_bf16"), 4).cpu_bf16 == "avx512_bf16"
    assert parse_cpuinfo("", 1).cpu_model  # no cpuinfo at all: still a name (the platform's)


def test_this_machine_is_stable() -> None:
    assert machine() == machine() and machine().cores >= 1
