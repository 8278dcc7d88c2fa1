"""What every entry point shares about its config: the resolvers the configs use, the value checks, and
the checks of a composed config that run before any work (the run lifecycle, vdvae.lifecycle, runs them).

Resolvers (registered on import, before Hydra composes anything):
- `${vdvae.cwd:}`          the absolute working directory; unlike `${hydra:runtime.cwd}` it also
                           resolves where Hydra's own config is not set yet (the sweep directory).
- `${vdvae.run_name:}`     `<date>_<time>_<6 hex>`: unique even for runs started in the same second,
                           on different machines; `slurm-<job id>` inside a SLURM job, `torchrun-<rdzv
                           id>` under torchrun (one name for all its processes). Cached, so one job sees
                           one name.
- `${vdvae.log_name:task}` the log file's name: `task` (train.log), `task_rank<N>` in rank N > 0 of a job
                           that srun or torchrun started (one writer a file).
- `${vdvae.run_dir:ckpt,base}`  the run directory of `ckpt` when it is `<run>/checkpoints/*.ckpt` of
                           a run made by this framework (resume in place), else `base/<run name>`.
- `${vdvae.hydra_subdir:dir}`   `.hydra` for a new run; `.hydra/resume_<run name>` when `dir` already
                           holds a run, so that resuming never overwrites the config a run started with;
                           null (nothing saved) in the further ranks of a multi-process run.
- `${vdvae.slurm:key,accelerator,devices}`  a SLURM resource of the job, from the trainer
                           (`launcher_default`; conf/hydra/launcher/slurm.yaml).
"""

import hashlib
import math
import numbers
import os
import re
import secrets
import time

from omegaconf import DictConfig, ListConfig, OmegaConf

from vdvae.errors import ConfigError, one_line
from vdvae.run_folder import holds_a_run, launcher_job_name, process_rank, run_of_checkpoint


def _run_name() -> str:
    # Under SLURM or torchrun every process of a job (several nodes) must find one folder: the job names it.
    return launcher_job_name() or f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


def _log_name(task_name) -> str:
    # One writer a file: a further rank started by srun or torchrun logs to `<task>_rank<N>.log` beside
    # rank 0's `<task>.log` (Lightning names its own DDP processes' logs `<task>_ddp_process_<N>.log`).
    rank = process_rank()
    return str(task_name) if rank == 0 else f"{task_name}_rank{rank}"


