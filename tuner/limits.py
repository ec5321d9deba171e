"""TunerLimits: how much one `effllm tuner serve` takes on — jobs held, jobs kept, and the size of one job.

A job comes from the network, so its sizes are hostile too: `n_train=2147483647` would grow a worker towards
OOM while it generates data, 3,000 SubmitJob calls would be 3,000 records kept for ever. This dataclass is
the one source of the defaults; `effllm tuner serve` has one flag per field (`--max-jobs 16`), and the
JobManager and the service read them from here. `effllm tune` (local, the user's own machine) is unbounded.
Invariant: `check_job` refuses a job past any bound with a ConfigError naming the job field and the rule,
before any process starts; the data rule is computed from memory, not a fixed count alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .config import ConfigError, TuneConfig

# The data a worker holds before it trains, per example: a generated or read record (~0.85 KiB measured for
# the built-in tasks, rounded up to 2 KiB) plus its encoded ids and labels (Python ints in two lists: ~80 B
# per token of max_length). Exact enough to bound; the refusal states the rule.
RECORD_BYTES = 2048
TOKEN_BYTES = 80
_MIB = 1 << 20


@dataclass(frozen=True)
class TunerLimits:
    # jobs
    max_running: int = 1  # jobs training at once; the rest wait (0: none runs, for tests)
    max_jobs: int = 32  # queued + running; SubmitJob past it is RESOURCE_EXHAUSTED
    max_finished_jobs: int = 64  # finished jobs kept for WatchJob/ListJobs; the oldest are forgotten first
    finished_job_ttl_s: float = 24 * 3600.0  # and none is kept longer than this after it ended
    cancel_grace_s: float = 3.0  # CancelJob: SIGTERM, then SIGKILL after this long
    # one job's size
    memory_budget_mb: int = 0  # data a job may hold (rule above); 0: half the memory available at submit
    max_n_train: int = 1_000_000
    max_n_eval: int = 2_000
    max_steps: int = 1_000_000  # max_steps, warmup_steps, and epochs x steps per epoch
    max_epochs: int = 100
    max_length: int = 8192  # max_length; pack_length up to twice it
    max_batch_size: int = 256
    max_grad_accum: int = 256
    max_batch_tokens: int = 65_536  # batch_size x row length (max_length, or pack_length when packing)
    max_rank: int = 256
    max_eval_max_new_tokens: int = 1024
    max_list_items: int = 256  # target_modules, layers

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            floor = 0 if f.name in ("max_running", "memory_budget_mb", "max_finished_jobs") else 1
            if not value >= floor:
                raise ValueError(f"--{f.name.replace('_', '-')}: {value} must be >= {floor}")
        if self.cancel_grace_s > 60:
            raise ValueError(f"--cancel-grace-s: {self.cancel_grace_s} must be <= 60")

    def data_budget_bytes(self) -> tuple[int, str]:
        """The bytes of data one job may hold, and where that figure comes from (for the refusal)."""
        if self.memory_budget_mb:
            return self.memory_budget_mb * _MIB, f"--memory-budget-mb {self.memory_budget_mb}"
        import psutil

        return psutil.virtual_memory().available // 2, "half the memory available now"

    def check_job(self, config: TuneConfig) -> None:
        """ConfigError naming the first job field past a bound (INVALID_ARGUMENT in the service)."""
        for name, bound in (
            ("n_train", self.max_n_train),
            ("n_eval", self.max_n_eval),
            ("max_steps", self.max_steps),
            ("warmup_steps", self.max_steps),
            ("epochs", self.max_epochs),
            ("max_length", self.max_length),
            ("pack_length", 2 * self.max_length),
            ("batch_size", self.max_batch_size),
            ("grad_accum", self.max_grad_accum),
            ("rank", self.max_rank),
            ("eval_max_new_tokens", self.max_eval_max_new_tokens),
        ):
            value = getattr(config, name)
            if value > bound:
                raise ConfigError(f"{name}: {value} is over this tuner's limit {bound}")
        for name in ("target_modules", "layers"):
            if len(getattr(config, name)) > self.max_list_items:
                raise ConfigError(f"{name}: more than {self.max_list_items} items")
        row = (config.pack_length or 2 * config.max_length) if config.packing else config.max_length
        if config.batch_size * row > self.max_batch_tokens:
            raise ConfigError(
                f"batch_size: {config.batch_size} rows x {row} tokens is over this tuner's limit of "
                f"{self.max_batch_tokens} tokens per micro-batch"
            )
        need = (config.n_train + config.n_eval) * (RECORD_BYTES + TOKEN_BYTES * config.max_length)
        budget, source = self.data_budget_bytes()
        if need > budget:
            raise ConfigError(
                f"n_train: (n_train {config.n_train} + n_eval {config.n_eval}) x ({RECORD_BYTES} B + "
                f"{TOKEN_BYTES} B x max_length {config.max_length}) = {need / _MIB:.0f} MiB of data "
                f"is over this tuner's budget of {budget / _MIB:.0f} MiB ({source})"
            )
        per_step = config.batch_size * config.grad_accum
        steps = config.epochs * -(-config.n_train // per_step)  # what epochs mean when max_steps is 0
        if not config.max_steps and steps > self.max_steps:
            raise ConfigError(
                f"epochs: {config.epochs} epochs of n_train {config.n_train} at {per_step} examples a step "
                f"are {steps} steps, over this tuner's limit {self.max_steps}; set max_steps"
            )
