"""effllm.server: `effllm serve` — one base model behind a gRPC server, with LoRA-family adapters.

Where to look:
  app.py       assemble and run: services, interceptors, health, reflection, start-up, drain, the watchdog
  service.py   GenerationService: validation (Limits), proto <-> GenerationRequest, errors -> status
  runner.py    admission (slots, bounded queue), prompt preparation and adapter lease before it, timings
  auth.py      bearer tokens (two roles) and TLS; cli.py: flags -> ServerConfig + engine
  faults.py    failpoints for the fault tests (off unless EFFLLM_FAILPOINTS is set)
  engines/     base.py the Engine protocol and the dataclasses crossing it; prompting.py render + length
               check; vllm_engine.py (default); hf_engine.py + hf_batch.py + hf_text.py + hf_int4.py (hf)
  adapters/    validate, snapshot, registry, AdapterService (see adapters/__init__.py)
The request path, layer by layer: docs/architecture.md. Nothing above engines/ imports torch.
"""
