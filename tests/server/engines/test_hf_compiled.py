"""The hf engine's compiled decode path (hf_compiled + hf_static) on a tiny random Llama (2 layers, 128 wide,
SmolLM2's tokenizer and vocabulary), so a compile costs seconds: greedy tokens equal the eager path's and
PEFT's one request at a time, with base, LoRA, rsLoRA (every Linear) and DoRA rows in one batch and rows
joining mid-decode; buckets compile at start-up and never again while serving; slots are freed and
reused; sampling, stop strings, cancellation; bf16 and int4; and the switch off is the old path."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from effllm.common.model import ResolvedModel, resolve_model
from effllm.server.engines.base import AdapterSpec, GenerationRequest, Sampling, TokenEvent
from effllm.server.engines.hf_compiled import StepWatch, buckets
from effllm.server.engines.hf_engine import HfConfig, HfEngine

from ...adaptertools import make_adapter

pytestmark = pytest.mark.model  # loads the real model (deselected by scripts/test.sh --fast)

PROMPTS = ("The three primary colors are", "def fibonacci(n):", "Once upon a time, in a small village")
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N = 10
logging.getLogger("torch.__trace").setLevel(logging.INFO)  # else captured logs format every graph


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ResolvedModel:
    """A random 2-layer Llama with SmolLM2's tokenizer (its vocabulary, so prompts tokenize as usual)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    source = resolve_model(None).path
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.05,  # wider logits than 0.02: greedy picks are far from ties
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    return resolve_model(str(path))


@pytest.fixture(scope="module")
def specs(tiny: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterSpec]:
    root = tmp_path_factory.mktemp("tiny-adapters")
    plan = {  # rsLoRA first: its stacks (every Linear, rank 16) hold LoRA's too, so one re-warm serves both
        "rs": ("rslora", 16, 2, ALL_LINEARS),
        "lo": ("lora", 8, 1, ("q_proj", "v_proj")),
        "do": ("dora", 8, 3, ("q_proj", "v_proj")),
    }
    out = {}
    for name, (method, rank, seed, targets) in plan.items():
        path = make_adapter(
            tiny.path, root / name / "1", method=method, rank=rank, seed=seed, targets=targets, scale=1.0
        )
        out[name] = AdapterSpec(name, "1", path, method, rank, 2.0 * rank, targets)  # type: ignore[arg-type]
    return out


async def started(model: ResolvedModel, specs: dict[str, AdapterSpec], **config: Any) -> HfEngine:
    config = {"precision": "fp32", "max_concurrency": 8, "max_context": 256, **config}
    eng = HfEngine(model, HfConfig(**config))
    await eng.start()
    for spec in specs.values():
        if spec.method in eng.info.adapter_methods:
            await eng.add_adapter(spec)
    if eng._batch.compiled is not None:  # new adapter shapes compile off the worker: let them finish
        assert await asyncio.to_thread(eng._batch.compiled.wait_ready, 600)
    return eng


