"""effllm.telemetry: OpenTelemetry set-up, GenAI spans and metrics, energy meters, the resource sampler
and the EfficientLLM formulas — shared by the server, the tuner and the load tests.

Where to look:
  tracing.py      providers and exporters from flags / OTEL_* (file, OTLP gRPC/HTTP, Prometheus);
                  `adapter_span()` for the adapter registry
  genai.py        the per-request SERVER span and the gen_ai.* histograms; `set_resident_adapters_source()`
  serving.py      all of it started/stopped for `effllm serve`
  energy.py       NVML / RAPL / CPU-time estimate behind one Protocol (`select_meter()`)
  attribution.py  per-request energy (equal share among the requests running at the same time)
  sampler.py      10 Hz resource sampler and `Measurement` (AMU, PCU, AEC, J over a block of code)
  metrics.py      the EfficientLLM formulas as pure functions
  otlpjson.py     OTLP/JSON lines writer and reader; report.py + cli.py: `effllm report`
Nothing here imports torch or the server.
"""
