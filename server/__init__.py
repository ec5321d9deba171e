"""effllm.server: `effllm serve` — one base model behind a gRPC server, with LoRA-family adapters.

Where to look:
  app.py       assemble and run: services, interceptors, health, reflection, start-up, drain, the watchdog
  service.py   GenerationService: validation (Limits), proto <-> GenerationRequest, errors -> status
  runner.py    admission (slots, bounded queue), prompt preparation and adapter lease before it, timings
  variants.py  the variants one server hosts (--variant): engine + runner + live figures with their spread
               each, start-up quality and figures, bounded exploration, adapters loaded into every variant
               that can serve them
  router.py    pick a variant per request: predicted TTFT/TPOT under load, budget, objective, ties within
               the figures' spread (pure)
  cli.py       flags -> ServerConfig + EngineArgs (auth flags and the interceptor: common/auth.py)
  engine_args.py  EngineArgs (the engine flags and their defaults) -> engines: the `auto` policy, hf or vLLM
  defaults.py  the model's sampling defaults (generation_config.json, read as untrusted input)
  logs.py      the quiet console: effllm's lines on stderr, every library's records in RUN_DIR/server.log
  telemetry_rpc.py  GetTelemetry: the server's resource samples and per-request figures over the wire
  lifeline.py  engine child processes die with the server (parent-death signal), even on SIGKILL
  faults.py    failpoints for the fault tests (off unless EFFLLM_FAILPOINTS is set)
  engines/     base.py the Engine protocol and the dataclasses crossing it; prompting.py render + length
               check; vllm_engine.py (default); hf_engine.py + hf_batch.py (one step for all rows) +
               hf_decoder.py (the Decoder protocol, eager decoder) +
               hf_lora.py (stacked LoRA/rsLoRA, batched per-row deltas) + hf_text.py + hf_int4.py (hf);
               hf_compiled.py + hf_static.py (--compile-decode: static KV cache, one compiled step)
  adapters/    validate, snapshot, registry, AdapterService (see adapters/__init__.py)
The request path, layer by layer: docs/architecture.md. Nothing above engines/ imports torch.
"""
