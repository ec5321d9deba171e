"""What a TuningService caller may touch: the roots its job paths resolve into, the servers it publishes to.

A job comes from the network, so every path in it is hostile: `data`, `eval_data` and `model` must resolve
(symlinks followed, `..` collapsed, relative paths taken from their root) inside the data root,
`output_dir` inside the output root, `publish.adapter_root` inside the adapter root; a publish names one of
the servers this tuner was configured with (`--publish-server NAME=HOST:PORT`), never an address. `hf:` data
is a hub dataset id (TuneConfig refuses anything path-like) and only with `--allow-hub-data`.
Invariant: a refused path gets the same message whether or not it exists, and nothing outside a root is
opened, listed or stat-ed before the refusal (`Path.resolve` only reads the links along the way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, TuneConfig

# A server name in `--publish-server NAME=HOST:PORT` and in PublishSpec.server.
_SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_PATH_CHARS = 4096  # PATH_MAX: anything longer cannot be a path the tuner could open


class PathRefused(ValueError):
    """A job path outside its root (or not a usable path); the message names the field, never existence."""


@dataclass(frozen=True)
class PublishServer:
    """A server the tuner publishes to, with the tuner's own credentials (never the caller's)."""

    name: str
    address: str  # host:port


@dataclass(frozen=True)
class TunerPolicy:
    """The roots (absolute, resolved) and the named publish servers of one `effllm tuner serve`."""

    data_root: Path
    output_root: Path
    adapter_root: Path | None = None  # None: publishing is off
    servers: tuple[PublishServer, ...] = field(default=())
    hub_data: bool = False  # `hf:ID` data (fetched from the hub on a caller's behalf) is allowed

    @classmethod
    def create(
        cls,
        data_root: str | Path,
        output_root: str | Path,
        adapter_root: str | Path | None = None,
        servers: tuple[str, ...] = (),
        hub_data: bool = False,
    ) -> TunerPolicy:
        """Roots resolved now (a root that is itself a link is followed once, at start); `servers` are
        `NAME=HOST:PORT` strings. Raises ValueError with a message for the operator."""
        roots = [Path(data_root), Path(output_root)] + ([Path(adapter_root)] if adapter_root else [])
        for root in roots:
            if not root.expanduser().is_dir():
                raise ValueError(f"root {root}: not a folder")
        named: dict[str, PublishServer] = {}
        for spec in servers:
            name, sep, address = spec.partition("=")
            host, colon, port = address.rpartition(":")
            if not (sep and _SERVER_NAME.fullmatch(name) and host and colon and port.isdigit()):
                raise ValueError(f"--publish-server {spec!r}: expected NAME=HOST:PORT")
            if name in named:
                raise ValueError(f"--publish-server {name}: given twice")
            named[name] = PublishServer(name, address)
        if named and adapter_root is None:
            raise ValueError("--publish-server needs --adapter-root (where published adapters go)")
        return cls(
            data_root=Path(data_root).expanduser().resolve(),
            output_root=Path(output_root).expanduser().resolve(),
            adapter_root=Path(adapter_root).expanduser().resolve() if adapter_root else None,
            servers=tuple(named.values()),
            hub_data=hub_data,
        )

    def server(self, name: str) -> PublishServer:
        for server in self.servers:
            if server.name == name:
                return server
        known = ", ".join(s.name for s in self.servers) or "none configured"
        raise ConfigError(
            f"publish.server: {name[:64]!r} is not a server this tuner publishes to ({known}); "
            "name one of them, not an address"
        )

    def confine_job(self, config: TuneConfig) -> TuneConfig:
        """`config` with every path replaced by its resolved absolute form inside its root."""
        changes: dict[str, str] = {}
        for name in ("data", "eval_data"):
            value = getattr(config, name)
            if value.startswith("hf:") and not self.hub_data:
                raise PathRefused(
                    f"{name}: hub data (hf:) is off in this tuner (--allow-hub-data turns it on); "
                    "local data is a path inside the tuner's --data-root"
                )
            if value and not value.startswith(("task:", "hf:")):  # hf: ids: TuneConfig checked the grammar
                changes[name] = str(confine(name, value, self.data_root))
        if config.model:  # a local checkpoint dir; hub ids are not fetched on a caller's behalf
            changes["model"] = str(confine("model", config.model, self.data_root))
        if config.output_dir:
            changes["output_dir"] = str(confine("output_dir", config.output_dir, self.output_root))
        return config.replace(**changes) if changes else config

    def confine_adapter_root(self, value: str) -> Path:
        if self.adapter_root is None:
            raise PathRefused("publish: this tuner has no --adapter-root; publishing is off")
        return confine("publish.adapter_root", value, self.adapter_root) if value else self.adapter_root


def confine(field_name: str, value: str, root: Path) -> Path:
    """`value` resolved (relative to `root`) if it lies inside `root`, else PathRefused naming the field.

    The message is the same for an outside path that exists and one that does not (no existence oracle);
    `resolve(strict=False)` follows the links that exist and keeps the rest of the path as written.
    """
    refused = PathRefused(f"{field_name}: must be a path inside the tuner's {_ROOT_FLAG[field_name]}")
    if not value or len(value) > _MAX_PATH_CHARS or "\x00" in value or not value.isprintable():
        raise refused
    try:
        resolved = (root / value).resolve()  # `~` is a name here: the caller's home is not ours
    except (OSError, RuntimeError, ValueError):  # a link loop, a name too long: refused the same way
        raise refused from None
    if resolved != root and not resolved.is_relative_to(root):
        raise refused
    return resolved


_ROOT_FLAG = {
    "data": "--data-root",
    "eval_data": "--data-root",
    "model": "--data-root",
    "output_dir": "--output-root",
    "publish.adapter_root": "--adapter-root",
}
