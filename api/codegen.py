"""Generate the Python stubs in api/v1/ from proto/effllm/v1/*.proto.

`python -m effllm.api.codegen` rewrites them; tests/api/test_codegen.py checks they are in sync.
grpc_tools writes absolute imports (`from effllm.v1 import x_pb2`); we make them relative so the stubs live
inside effllm.api.v1 whatever the proto package is called. It also names the Python module the message
classes report after the proto path (`effllm.v1.x_pb2`, which does not exist); we name the real module,
so anything that pickles a message (Ray, multiprocessing) can import its class again.
Invariant: every generated class's `__module__` is the module that defines it (effllm.api.v1.x_pb2); the
wire names (package `effllm.v1`) are the .proto's and do not change.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
STUB_DIR = ROOT / "api" / "v1"
_ABS_IMPORT = re.compile(r"^from effllm\.v1 import (\w+_pb2)", re.M)
_MODULE_NAME = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'effllm\.v1\.(\w+_pb2)'")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev-only dependency

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "effllm" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{protoc_include()}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted((Path(tmp) / "effllm" / "v1").iterdir()):
            text = _ABS_IMPORT.sub(r"from . import \1", src.read_text())
            text = _MODULE_NAME.sub(r"\1'effllm.api.v1.\2'", text)
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    return written


def protoc_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


if __name__ == "__main__":
    for path in generate(STUB_DIR):
        print(path.relative_to(ROOT), file=sys.stderr)