def is_worker_process() -> bool:
    """Whether this process is a further rank of a multi-process run (Lightning's DDP children, torchrun,
    srun tasks), which joins the directory its rank 0 made instead of starting a run of its own."""
    return any(os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def _run_dir(ckpt_path, base) -> str:
    run = run_of_checkpoint(ckpt_path)
    return str(run) if run is not None else f"{base}/{_run_name()}"


def _hydra_subdir(output_dir) -> str | None:
    if is_worker_process():
        return None  # rank 0 saves the config
    if holds_a_run(output_dir):
        return f".hydra/resume_{_run_name()}"
    return ".hydra"


# Config groups that make a command a sweep, no part of what its jobs run: left out of a study's name, and
# never taken from a checkpoint's recorded overrides (vdvae.resume).
SWEEP_CHOICES = ("hparams_search",)


def _study_name(objective, overrides) -> str:
    """An Optuna study's default name: what it optimises and the command's fixed overrides (not the searched
    ones), e.g. `val-bpd_trainer.max_steps-20`; past 100 characters, cut and ended by a hash of the whole."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides or []])
    fixed = sorted(o.input_line for o in parsed if not o.is_sweep_override() and o.key_or_group not in SWEEP_CHOICES)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join([str(objective), *fixed])).strip("-_.") or "study"
    if len(name) > 100:
        name = f"{name[:91]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


def register_resolvers():
    # use_cache: a job resolves its names once (Hydra copies the cache into every sweep job's config).
    OmegaConf.register_new_resolver("vdvae.cwd", os.getcwd, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vdvae.run_name", _run_name, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vdvae.run_dir", _run_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vdvae.hydra_subdir", _hydra_subdir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vdvae.log_name", _log_name, replace=True)
    OmegaConf.register_new_resolver("vdvae.slurm", launcher_default, replace=True)
    OmegaConf.register_new_resolver("vdvae.study_name", _study_name, replace=True)


def wanted_value(value, kind, low=None, high=None, *, nullable=False, open_low=False, infinite=False, nonzero=False):
    """None where `value` is a valid `kind`, else what it must be, in words. Kinds: "int", "number" (finite
    unless `infinite`: an infinite clipping threshold is no clipping; not 0 where `nonzero`) and "bool"
    (a bool is neither an int nor a number here). Within [low, high], or (low, high] with `open_low`."""
    if value is None and nullable:
        return None
    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    if kind == "int":
        ok, what = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        ok = ok and not math.isnan(value) and (infinite or not math.isinf(value)) and not (nonzero and value == 0)
        what = ("a number" if infinite else "a finite number") + (" other than 0" if nonzero else "")
    if ok:
        ok = (low is None or (value > low if open_low else value >= low)) and (high is None or value <= high)
    if ok:
        return None
    bounds = f" {'>' if open_low else '>='} {low}" if low is not None else ""
    bounds += f" and <= {high}" if high is not None else ""
    return what + bounds + (" (or null)" if nullable else "")


def _require(cfg, key, kind, low=None, high=None, **allowed):
    """cfg[key] must be a valid `kind` (`wanted_value`)."""
    value = OmegaConf.select(cfg, key, default=None)
    wanted = wanted_value(value, kind, low, high, **allowed)
    if wanted is not None:
        raise ConfigError(f"{key}={one_line(repr(value), 100)} is not valid: it must be {wanted}")


def device_count(devices) -> int | None:
    """How many devices `trainer.devices` names: a list's length, or a whole number (also written as a
    string); None where it leaves the count to Lightning ("auto")."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        return int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices
    return None