@pytest.fixture(scope="module")
async def eager(tiny: ResolvedModel, specs: dict[str, AdapterSpec]) -> AsyncIterator[HfEngine]:
    eng = await started(tiny, specs)
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
async def compiled(tiny: ResolvedModel, specs: dict[str, AdapterSpec]) -> AsyncIterator[HfEngine]:
    eng = await started(tiny, specs, compile_decode=True)
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
def reference(tiny: ResolvedModel, specs: dict[str, AdapterSpec]) -> Any:
    """PEFT's own model, one request at a time: greedy `generate` on set_adapter(NAME) or the bare base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.path)
    base = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None  # decode past EOS, as the engine does with ignore_eos
    first, *rest = specs.values()
    peft = PeftModel.from_pretrained(base, str(first.path), adapter_name=first.key)
    for spec in rest:
        peft.load_adapter(str(spec.path), adapter_name=spec.key)
    cache: dict[tuple[str, str, int], list[int]] = {}

    def run(prompt: str, adapter: str, n: int = N) -> list[int]:
        if (prompt, adapter, n) not in cache:
            ids = torch.tensor([tok.encode(prompt)])
            kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=0)
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


def request(prompt: str, spec: AdapterSpec | None = None, n: int = N, rid: str = "", **sampling: Any) -> Any:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("ignore_eos", True)  # a random model may pick EOS; PEFT's reference runs past it too
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


async def scenario(eng: HfEngine, specs: dict[str, AdapterSpec]) -> dict[str, list[int]]:
    """Base, LoRA and rsLoRA rows decoding; after 3 tokens a DoRA row and two more stacked rows join."""
    first = {"base0": (PROMPTS[0], None), "lo1": (PROMPTS[1], specs["lo"]), "rs2": (PROMPTS[2], specs["rs"])}
    early = {
        name: asyncio.create_task(collect(eng, request(p, s, n=14, rid=f"{name}-{id(eng)}")))
        for name, (p, s) in first.items()
    }
    gen = eng.generate(request(PROMPTS[0], specs["rs"], n=14, rid=f"probe-{id(eng)}"))
    probe = [await gen.__anext__() for _ in range(3)]  # the early rows are mid-decode by now
    later = {"do1": (PROMPTS[1], specs["do"]), "lo0": (PROMPTS[0], specs["lo"]), "base2": (PROMPTS[2], None)}
    joined = {
        name: asyncio.create_task(collect(eng, request(p, s, rid=f"{name}-{id(eng)}")))
        for name, (p, s) in later.items()
    }
    probe += [e async for e in gen]
    out = {name: tokens(await task) for name, task in {**early, **joined}.items()}
    return {**out, "rs0": tokens(probe)}


WANT = {  # row -> (prompt, adapter, tokens) of the scenario
    "base0": (PROMPTS[0], "", 14),
    "lo1": (PROMPTS[1], "lo@1", 14),
    "rs2": (PROMPTS[2], "rs@1", 14),
    "rs0": (PROMPTS[0], "rs@1", 14),
    "do1": (PROMPTS[1], "do@1", N),
    "lo0": (PROMPTS[0], "lo@1", N),
    "base2": (PROMPTS[2], "", N),
}


@pytest.mark.timeout(1800)  # the module's engines compile first: minutes on a busy 2-core box
async def test_compiled_equals_eager_and_peft_with_mixed_adapters_and_joiners(
    eager: HfEngine, compiled: HfEngine, specs: dict[str, AdapterSpec], reference: Any
) -> None:
    decoder = compiled._batch.compiled
    assert decoder is not None and decoder.mode == "compiled", "the switch must build the compiled path"
    assert set(decoder.warmup_s) == {1, 2, 4, 8} and compiled.info.extra["decode"] == "compiled"
    # B=1 and one dynamic-batch graph for 2..8, at start-up and again for rsLoRA's new stacked shapes
    assert decoder.graphs <= 4, decoder.graphs
    graphs, steps = decoder.graphs, decoder.steps
    got_compiled = await scenario(compiled, specs)
    got_eager = await scenario(eager, specs)
    for name, (prompt, adapter, n) in WANT.items():
        want = reference(prompt, adapter, n)
        assert got_eager[name] == want, ("eager", name)
        assert got_compiled[name] == want, ("compiled", name)
    # every adapter really changes the tokens here, so a row run on the wrong slot could not pass
    assert len({tuple(reference(PROMPTS[0], a, 14)) for a in ("", "lo@1", "rs@1")}) == 3
    assert decoder.steps > steps + 10  # the stacked rows decoded on the compiled step...
    assert decoder.graphs == graphs  # ...which compiled nothing while serving (all at start and load)
    assert decoder.step_graphs == 0  # and no graph was ever compiled by a decode step
    assert decoder.kv.in_use() == 0 and compiled.running() == 0  # every slot freed


def test_fused_projections_share_the_modules_storage_and_keep_every_output(
    tiny: ResolvedModel, specs: dict[str, AdapterSpec]
) -> None:
    """q/k/v and gate/up fused into one tensor each: the modules' weights become views of it (no second
    copy), the eager forward's logits are bit-identical, and the static step on the fused weights gives
    the unfused step's greedy tokens and logits, with a rsLoRA adapter on every Linear (deltas per block)."""
    from transformers import AutoModelForCausalLM

    from effllm.server.engines.hf_lora import StackedLora, read_lora
    from effllm.server.engines.hf_static import (
        StaticKV,
        decode_step,
        fuse_projections,
        lora_inputs,
        module_names,
        read_weights,
    )

    model = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32).eval()
    stack = StackedLora(model, "cpu", 4)
    stack.add("rs", read_lora(specs["rs"].path, stack.linears))  # type: ignore[arg-type]
    ids = torch.tensor([[1, 450, 2211, 7300, 10631, 526]])
    names = module_names(model.config.num_hidden_layers)

    def static_logits() -> tuple[torch.Tensor, list[int]]:
        """The static step, eagerly, on rows (base, rsLoRA) decoding 6 tokens after ids[0, 0]."""
        w = read_weights(model, stack.linears)
        kv = StaticKV(w, 2, 16, torch.float32, "cpu")
        rows, scale = torch.tensor([0, 1]), stack.scale[[0, 1]].view(-1, 1, 1)
        tok, out, picks = torch.tensor([1, 1]), [], []
        for p in range(6):
            pos = torch.tensor([p, p])
            x = model.get_input_embeddings()(tok[:, None])
            cos, sin = model.model.rotary_emb(x, pos[:, None])
            mask = torch.arange(8)[None, :] <= pos[:, None]
            logits = decode_step(
                w, x, cos, sin, pos, mask, kv.k, kv.v, rows, scale, lora_inputs(stack, names)
            )
            tok = logits.argmax(-1)
            out.append(logits)
            picks += tok.tolist()
        return torch.stack(out), picks

    with torch.inference_mode():
        plain_forward = model(input_ids=ids).logits
        plain, plain_tokens = static_logits()
        assert all(
            layer.qkv is None and layer.gate_up is None for layer in read_weights(model, stack.linears).layers
        )
        before = sum(p.numel() for p in model.parameters())
        assert fuse_projections(model, stack.linears) == 2 * model.config.num_hidden_layers
        weights = read_weights(model, stack.linears)
        for i, layer in enumerate(weights.layers):
            attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
            assert layer.qkv is not None and layer.gate_up is not None
            parts = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
            assert layer.qkv.weight.shape == (sum(p.shape[0] for p in parts), 128)
            assert torch.equal(layer.qkv.weight, torch.cat(parts))
            offset = 0
            for part in parts:  # views of the fused tensor: same storage, adjacent row blocks
                assert part.untyped_storage().data_ptr() == layer.qkv.weight.untyped_storage().data_ptr()
                assert part.storage_offset() == layer.qkv.weight.storage_offset() + offset
                offset += part.numel()
            assert layer.gate_up.weight.data_ptr() == mlp.gate_proj.weight.data_ptr()
            assert mlp.up_proj.weight.data_ptr() == mlp.gate_proj.weight[-1].data_ptr() + 128 * 4
        assert sum(p.numel() for p in model.parameters()) == before
        ptr = weights.layers[0].qkv.weight.data_ptr()  # type: ignore[union-attr]
        assert fuse_projections(model, stack.linears) == 2 * model.config.num_hidden_layers  # idempotent
        assert read_weights(model, stack.linears).layers[0].qkv.weight.data_ptr() == ptr  # type: ignore[union-attr]
        assert torch.equal(model(input_ids=ids).logits, plain_forward)  # the eager path reads the same
        fused, fused_tokens = static_logits()
    assert fused_tokens == plain_tokens
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert plain_tokens[0::2] != plain_tokens[1::2]  # the adapter row differs: its deltas are applied


