"""effllm.tuner: the adjacent tuning process — LoRA, LoRA+, rsLoRA, DoRA (PEFT), freezing and full tuning.

Where to look:
  config.py   TuneConfig, the one schema (YAML and flags map onto it)
  data.py     JSONL / task: / hf: data, validation with line numbers, loss masks; tasks.py the synthetic tasks
  methods.py  which parameters train and the optimizer (PEFT's create_loraplus_optimizer for LoRA+)
  train.py    the training loop, evaluation (held-out loss, exact match), measurement
  export.py   atomic output dir with manifest.json + metrics.json; publish.py into a server's adapter root
  worker.py   one job end to end (also a child-process entry); jobs.py + service.py: TuningService
  policy.py   the roots a job's paths must stay in; limits.py the bounds on jobs held and on one job's size
  events.py   the typed events a run sends (worker stdout -> JobManager -> WatchJob), one JSON line each
  synthetic.py random PEFT adapters on a real base, for benchmarks and tests (no training)
  (the tuning benchmark, our loop vs PEFT + HF Trainer, is bench/tuning.py: `effllm bench tuning`)
The tuner talks to the server only over gRPC and through the adapter directory.
"""
