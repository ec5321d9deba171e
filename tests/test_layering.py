"""The dependency rule of docs/architecture.md, read from the source: api (the wire contract) imports nothing
of ours; server, tuner and loadtest never import each other; client, telemetry and common import none of
them; the server speaks its protocol through api/, never through the client."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "server", "tuner", "loadtest", "client", "telemetry", "common", "cli")
ALLOWED = {
    "api": set(),  # the wire contract imports nothing of ours
    "server": {"api", "telemetry", "common"},
    "tuner": {"api", "client", "telemetry", "common"},  # client: publishing into a running server
    "loadtest": {"api", "client", "telemetry", "common"},
    "telemetry": {"api", "client"},  # the client's tracing helpers
    "client": {"api"},
    "common": {"api"},
    "cli": set(PACKAGES),  # the thin dispatcher on top of all
}


def imported_packages(pkg: str, path: Path) -> set[str]:
    """effllm packages a module imports, absolute (effllm.X) or relative (..X from inside a package)."""
    here = path.relative_to(ROOT).with_suffix("").parts  # e.g. ("server", "engines", "base")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb from this module's package
                base = list(here[: len(here) - node.level])
                names = [".".join(["effllm", *base, *(node.module or "").split(".")]).rstrip(".")]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if len(parts) > 1 and parts[0] == "effllm" and parts[1] in PACKAGES and parts[1] != pkg:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("pkg", PACKAGES)
def test_packages_import_only_what_the_design_allows(pkg: str) -> None:
    offending = {
        str(path.relative_to(ROOT)): sorted(imported_packages(pkg, path) - ALLOWED[pkg])
        for path in (ROOT / pkg).rglob("*.py")
    }
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_check_sees_relative_imports() -> None:
    module = ROOT / "server" / "adapters" / "registry.py"
    assert {"common", "telemetry"} <= imported_packages("server", module)  # ...common.x and ..telemetry


TORCH_FREE = ("effllm.server.service", "effllm.server.adapters.service", "effllm.tuner.service")


def test_the_grpc_layer_imports_no_torch() -> None:
    """docs/architecture.md: the gRPC layer imports no torch (the engines below server/engines/base.py may).
    Checked on the real import graph, transitively, in a fresh interpreter."""
    import subprocess
    import sys

    heavy = "('torch', 'vllm', 'transformers')"
    code = (
        f"import sys\nfor m in {TORCH_FREE!r}: __import__(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_only_the_cluster_package_imports_ray() -> None:
    """docs/architecture.md: Ray is an optional extra, imported under server/cluster/ only, and there not by
    the pure placement module (the fast tier tests it without Ray)."""
    importers = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else []
                )
                if any(n == "ray" or n.startswith("ray.") for n in names):
                    importers.append(str(path.relative_to(ROOT)))
    cluster = {p for p in importers if p.startswith("server/cluster/")}
    assert set(importers) == cluster and cluster
    assert "server/cluster/placement.py" not in cluster
