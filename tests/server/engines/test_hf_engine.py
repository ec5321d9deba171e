"""The hf engine against PEFT's reference model: mixed-adapter parity, iteration-level batching, sampling,
stop strings, cancellation, and precisions (fp32, bf16, fp16, int4 with an adapter)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from effllm.common.model import ResolvedModel, resolve_model
from effllm.server.engines.base import (
    AdapterSpec,
    ChatTurn,
    EffllmError,
    GenerationRequest,
    Sampling,
    TokenEvent,
)
from effllm.server.engines.hf_engine import HfConfig, HfEngine

from ...adaptertools import make_adapter, make_many_adapters

pytestmark = pytest.mark.model


@functools.cache
def model() -> ResolvedModel:
    """The default model, resolved on first use (not at import: the fast tier collects this module)."""
    return resolve_model(None)


N = 10  # new tokens per parity row
PROMPTS = ("The three primary colors are", "def fibonacci(n):")
METHODS = {"lora1": ("lora", 1), "rs": ("rslora", 2), "dora": ("dora", 3), "lora2": ("lora", 4)}


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterSpec]:
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, (method, seed) in METHODS.items():
        path = make_adapter(model().path, root / name / "1", method=method, rank=8, seed=seed, scale=1.0)
        out[name] = AdapterSpec(name, "1", path, method, 8, 16.0, ("q_proj", "v_proj"))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
async def engine(specs: dict[str, AdapterSpec]) -> AsyncIterator[HfEngine]:
    eng = HfEngine(model(), HfConfig(precision="fp32", max_concurrency=8, max_context=512))
    await eng.start()
    for spec in specs.values():
        await eng.add_adapter(spec)
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
def reference(specs: dict[str, AdapterSpec]) -> Any:
    """PEFT's own model, one request at a time: greedy `generate` on set_adapter(NAME) or the bare base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model().path)
    base = AutoModelForCausalLM.from_pretrained(model().path, dtype=torch.float32).eval()
    first, *rest = specs.values()
    peft = PeftModel.from_pretrained(base, str(first.path), adapter_name=first.key)
    for spec in rest:
        peft.load_adapter(str(spec.path), adapter_name=spec.key)
    cache: dict[tuple[str, str, int], list[int]] = {}

    def run(prompt: str, adapter: str, n: int = N) -> list[int]:
        if (prompt, adapter, n) not in cache:
            ids = torch.tensor([tok.encode(prompt)])
            kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
            with torch.inference_mode():
                if adapter:
                    peft.set_adapter(adapter)
                    out = peft.generate(input_ids=ids, **kw)
                else:
                    with peft.disable_adapter():
                        out = peft.generate(input_ids=ids, **kw)
            cache[(prompt, adapter, n)] = out[0, ids.shape[1] :].tolist()
        return cache[(prompt, adapter, n)]

    return run


def request(
    prompt: str, spec: AdapterSpec | None = None, n: int = N, rid: str = "", **sampling: Any
) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(
        request_id=rid or f"r{id(sampling)}",
        prompt=prompt,
        sampling=Sampling(max_new_tokens=n, **sampling),
        adapter=spec.key if spec else "",
        resolved_adapter=spec,
    )


async def collect(engine: HfEngine, req: GenerationRequest) -> list[TokenEvent]:
    return [e async for e in engine.generate(req)]


