from __future__ import annotations

from pathlib import Path

import pytest

from effllm.common.adapter_paths import (
    file_inside,
    parse_ref,
    resolve_relative,
    resolve_version_dir,
)
from effllm.server.engines.base import EffllmError


def _code(exc: pytest.ExceptionInfo[EffllmError]) -> str:
    return exc.value.code


def test_version_dir_and_highest(adapter_root) -> None:
    root = adapter_root.root
    assert resolve_version_dir(root, "demo", "1") == ("1", (root / "demo" / "1").resolve())
    version, folder = resolve_version_dir(root, "demo", "")
    assert version == "2" and folder.name == "2"


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "", "x" * 200, "na me", "a@b"])
def test_odd_names_rejected(adapter_root, name: str) -> None:
    with pytest.raises(EffllmError) as exc:
        resolve_version_dir(adapter_root.root, name, "1")
    assert _code(exc) == "invalid_argument" and "name" in exc.value.message


def test_missing_version_is_not_found(adapter_root) -> None:
    with pytest.raises(EffllmError) as exc:
        resolve_version_dir(adapter_root.root, "demo", "9")
    assert _code(exc) == "not_found"
    with pytest.raises(EffllmError) as exc:
        resolve_version_dir(adapter_root.root, "nobody", "")
    assert _code(exc) == "not_found"


@pytest.mark.parametrize(
    "rel", ["../outside/lora", "demo/../../outside/lora", "/etc", "demo\\1", ".hidden/1"]
)
def test_relative_paths_may_not_leave_root(adapter_root, rel: str) -> None:
    with pytest.raises(EffllmError) as exc:
        resolve_relative(adapter_root.root, rel)
    assert _code(exc) == "invalid_argument" and exc.value.message.startswith("path:")


def test_absolute_path_into_root_is_still_refused(adapter_root) -> None:
    with pytest.raises(EffllmError) as exc:
        resolve_relative(adapter_root.root, str(adapter_root.root / "demo" / "1"))
    assert "absolute" in exc.value.message


def test_symlinks_out_of_root_are_refused(adapter_root) -> None:
    root = adapter_root.root
    with pytest.raises(EffllmError) as exc:
        resolve_version_dir(root, "esc", "1")
    assert _code(exc) == "invalid_argument" and "outside the adapter root" in exc.value.message
    with pytest.raises(EffllmError):
        resolve_relative(root, "esc/1")
    with pytest.raises(EffllmError) as exc:
        file_inside(root, root / "fsym" / "1", "adapter_model.safetensors")
    assert "outside the adapter root" in exc.value.message


def test_symlink_inside_root_is_fine(adapter_root, tmp_path: Path) -> None:
    root = adapter_root.root
    link = root / "alias"
    link.symlink_to(root / "demo", target_is_directory=True)
    try:
        assert resolve_relative(root, "alias/1") == (root / "demo" / "1").resolve()
    finally:
        link.unlink()


def test_parse_ref() -> None:
    assert parse_ref("demo") == ("demo", "")
    assert parse_ref("demo@2") == ("demo", "2")
    for bad in ("demo@", "@1", "de mo", "demo@1@2"):
        with pytest.raises(EffllmError):
            parse_ref(bad)