def _cpu_devices(trainer) -> int | None:
    """How many processes `trainer.devices` asks for when training runs on the CPU (None: not the CPU)."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ("cpu", "auto"):
        return None
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple, ListConfig)):
        return None  # Lightning refuses a list of CPU devices itself
    devices = device_count(devices)
    if devices is not None and accelerator == "auto":
        import torch  # only now: importing it takes seconds, and most configs never get here

        if torch.cuda.is_available():
            return None
    return devices


GPU_ACCELERATORS = ("gpu", "cuda")


def devices_per_node(accelerator, devices) -> int:
    """How many devices (and so tasks: one process each) `trainer.devices` asks for on each node."""
    n = device_count(devices)
    if n is not None and n > 0:
        return n
    if str(accelerator) not in GPU_ACCELERATORS:
        return 1  # `auto` on the CPU: one process
    raise ValueError(
        f"trainer.devices={devices!r} with trainer.accelerator={accelerator}: under hydra/launcher=slurm, say how "
        f"many GPUs each node gets (e.g. trainer.devices=4), which the job asks SLURM for"
    )


def launcher_default(key: str, accelerator, devices):
    """A SLURM resource of the job, from the trainer: one task per device; on GPUs (trainer.accelerator gpu or
    cuda) as many GPUs, 8 CPUs a task and 64 GB a node; otherwise no GPU, 1 CPU and 4 GB a task."""
    n = devices_per_node(accelerator, devices)
    on_gpus = str(accelerator) in GPU_ACCELERATORS
    values = {
        "tasks_per_node": n,
        "gpus_per_node": n if on_gpus else None,
        "cpus_per_task": 8 if on_gpus else 1,
        "mem_gb": 64 if on_gpus else 4 * n,
    }
    return values[key]


def check_model_and_data(vae, data):
    """The model (`model.vae` values) and the data config must agree on the images and the likelihood."""
    pairs = [("image_size", "image_size"), ("image_channels", "channels"), ("bits", "bits")]
    for model_key, data_key in pairs:
        if vae[model_key] != data[data_key] and not (model_key == "bits" and data.get("binarize", False)):
            raise ConfigError(
                f"model.vae.{model_key}={vae[model_key]} does not match data.{data_key}={data[data_key]}: "
                f"pick a model preset made for this data, or override one of the two"
            )
    if bool(data.get("binarize", False)) != (vae["likelihood"] == "bernoulli"):
        raise ConfigError(
            f"data.binarize={data['binarize']} needs model.vae.likelihood="
            f"{'bernoulli' if data['binarize'] else 'dmol'} (got {vae['likelihood']})"
        )


def check_no_nan(cfg, prefix: str = ""):
    """No number in the config is NaN: no option means it (infinities are checked where they mean something)."""
    for key in cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg)):
        name = f"{prefix}.{key}" if prefix else str(key)
        try:
            value = cfg[key]
        except Exception:  # an interpolation that only resolves inside the job (e.g. ${hydra:...})
            continue
        if OmegaConf.is_config(value) and key != "hydra":
            check_no_nan(value, name)
        elif isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{name}=nan is not valid: no option takes NaN")


# The metrics training logs (vdvae.lit_module logs these names; tests/test_sweeps.py checks a run's against
# them), which `optimized_metric` may name; plus `{val,test}/kl/group_<NN>`, the rate of each latent group.
STEP_METRICS = ("loss", "bpd", "distortion", "rate", "grad_norm", "skipped", "skipped_total", "skip_rate")
TRAIN_METRICS = (*STEP_METRICS, "bpd_avg")
EVAL_METRICS = ("loss", "bpd", "distortion", "rate", "nats_per_image", "n_images")


def metric_names(test: bool) -> list[str]:
    stages = ("val", "test") if test else ("val",)
    return [f"train/{k}" for k in TRAIN_METRICS] + [f"{s}/{k}" for s in stages for k in EVAL_METRICS]


def check_optimized_metric(cfg: DictConfig):
    """`optimized_metric`, what a sweep optimizes, must be a metric that training logs."""
    metric = cfg.get("optimized_metric")
    names = metric_names(bool(cfg.get("test")))
    group = re.fullmatch(r"(val|test)/kl/group_\d+", str(metric)) and (str(metric).startswith("val") or cfg.get("test"))
    if metric is not None and metric not in names and not group:
        when = "" if cfg.get("test") else " (with test=false)"
        raise ConfigError(
            f"optimized_metric={metric!r} is not a metric training logs{when}: choose one of {', '.join(names)}, "
            f"or <val|test>/kl/group_<NN>"
        )


def check_config(cfg: DictConfig):
    """Model, data and trainer values must make sense together, before any work starts."""
    check_no_nan(cfg)
    check_optimized_metric(cfg)
    check_model_and_data(cfg.model.vae, cfg.data)
    precision = str(OmegaConf.select(cfg, "trainer.precision", default=""))
    if precision.startswith("16") or precision == "transformer-engine":
        raise ConfigError(
            f"trainer.precision={precision} is not supported: fp16 loss scaling would take over the skip decision "
            f"of the fused optimizer; use trainer.precision=bf16-mixed (or 32-true)"
        )
    if precision.startswith("64"):
        raise ConfigError(
            f"trainer.precision={precision} is not supported: the data reach the model in float32; use "
            f"trainer.precision=32-true (or bf16-mixed)"
        )
    _require(cfg, "model.lr", "number", 0, open_low=True)
    _require(cfg, "model.grad_clip", "number", 0, open_low=True, infinite=True)
    _require(cfg, "model.ema_decay", "number", 0, 1)
    _require(cfg, "model.warmup_steps", "int", 0)
    if OmegaConf.select(cfg, "model.skip_threshold") not in (None, -1):  # -1 or null: no norm-based skip
        _require(cfg, "model.skip_threshold", "number", 0, open_low=True, infinite=True)
    _require(cfg, "model.eps", "number", 0, open_low=True)
    _require(cfg, "model.weight_decay", "number", 0)
    _require(cfg, "model.lr_min", "number", 0)
    _require(cfg, "model.decay_steps", "int", 1, nullable=True)
    _require(cfg, "model.decay_start", "int", 0, nullable=True)
    _require(cfg, "model.kl_warmup_steps", "int", 0)
    _require(cfg, "model.kl_balancing_steps", "int", 0)
    betas = OmegaConf.select(cfg, "model.betas", default=None)
    betas = list(betas) if isinstance(betas, (ListConfig, list, tuple)) else betas
    if not isinstance(betas, list) or len(betas) != 2 or any(wanted_value(b, "number", 0, 1) or b == 1 for b in betas):
        raise ConfigError(
            f"model.betas={one_line(repr(betas), 100)} is not valid: it must be two numbers in [0, 1), e.g. [0.9,0.9]"
        )
    for key in ("zdim", "width", "num_mixtures"):
        _require(cfg, f"model.vae.{key}", "int", 1, nullable=key == "num_mixtures")
    interval = OmegaConf.select(cfg, "trainer.val_check_interval", default=None)
    if (
        interval is not None
        and wanted_value(interval, "int", 1)
        and wanted_value(interval, "number", 0, 1, open_low=True)
    ):
        raise ConfigError(
            f"trainer.val_check_interval={one_line(repr(interval), 100)} is not valid: it must be a number of "
            f"updates (>= 1), a share of an epoch (> 0 and <= 1), or null"
        )
    grids = OmegaConf.select(cfg, "callbacks.image_grids", default=None)
    if grids is not None and grids.get("temperatures") is not None:
        check_temperatures("callbacks.image_grids.temperatures", grids.temperatures)
    _require(cfg, "data.batch_size", "int", 1)
    _require(cfg, "data.eval_batch_size", "int", 1, nullable=True)
    _require(cfg, "data.num_workers", "int", 0)
    _require(cfg, "seed", "int", 0, 2**32 - 1)  # the range numpy's and Lightning's seeding accept
    _require(cfg, "trainer.accumulate_grad_batches", "int", 1, nullable=True)
    _require(cfg, "trainer.max_steps", "int", -1, nullable=True)
    _require(cfg, "trainer.max_epochs", "int", -1, nullable=True)
    for key in ("gradient_clip_val", "gradient_clip_algorithm"):
        if OmegaConf.select(cfg, f"trainer.{key}", default=None) is not None:
            raise ConfigError(
                f"trainer.{key} is not used: the model clips the gradient norm itself, after measuring it for the "
                f"skip decision; set model.grad_clip (now {OmegaConf.select(cfg, 'model.grad_clip')}) instead"
            )
    check_trainer(cfg.get("trainer") or {})


def check_trainer(trainer):
    """The trainer's accelerator must exist on this machine, its CPU processes fit the cores, its DDP timeout
    be a time; under torchrun, the processes must share a run name (its rendezvous id)."""
    if str(trainer.get("accelerator", "auto")) in ("gpu", "cuda"):
        import torch  # only now: importing it takes seconds

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={trainer.accelerator}, but torch finds no CUDA GPU on this machine: use "
                f"trainer=cpu (or trainer=default: every device the machine has)"
            )
    if os.environ.get("TORCHELASTIC_RUN_ID") == "none" and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        raise ConfigError(
            "torchrun without --rdzv-id: every process must find the run's folder by one name; give "
            "`torchrun --rdzv-id <a name for this run> ...` (or --standalone on one machine)"
        )
    strategy = trainer.get("strategy")
    if isinstance(strategy, (DictConfig, dict)) and "timeout_s" in strategy:
        wanted = wanted_value(strategy.get("timeout_s"), "number", 0, open_low=True)
        if wanted:
            raise ConfigError(
                f"trainer.strategy.timeout_s={strategy.get('timeout_s')} is not valid: the seconds a process waits "
                f"for the others in a collective before the run fails, {wanted}"
            )
    devices, cores = _cpu_devices(trainer), os.cpu_count() or 1
    if devices is not None and devices > cores:
        raise ConfigError(
            f"trainer.devices={devices} on the CPU would start {devices} processes on {cores} cores: "
            f"use trainer.devices={cores} or fewer (or a GPU machine)"
        )


# What sample.py and compress.py can do.
SAMPLE_MODES = ("samples", "reconstruct", "interpolate", "encode", "decode", "overview")
COMPRESS_MODES = ("compress", "decompress")


# The options of eval.py, sample.py and compress.py: (key, kind, low, high, allowed).
REQUEST_OPTIONS = {
    "eval": [
        ("iw_samples", "int", 0, None, {}),
        ("iw_chunk", "int", 1, None, {}),
        ("batch_size", "int", 1, None, {"nullable": True}),
        ("prune_quantile", "number", 0, 1, {"nullable": True, "open_low": True}),
        ("prune_images", "int", 1, None, {}),
    ],
    "sample": [
        ("n", "int", 1, None, {}),
        ("n_images", "int", 1, None, {}),
        ("steps", "int", 2, None, {}),
        ("batch_size", "int", 1, None, {"nullable": True}),
    ],
    "compress": [
        ("n_images", "int", 1, None, {"nullable": True}),
        ("bin_width", "number", 0, None, {"open_low": True}),
        ("latent_range", "number", 0, None, {"open_low": True}),
        ("batch_size", "int", 1, None, {}),
    ],
}


def check_temperatures(key: str, temperatures):
    """Each temperature a finite number >= 0, or a list of such (one per latent group)."""
    flat = []
    for t in temperatures if isinstance(temperatures, (ListConfig, list, tuple)) else [temperatures]:
        flat += list(t) if isinstance(t, (ListConfig, list, tuple)) else [t]
    bad = [t for t in flat if wanted_value(t, "number", 0)]
    if bad or not flat:
        raise ConfigError(
            f"{key}={one_line(repr(temperatures), 100)} is not valid: each temperature must be a finite number >= 0 "
            f"(or a list of such, one per latent group)"
        )


def check_mode(cfg: DictConfig):
    """eval.py, sample.py and compress.py: the options' values, the mode, and what it needs."""
    task = cfg.get("task_name")
    for key, kind, low, high, allowed in REQUEST_OPTIONS.get(task, []):
        if key in cfg:
            _require(cfg, key, kind, low, high, **allowed)
    if task == "sample" and cfg.get("temperatures") is not None:
        check_temperatures("temperatures", cfg.temperatures)
    if task == "sample":
        if cfg.mode not in SAMPLE_MODES:
            raise ConfigError(f"mode={cfg.mode!r}: choose one of {', '.join(SAMPLE_MODES)}")
        ks = cfg.get("ks")
        if ks is not None and (not isinstance(ks, ListConfig) or any(wanted_value(k, "int", 0) for k in ks)):
            raise ConfigError(f"ks={one_line(repr(ks), 100)}: a list of group counts, each 0 or more (e.g. ks=[0,1,4])")
        if cfg.mode == "decode" and not cfg.latents:
            raise ConfigError("mode=decode needs latents=<file written by mode=encode>")
        if cfg.mode == "interpolate" and not cfg.inputs and cfg.n_images < 2:
            raise ConfigError(f"mode=interpolate needs two images or more: n_images={cfg.n_images}")
    if task == "compress":
        if cfg.mode not in COMPRESS_MODES:
            raise ConfigError(f"mode={cfg.mode!r}: choose one of {', '.join(COMPRESS_MODES)}")
        if cfg.mode == "decompress" and not cfg.file:
            raise ConfigError("mode=decompress needs file=<a file written by mode=compress>")


register_resolvers()