def tokens(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


async def test_mixed_adapter_batch_matches_peft_one_by_one(
    engine: HfEngine, specs: dict[str, AdapterSpec], reference: Any
) -> None:
    rows = [
        (PROMPTS[0], None),
        *((PROMPTS[0], s) for s in specs.values()),
        (PROMPTS[1], specs["lora1"]),
        (PROMPTS[1], specs["dora"]),
        (PROMPTS[1], None),
    ]
    results = await asyncio.gather(
        *(collect(engine, request(p, s, rid=f"mix{i}")) for i, (p, s) in enumerate(rows))
    )
    expected = [reference(p, s.key if s else "") for p, s in rows]
    # every adapter really changes the output: the parity below could not hide a row run on the wrong adapter
    first_prompt = [tuple(e) for e in expected[:5]]
    assert len(set(first_prompt)) == 5, first_prompt
    for (prompt, spec), events, want in zip(rows, results, expected, strict=True):
        assert tokens(events) == want, (prompt, spec.key if spec else "base")
        assert events[-1].usage is not None and events[-1].usage.output_tokens == len(want)
        assert events[-1].adapter == (spec.key if spec else "")
    assert engine.running() == 0


async def test_rows_joining_mid_decode_still_match(
    engine: HfEngine, specs: dict[str, AdapterSpec], reference: Any
) -> None:
    early = [
        asyncio.create_task(collect(engine, request(PROMPTS[1], s, n=16, rid=f"early{i}")))
        for i, s in enumerate((None, specs["rs"]))
    ]
    gen = engine.generate(request(PROMPTS[0], specs["lora2"], n=16, rid="late0"))
    late_events = [await gen.__anext__() for _ in range(4)]  # the early rows are mid-decode by now
    joiners = [
        asyncio.create_task(collect(engine, request(p, s, rid=f"late{i + 1}")))
        for i, (p, s) in enumerate(((PROMPTS[0], specs["dora"]), (PROMPTS[1], specs["lora1"])))
    ]
    late_events += [e async for e in gen]
    assert tokens(late_events) == reference(PROMPTS[0], specs["lora2"].key, 16)
    early_out = await asyncio.gather(*early)
    assert tokens(early_out[0]) == reference(PROMPTS[1], "", 16)
    assert tokens(early_out[1]) == reference(PROMPTS[1], specs["rs"].key, 16)
    joined = await asyncio.gather(*joiners)
    assert tokens(joined[0]) == reference(PROMPTS[0], specs["dora"].key)
    assert tokens(joined[1]) == reference(PROMPTS[1], specs["lora1"].key)


async def test_same_seed_same_text_alone_or_batched(engine: HfEngine, specs: dict[str, AdapterSpec]) -> None:
    def sampled(seed: int, rid: str) -> GenerationRequest:
        return request(
            PROMPTS[0],
            specs["lora1"],
            n=12,
            rid=rid,
            temperature=1.0,
            top_p=0.95,
            top_k=50,
            seed=seed,
            repetition_penalty=1.2,
        )

    alone = await collect(engine, sampled(7, "seed-a"))
    batched, *_ = await asyncio.gather(
        collect(engine, sampled(7, "seed-b")),
        collect(engine, request(PROMPTS[1], rid="seed-other")),
        collect(engine, sampled(8, "seed-c")),
    )
    assert tokens(alone) == tokens(batched)
    assert "".join(e.text for e in alone) == "".join(e.text for e in batched)
    others = [tokens(await collect(engine, sampled(s, f"seed-{s}"))) for s in (8, 9)]
    assert any(o != tokens(alone) for o in others)


async def test_stop_string_cuts_text_and_deltas_add_up(engine: HfEngine) -> None:
    chat = (ChatTurn("user", "Write one sentence about the sea."),)
    base = GenerationRequest("stop-0", Sampling(max_new_tokens=24, temperature=0.0), messages=chat)
    full = await collect(engine, base)
    text = "".join(e.text for e in full)
    assert full[-1].finish_reason == "length" and len(tokens(full)) == 24
    assert text == engine._tokenizer.decode(tokens(full), skip_special_tokens=True)
    words = text.split()
    stop = " ".join(words[2:4])  # spans a token boundary, in the middle of the answer
    cut = await collect(
        engine,
        GenerationRequest(
            "stop-1", Sampling(max_new_tokens=24, temperature=0.0, stop=("@@never@@", stop)), messages=chat
        ),
    )
    assert cut[-1].finish_reason == "stop"
    assert "".join(e.text for e in cut) == text[: text.index(stop)]
    assert len(tokens(cut)) < 24


async def test_cancel_frees_the_slot(specs: dict[str, AdapterSpec]) -> None:
    eng = HfEngine(model(), HfConfig(precision="fp32", max_concurrency=2, max_context=512))
    await eng.start()
    try:
        gens = [eng.generate(request(PROMPTS[0], n=200, rid=f"long{i}")) for i in range(2)]
        for g in gens:
            await g.__anext__()
        waiting = asyncio.create_task(collect(eng, request(PROMPTS[1], n=4, rid="third")))
        await asyncio.sleep(0.5)
        assert eng.running() == 3 and not waiting.done()  # two slots busy: the third waits
        await gens[0].aclose()
        done = await asyncio.wait_for(waiting, timeout=120)
        assert done[-1].finish_reason == "length" and len(tokens(done)) == 4
        await gens[1].aclose()
        for _ in range(100):
            if eng.running() == 0:
                break
            await asyncio.sleep(0.05)
        assert eng.running() == 0
        # shutting down fails what is still running instead of leaving it hanging
        held = eng.generate(request(PROMPTS[0], n=200, rid="held"))
        await held.__anext__()
        await eng.shutdown()
        with pytest.raises(EffllmError, match="shut down"):
            await asyncio.wait_for(held.__anext__(), timeout=10)
    finally:
        await eng.shutdown()


async def test_unknown_adapter_is_refused(engine: HfEngine, specs: dict[str, AdapterSpec]) -> None:
    ghost = AdapterSpec("ghost", "1", specs["lora1"].path, "lora", 8, 16.0, ("q_proj",))
    with pytest.raises(EffllmError) as err:
        await collect(engine, request(PROMPTS[0], ghost))
    assert err.value.code == "failed_precondition" and "ghost@1" in err.value.message
    big = AdapterSpec("big", "1", specs["lora1"].path, "lora", 128, 16.0, ("q_proj",))
    with pytest.raises(EffllmError, match="rank 128"):
        await engine.add_adapter(big)


async def test_remove_then_add_again(engine: HfEngine, specs: dict[str, AdapterSpec], reference: Any) -> None:
    spec = specs["lora2"]
    await engine.remove_adapter(spec.key)
    assert spec.key not in engine.adapters()
    with pytest.raises(EffllmError, match="not loaded"):
        await collect(engine, request(PROMPTS[0], spec))
    await engine.add_adapter(spec)
    again = await collect(engine, request(PROMPTS[0], spec, rid="readd"))
    assert tokens(again) == reference(PROMPTS[0], spec.key)


async def test_probe_runs_with_the_add_and_sees_non_finite_weights(
    engine: HfEngine, specs: dict[str, AdapterSpec], reference: Any, tmp_path: Any
) -> None:
    """The probe is a real forward on the engine's kernels: an adapter whose weights hold a NaN (placed
    behind the registry's back, which would refuse it) gets non-finite logits; a good one does not."""
    import shutil

    from safetensors.torch import load_file, save_file

    good = specs["lora1"]
    bad_path = shutil.copytree(good.path, tmp_path / "nan" / "1")
    weights = load_file(bad_path / "adapter_model.safetensors")
    # in v_proj: a NaN there reaches the output through attention's weighted sum (one in q_proj can be
    # dropped by the CPU attention kernel's running max, so the logits stay finite)
    key = next(k for k in sorted(weights) if k.endswith("v_proj.lora_B.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, bad_path / "adapter_model.safetensors")
    bad = AdapterSpec("nan", "1", bad_path, "lora", 8, 16.0, ("q_proj", "v_proj"))
    await engine.add_adapter(bad)  # probed in the same worker job; the result waits for probe_adapter
    try:
        assert await engine.probe_adapter(bad) is False
        assert await engine.probe_adapter(bad) is False  # the kept result is used once, then a fresh probe
    finally:
        await engine.remove_adapter(bad.key)
    assert await engine.probe_adapter(good) is True
    after = await collect(engine, request(PROMPTS[0], good, rid="after-nan"))  # the NaN left nothing behind
    assert tokens(after) == reference(PROMPTS[0], good.key)


async def test_probe_is_one_token_through_the_decoder_and_sees_overflow(
    engine: HfEngine, specs: dict[str, AdapterSpec], tmp_path: Any
) -> None:
    """Issue 28: the probe is one token's forward through the decoder (no LM head, which a q/v adapter
    does not touch: a fifth of the model's weight reads saved) and still refuses finite weights whose
    products overflow (every weight 1e30: the scan passes them, only a forward sees it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    batch = engine._batch
    assert batch is not None
    await engine.probe_adapter(specs["lora1"])  # uses up the result kept from the add, if any
    head, body = batch.base.get_output_embeddings(), batch.base.get_decoder()
    calls: list[tuple[str, int]] = []
    hooks = [
        head.register_forward_hook(lambda _m, _a, _o: calls.append(("head", 0))),
        body.register_forward_hook(
            lambda _m, a, kw, _o: calls.append(("body", kw["input_ids"].shape[1])), with_kwargs=True
        ),
    ]
    try:
        assert await engine.probe_adapter(specs["lora1"]) is True
        assert calls == [("body", 1)]  # one token, the decoder alone, once
        huge_path = shutil.copytree(specs["lora1"].path, tmp_path / "huge" / "1")
        weights = load_file(huge_path / "adapter_model.safetensors")
        save_file({k: v.fill_(1e30) for k, v in weights.items()}, huge_path / "adapter_model.safetensors")
        huge = AdapterSpec("huge", "1", huge_path, "lora", 8, 16.0, ("q_proj", "v_proj"))
        await engine.add_adapter(huge)
        try:
            assert await engine.probe_adapter(huge) is False
        finally:
            await engine.remove_adapter(huge.key)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("path", ["stacked", "peft"])
async def test_probe_runs_the_head_when_the_adapter_targets_it(
    engine: HfEngine, tmp_path: Any, path: str
) -> None:
    """An adapter on lm_head is probed through the head too: a NaN there is refused, on the stacked path
    (lora_A/lora_B only) and on PEFT's (PEFT saved the tied embedding with it)."""
    from safetensors.torch import load_file, save_file

    folder = make_adapter(model().path, tmp_path / path / "1", rank=4, seed=7, targets=("lm_head",))
    weights = load_file(folder / "adapter_model.safetensors")
    if path == "stacked":
        weights = {k: v for k, v in weights.items() if ".lora_" in k}
    key = next(k for k in sorted(weights) if k.endswith("lora_B.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, folder / "adapter_model.safetensors")
    spec = AdapterSpec(path, "1", folder, "lora", 4, 8.0, ("lm_head",))
    await engine.add_adapter(spec)
    try:
        assert (spec.key in engine._batch.stack) == (path == "stacked")  # type: ignore[union-attr]
        assert await engine.probe_adapter(spec) is False
    finally:
        await engine.remove_adapter(spec.key)


async def test_adapters_per_batch_limit_holds_rows_back(specs: dict[str, AdapterSpec]) -> None:
    config = HfConfig(precision="fp32", max_concurrency=4, max_adapters_per_batch=1, max_context=512)
    eng = HfEngine(model(), config)
    await eng.start()
    try:
        for name in ("lora1", "rs"):
            await eng.add_adapter(specs[name])
        holder = eng.generate(request(PROMPTS[0], specs["lora1"], n=200, rid="holder"))
        await holder.__anext__()
        same = asyncio.create_task(collect(eng, request(PROMPTS[1], specs["lora1"], n=3, rid="same")))
        other = asyncio.create_task(collect(eng, request(PROMPTS[0], specs["rs"], n=3, rid="other")))
        await asyncio.wait_for(same, timeout=120)  # the same adapter joins the running batch
        assert not other.done() and eng.running() == 2  # a second adapter waits for room
        await holder.aclose()
        assert len(tokens(await asyncio.wait_for(other, timeout=120))) == 3
    finally:
        await eng.shutdown()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
async def test_half_precisions_answer(precision: str) -> None:
    eng = HfEngine(model(), HfConfig(precision=precision, max_concurrency=2, max_context=256))  # type: ignore[arg-type]
    await eng.start()
    try:
        chat = (ChatTurn("user", "What is the capital of France?"),)
        events = await collect(
            eng, GenerationRequest("half", Sampling(max_new_tokens=10, temperature=0.0), messages=chat)
        )
        assert "Paris" in "".join(e.text for e in events)
        assert eng.info.weight_bytes == pytest.approx(eng.info.parameters * 2, rel=0.01)
    finally:
        await eng.shutdown()


async def test_int4_serves_an_adapter_at_under_a_third_of_bf16(specs: dict[str, AdapterSpec]) -> None:
    eng = HfEngine(model(), HfConfig(precision="int4", max_concurrency=4, max_context=256))
    await eng.start()
    try:
        ratio = eng.info.weight_ratio_to_bf16
        print(f"int4 weight bytes {eng.info.weight_bytes} = {ratio:.4f} of bf16 ({eng.info.parameters * 2})")
        assert ratio <= 1 / 3
        assert "dora" not in eng.info.adapter_methods
        await eng.add_adapter(specs["lora1"])
        chat = (ChatTurn("user", "What is the capital of France?"),)
        base, tuned = await asyncio.gather(
            collect(
                eng, GenerationRequest("i4-base", Sampling(max_new_tokens=8, temperature=0.0), messages=chat)
            ),
            collect(
                eng,
                GenerationRequest(
                    "i4-lora",
                    Sampling(max_new_tokens=8, temperature=0.0),
                    messages=chat,
                    adapter="lora1",
                    resolved_adapter=specs["lora1"],
                ),
            ),
        )
        assert "Paris" in "".join(e.text for e in base)
        assert tuned[-1].adapter == "lora1@1" and len(tokens(tuned)) == 8
        assert tokens(tuned) != tokens(base)
        with pytest.raises(EffllmError, match="dora"):
            await eng.add_adapter(specs["dora"])
    finally:
        await eng.shutdown()


async def test_ignore_eos_decodes_past_the_end_of_sequence(engine: HfEngine) -> None:
    chat = (ChatTurn("user", "What is the capital of France? Answer in one word."),)

    def ask(**sampling: Any) -> GenerationRequest:
        rid, params = f"eos{len(sampling)}", Sampling(32, temperature=0.0, **sampling)
        return GenerationRequest(request_id=rid, messages=chat, sampling=params)

    short, full = await asyncio.gather(collect(engine, ask()), collect(engine, ask(ignore_eos=True)))
    assert short[-1].finish_reason == "stop" and len(tokens(short)) < 32  # the model did end by itself
    assert full[-1].finish_reason == "length" and len(tokens(full)) == 32
    assert tokens(full)[: len(tokens(short))] == tokens(short)  # same greedy path up to (and through) EOS


# --- many adapters on the stacked path -------------------------------------------------------------------
MANY = 12  # LoRA r8, rsLoRA r16, LoRA r16, rsLoRA r8, ... (tests/adaptertools.make_many_adapters)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> list[AdapterSpec]:
    root = tmp_path_factory.mktemp("many") / "root"
    made = make_many_adapters(model().path, root, MANY)
    return [
        AdapterSpec(name, "1", root / name / "1", method, rank, 2.0 * rank, ("q_proj", "v_proj"))  # type: ignore[arg-type]
        for name, method, rank in made
    ]


def peft_reference(specs: list[AdapterSpec], dtype: torch.dtype = torch.float32, int4: bool = False) -> Any:
    """PEFT one request at a time (greedy generate), one adapter loaded at a time; cached per row."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model().path)
    base = AutoModelForCausalLM.from_pretrained(model().path, dtype=dtype).eval()
    if int4:
        from effllm.server.engines.hf_int4 import quantize_int4

        quantize_int4(base)
    by_key = {s.key: s for s in specs}
    cache: dict[tuple[str, str, int], list[int]] = {}

    def run(prompt: str, key: str, n: int = N) -> list[int]:
        if (prompt, key, n) not in cache:
            ids = torch.tensor([tok.encode(prompt)])
            kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
            if key:  # loaded outside inference_mode: PEFT cannot load onto torchao's int4 tensors inside it
                model = PeftModel.from_pretrained(base, str(by_key[key].path), adapter_name="x")
                with torch.inference_mode():
                    out = model.generate(input_ids=ids, **kw)
                model.unload()  # back to the bare base for the next adapter
            else:
                with torch.inference_mode():
                    out = base.generate(input_ids=ids, **kw)
            cache[(prompt, key, n)] = out[0, ids.shape[1] :].tolist()
        return cache[(prompt, key, n)]

    return run


@pytest.mark.timeout(1800)  # 12 PEFT references besides the engine: minutes on a busy 2-core box
async def test_many_distinct_adapters_in_one_step_match_peft(many: list[AdapterSpec]) -> None:
    """12 distinct adapters (LoRA and rsLoRA, ranks 8 and 16) and base rows in one batch, some joining
    mid-decode: every row equals PEFT run alone, and no adapter load touched PEFT."""
    eng = HfEngine(
        model(), HfConfig(precision="fp32", max_concurrency=16, max_adapters_per_batch=16, max_context=256)
    )
    await eng.start()
    try:
        for spec in many:
            await eng.add_adapter(spec)
        assert eng._batch.peft is None and len(eng._batch.stack.slots) == MANY
        first = [None, *many[:7], None]
        later = [*many[7:], None]
        early = [
            asyncio.create_task(collect(eng, request(PROMPTS[i % 2], s, n=12, rid=f"e{i}")))
            for i, s in enumerate(first)
        ]
        probe = eng.generate(request(PROMPTS[0], many[0], n=12, rid="probe"))
        probe_events = [await probe.__anext__() for _ in range(3)]  # the early rows are mid-decode now
        joined = [
            asyncio.create_task(collect(eng, request(PROMPTS[i % 2], s, rid=f"j{i}")))
            for i, s in enumerate(later)
        ]
        probe_events += [e async for e in probe]
        early_out, joined_out = await asyncio.gather(*early), await asyncio.gather(*joined)
    finally:
        await eng.shutdown()
    ref = peft_reference(many)
    assert tokens(probe_events) == ref(PROMPTS[0], many[0].key, 12)
    for i, (spec, events) in enumerate(zip(first, early_out, strict=True)):
        assert tokens(events) == ref(PROMPTS[i % 2], spec.key if spec else "", 12), (i, spec)
    for i, (spec, events) in enumerate(zip(later, joined_out, strict=True)):
        assert tokens(events) == ref(PROMPTS[i % 2], spec.key if spec else ""), (i, spec)
    outputs = {tuple(ref(PROMPTS[0], s.key, 12)) for s in many[:7]}
    assert len(outputs) == 7  # every adapter really changes the tokens: a wrong slot could not hide


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("precision", ["bf16", "int4"])
async def test_stacked_adapters_match_peft_at_low_precision(many: list[AdapterSpec], precision: str) -> None:
    """bf16 and int4 (torchao, quantized base; the LoRA delta in fp32 as PEFT keeps it). Each row run alone
    equals PEFT one by one exactly (the stacked math is PEFT's). In a mixed batch the first token (each
    row's own prefill) is exact too; later tokens come from a batched bf16 GEMM whose rounding depends on
    the batch size (true for base rows as well), so there only the adapter's effect is checked."""
    chosen = many[:5]
    rows = [None, *chosen]
    eng = HfEngine(model(), HfConfig(precision=precision, max_concurrency=8, max_context=256))  # type: ignore[arg-type]
    await eng.start()
    try:
        for spec in chosen:
            await eng.add_adapter(spec)
        alone = [await collect(eng, request(PROMPTS[i % 2], s, n=8, rid=f"a{i}")) for i, s in enumerate(rows)]
        mixed = await asyncio.gather(
            *(collect(eng, request(PROMPTS[i % 2], s, n=8, rid=f"m{i}")) for i, s in enumerate(rows))
        )
    finally:
        await eng.shutdown()
    ref = peft_reference(chosen, dtype=torch.bfloat16, int4=precision == "int4")
    for i, spec in enumerate(rows):
        want = ref(PROMPTS[i % 2], spec.key if spec else "", 8)
        assert tokens(alone[i]) == want, (precision, i, spec)
        assert tokens(mixed[i])[0] == want[0], (precision, i, spec)
    assert len({tuple(tokens(m)) for m in mixed[1::2]}) == len(mixed[1::2])  # same prompt, other adapters
