"""Claims the docs make about the project, pinned to the files that make them true: when one side changes,
this fails until the other says the same."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_python_floors_agree() -> None:
    """The package's floor is pyproject's requires-python; the suite's is what scripts/test.sh checks; the
    README states both."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    package_floor = re.fullmatch(r">=\s*3\.(\d+)", requires)
    assert package_floor is not None, requires
    suite_floor = re.search(r"sys\.version_info < \(3, (\d+)\)", (ROOT / "scripts" / "test.sh").read_text())
    assert suite_floor is not None
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"Python ≥ 3.{suite_floor[1]} with `venv`" in readme
    assert f"the package itself runs on ≥ 3.{package_floor[1]}" in readme