def test_buckets() -> None:
    assert buckets(1) == (1,) and buckets(8) == (1, 2, 4, 8) and buckets(32) == (1, 2, 4, 8, 16, 32)
    assert buckets(5) == (1, 2, 4, 5)


async def wait_for(condition: Any, seconds: float = 60.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def slot_of(engine: HfEngine, rid: str) -> int | None:
    return next((r.kv_slot for r in engine._batch.rows() if r.request_id == rid), None)


async def test_slots_are_freed_compacted_reused_and_sampling_stop_cancel_work(
    eager: HfEngine, compiled: HfEngine, specs: dict[str, AdapterSpec]
) -> None:
    decoder = compiled._batch.compiled
    graphs = decoder.graphs
    long = compiled.generate(request(PROMPTS[0], specs["lo"], n=200, rid="long"))
    first = [await long.__anext__()]
    other = compiled.generate(request(PROMPTS[1], n=200, rid="other"))
    other_events = [await other.__anext__()]
    assert (slot_of(compiled, "long"), slot_of(compiled, "other"), decoder.kv.in_use()) == (0, 1, 2)
    first.append(await long.__anext__())
    await long.aclose()  # cancelled: dropped before the next step, its slot 0 freed
    # the next step has one row: it moves from slot 1 to slot 0 (its K/V with it) and runs bucket 1
    other_events.append(await other.__anext__())
    await wait_for(lambda: slot_of(compiled, "other") == 0)
    late = compiled.generate(request(PROMPTS[2], specs["rs"], n=6, rid="late"))
    late_events = [await late.__anext__()]
    assert slot_of(compiled, "late") == 1 and decoder.kv.in_use() == 2  # the lowest free slot
    late_events += [e async for e in late]
    other_events += [e async for e in other]
    alone = [
        await collect(eager, request(PROMPTS[2], specs["rs"], n=6, rid="late-e")),
        await collect(eager, request(PROMPTS[1], n=200, rid="other-e")),
    ]
    assert tokens(late_events) == tokens(alone[0])
    assert tokens(other_events) == tokens(alone[1])  # the moved row decodes on as if never moved
    assert decoder.graphs == graphs  # 200 tokens: attention lengths 64 to 256, no new graph
    await wait_for(lambda: decoder.kv.in_use() == 0 and compiled.running() == 0)

    def sampled(rid: str) -> GenerationRequest:
        return request(PROMPTS[0], specs["rs"], n=12, rid=rid, temperature=1.0, top_p=0.9, top_k=40, seed=5)

    batched = await asyncio.gather(collect(compiled, sampled("s-c")), collect(compiled, request(PROMPTS[1])))
    assert tokens(batched[0]) == tokens(await collect(eager, sampled("s-e")))
    full = await collect(compiled, request(PROMPTS[1], n=16, rid="full"))
    text = "".join(e.text for e in full)
    assert len(text) >= 8, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = await collect(compiled, request(PROMPTS[1], n=16, rid="cut", stop=(stop,)))
    assert cut[-1].finish_reason == "stop" and "".join(e.text for e in cut) == text[: text.index(stop)]
    await wait_for(lambda: decoder.kv.in_use() == 0)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("precision", ["bf16", "int4"])
async def test_low_precision_compiled_equals_eager(tiny: ResolvedModel, precision: str) -> None:
    """bf16 activations (int4: torchao's int4 weights, bf16 activations): base rows equal the eager path
    token for token (inductor rounds bf16 as eager does). One bucket (B=1), no adapters, to keep the
    compile to one graph: the LoRA math is the fp32 test's. int4 compiles, or if inductor cannot take
    torchao's int4 tensor the same static step runs eagerly (the mode says which; both must match)."""
    engines = [
        await started(tiny, {}, precision=precision, max_concurrency=1, compile_decode=c)
        for c in (False, True)
    ]
    try:
        decoder = engines[1]._batch.compiled
        assert decoder is not None and decoder.mode in ("compiled", "eager")
        print(f"{precision}: the compiled decode path runs {decoder.mode}, {decoder.graphs} graphs")
        for i in range(2):
            got = [tokens(await collect(e, request(PROMPTS[i], n=12, rid=f"p{i}"))) for e in engines]
            assert got[0] == got[1], (precision, i)
        assert decoder.steps >= 2 * 11
    finally:
        for e in engines:
            await e.shutdown()


async def test_the_switch_off_is_the_old_path_and_the_flag_turns_it_on(
    tiny: ResolvedModel, eager: HfEngine
) -> None:
    from effllm.server.engine_args import EngineArgs, build_engine

    assert HfConfig().compile_decode is False
    assert eager._batch.compiled is None and "decode" not in eager.info.extra
    gen = eager.generate(request(PROMPTS[0], n=5, rid="old"))
    await gen.__anext__()
    group = eager._batch.groups[""]
    assert group.cache is not None and group.mask is not None  # transformers' DynamicCache, left-padded
    assert all(r.kv_slot == -1 for r in group.rows)
    await gen.aclose()

    for compile_decode, on in ((None, False), (True, True)):
        engine = build_engine(EngineArgs(engine="hf", model=str(tiny.path), compile_decode=compile_decode))
        assert isinstance(engine, HfEngine) and engine.config.compile_decode is on


def test_unsupported_model_keeps_the_eager_path(tmp_path: Path) -> None:
    """A model the static step is not written for is refused by name (the engine then decodes eagerly)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from effllm.server.engines.hf_compiled import CompiledDecoder
    from effllm.server.engines.hf_lora import StackedLora

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        CompiledDecoder(model, StackedLora(model, "cpu"), "cpu", 2, 64)


@pytest.mark.timeout(1800)
async def test_adapter_loads_of_new_shapes_mid_stream_keep_tokens_coming(
    tiny: ResolvedModel, eager: HfEngine, tmp_path: Path
) -> None:
    """Issue 27 item 3: adapters of a new rank and new target modules load while a stream decodes on a
    compiled engine. Each load returns before its shapes are compiled (the compile runs on its own
    thread), the stream never stops for it (its largest gap is far under the compile's time; on main the
    worker compiled inline and the stream waited the whole compile), rows on the new adapter start at once
    (eagerly) and go on the graphs once ready, and every token equals the eager engine's."""
    eng = await started(tiny, {}, max_concurrency=2, compile_decode=True)
    new: dict[str, AdapterSpec] = {}
    try:
        decoder = eng._batch.compiled
        assert decoder.ready() and eng.info.extra["decode"] == "compiled"
        plan = [("q8", "lora", 8, ("q_proj", "v_proj")), ("all24", "rslora", 24, ALL_LINEARS)]
        for name, method, rank, targets in plan:
            path = make_adapter(tiny.path, tmp_path / name, method=method, rank=rank, seed=7, targets=targets)
            new[name] = AdapterSpec(name, "1", path, method, rank, 2.0 * rank, targets)  # type: ignore[arg-type]
        stamps: list[float] = []
        events: list[TokenEvent] = []

        async def stream() -> None:
            async for e in eng.generate(request(PROMPTS[0], n=160, rid="long")):
                stamps.append(time.perf_counter())
                events.append(e)

        task = asyncio.create_task(stream())
        await wait_for(lambda: len(stamps) >= 5)
        adapted: list[list[int]] = []
        loaded: list[float] = []
        for spec in new.values():
            await asyncio.gather(eager.add_adapter(spec), eng.add_adapter(spec))
            loaded.append(time.perf_counter())
            # routable now, its shapes still compiling: its rows decode on the eager static step
            assert not decoder.ready() and eng.info.extra["decode"] == "eager"
            assert eng.info.extra["decode_eager_reason"] == "compiling new adapter shapes"
            adapted.append(tokens(await collect(eng, request(PROMPTS[1], spec, n=12, rid=f"a-{spec.name}"))))
            assert await asyncio.to_thread(decoder.wait_ready, 600)
            before = decoder.steps - decoder.eager_steps
            adapted.append(tokens(await collect(eng, request(PROMPTS[2], spec, n=12, rid=f"b-{spec.name}"))))
            assert decoder.steps - decoder.eager_steps > before  # on the new graphs
        await task
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        print(f"largest gap {max(gaps):.2f} s; background compiles {decoder.compile_s}")
        assert len(tokens(events)) == 160 and decoder.compiles == 2 and decoder.step_graphs == 0
        assert max(gaps) < min(decoder.compile_s) / 2, (max(gaps), decoder.compile_s)
        assert stamps[0] < loaded[0] < stamps[-1]  # the stream decoded through the first compile
        assert eng.info.extra["decode"] == "compiled"
        want = []
        for spec in new.values():
            for prompt in PROMPTS[1:]:
                want.append(tokens(await collect(eager, request(prompt, spec, n=12, rid=f"e-{spec.name}"))))
        assert adapted == want
        assert tokens(events) == tokens(await collect(eager, request(PROMPTS[0], n=160, rid="long-e")))
        assert len({tuple(t) for t in want}) == 4  # the adapters change the tokens: a wrong slot would show
    finally:
        await eng.shutdown()
        for spec in new.values():
            await eager.remove_adapter(spec.key)


def test_step_watch_falls_back_under_contention_and_resumes() -> None:
    """Issue 27 item 7, the rule alone on injected step times: compiled runs with rare eager probes; when
    compiled steps take over 1.5x eager's it falls back within a few steps, says why, probes compiled
    rarely while eager runs, and resumes compiled once compiled is no slower than eager again."""
    watch = StepWatch()

    def run(compiled_s: float, eager_s: float, steps: int) -> list[str]:
        paths = []
        for _ in range(steps):
            path = watch.choose(1)
            watch.record(path, 1, compiled_s if path == "compiled" else eager_s)
            paths.append(path)
        return paths

    calm = run(0.03, 0.05, 2000)  # uncontended: compiled is faster
    assert watch.current == "compiled" and watch.switches == 0 and calm.count("eager") <= 8
    busy = run(3.0, 0.08, 10)  # another process keeps a core busy: compiled 40x slower
    assert watch.current == "eager" and watch.switches == 1, busy
    assert re.fullmatch(r"contention: compiled [12]\.\d+ s/step vs eager 0\.080 at batch 1", watch.reason)
    still = run(3.0, 0.08, 2000)
    assert watch.current == "eager" and still.count("compiled") <= 8  # probing the slow path is rare
    resumed = run(0.03, 0.05, watch.max_every + 10)
    assert watch.current == "compiled" and watch.reason == "" and resumed[-1] == "compiled"
    run(0.06, 0.05, 2000)  # compiled a little slower than eager: within 1.5x, no switch
    assert watch.current == "compiled" and watch.switches == 2


async def test_compiled_engine_falls_back_to_eager_by_itself_when_its_steps_get_slow(
    compiled: HfEngine, eager: HfEngine, specs: dict[str, AdapterSpec]
) -> None:
    """The decoder times its steps (a fake clock here: compiled steps 3 s, eager 10 ms): it falls back to
    the eager static step mid-stream by itself, EngineInfo.extra says so and why, tokens stay right."""
    decoder = compiled._batch.compiled
    now = [0.0]

    def clock() -> float:
        now[0] += 0.01
        return now[0]

    real = decoder._fn

    def slow(*args: Any) -> Any:
        now[0] += 3.0
        return real(*args)

    decoder.clock, decoder._fn, decoder.watch = clock, slow, StepWatch()
    try:
        assert compiled.info.extra["decode"] == "compiled"
        got = tokens(await collect(compiled, request(PROMPTS[1], specs["lo"], n=20, rid="slow")))
        assert decoder.watch.current == "eager"
        assert compiled.info.extra["decode"] == "eager"
        assert compiled.info.extra["decode_eager_reason"].startswith("contention: compiled ")
        assert got == tokens(await collect(eager, request(PROMPTS[1], specs["lo"], n=20, rid="slow-e")))
    finally:
        decoder.clock, decoder._fn, decoder.watch = time.perf_counter, real, StepWatch()
    assert compiled.info.extra["decode"] == "compiled"
