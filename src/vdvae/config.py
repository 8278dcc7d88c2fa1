"""What every entry point shares about its config: the resolvers the configs use, the checks that run
before any work, and the Hydra callback that guards run directories.

Resolvers (registered on import, before Hydra composes anything):
- `${vdvae.cwd:}`          the absolute working directory; unlike `${hydra:runtime.cwd}` it also
                           resolves where Hydra's own config is not set yet (the sweep directory).
- `${vdvae.run_name:}`     `<date>_<time>_<6 hex>`: unique even for runs started in the same second,
                           on different machines; `slurm-<job id>` inside a SLURM job (one name for all
                           its tasks). Cached, so one job sees one name.
- `${vdvae.run_dir:ckpt,base}`  the run directory of `ckpt` when it is `<run>/checkpoints/*.ckpt` of
                           a run made by this framework (resume in place), else `base/<run name>`.
- `${vdvae.hydra_subdir:dir}`   `.hydra` for a new run; `.hydra/resume_<run name>` when `dir` already
                           holds a run, so that resuming never overwrites the config a run started with;
                           null (nothing saved) in the further ranks of a multi-process run.
"""

import contextlib
import logging
import math
import numbers
import os
import re
import secrets
import shutil
import time
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# Checkpoints of a run live in <run>/checkpoints; a run dir holds .hydra/config.yaml.
CHECKPOINT_DIR = "checkpoints"


class ConfigError(ValueError):
    """The composed config is inconsistent; the message names the options involved."""


def _run_name() -> str:
    # Under SLURM every task of a job (several nodes) must find one directory: the job's id names it.
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{array_task}" if array_task else "")
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


def is_worker_process() -> bool:
    """Whether this process is a further rank of a multi-process run (Lightning's DDP children, torchrun,
    srun tasks), which joins the directory its rank 0 made instead of starting a run of its own."""
    return any(os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def holds_a_run(directory) -> bool:
    """Whether `directory` is the run directory of an earlier run (Hydra saved its config there)."""
    return (Path(str(directory)) / ".hydra" / "config.yaml").is_file()


def run_of_checkpoint(ckpt_path) -> Path | None:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/x.ckpt` with `<run>/.hydra`), if any."""
    if not ckpt_path or str(ckpt_path).startswith("wandb:"):
        return None
    path = Path(str(ckpt_path)).expanduser().absolute()
    run = path.parent.parent
    if path.parent.name == CHECKPOINT_DIR and holds_a_run(run):
        return run
    return None


def _run_dir(ckpt_path, base) -> str:
    run = run_of_checkpoint(ckpt_path)
    return str(run) if run is not None else f"{base}/{_run_name()}"


def _hydra_subdir(output_dir) -> str | None:
    if is_worker_process():
        return None  # rank 0 saves the config
    if holds_a_run(output_dir):
        return f".hydra/resume_{_run_name()}"
    return ".hydra"


def register_resolvers():
    # use_cache: a job resolves its names once (Hydra copies the cache into every sweep job's config).
    OmegaConf.register_new_resolver("vdvae.cwd", os.getcwd, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vdvae.run_name", _run_name, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vdvae.run_dir", _run_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vdvae.hydra_subdir", _hydra_subdir, use_cache=True, replace=True)


register_resolvers()


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
        raise ConfigError(f"{key}={value!r} is not valid: it must be {wanted}")


def _cpu_devices(trainer) -> int | None:
    """How many processes `trainer.devices` asks for when training runs on the CPU (None: not the CPU)."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ("cpu", "auto"):
        return None
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or isinstance(devices, bool):
        return None
    if accelerator == "auto":
        import torch  # only now: importing it takes seconds, and most configs never get here

        if torch.cuda.is_available():
            return None
    return devices


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


# The metrics training logs (vdvae.lit_module; tests/test_sweeps.py checks a run's against these), which
# `optimized_metric` may name; plus `{val,test}/kl/group_<NN>`, the rate of each latent group.
TRAIN_METRICS = ("loss", "bpd", "distortion", "rate", "grad_norm", "skipped", "skipped_total", "skip_rate", "bpd_avg")
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
    """The trainer's accelerator must exist on this machine, and its CPU processes fit the cores."""
    if str(trainer.get("accelerator", "auto")) in ("gpu", "cuda"):
        import torch  # only now: importing it takes seconds

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={trainer.accelerator}, but torch finds no CUDA GPU on this machine: use "
                f"trainer=cpu (or trainer=default: every device the machine has)"
            )
    devices, cores = _cpu_devices(trainer), os.cpu_count() or 1
    if devices is not None and devices > cores:
        raise ConfigError(
            f"trainer.devices={devices} on the CPU would start {devices} processes on {cores} cores: "
            f"use trainer.devices={cores} or fewer (or a GPU machine)"
        )


def route_library_logs():
    """Lightning's messages and Python warnings go through Hydra's handlers, into the console and the run's
    log file once each: Lightning gives its loggers their own console handler when imported before Hydra
    configures logging, and stops them from reaching the root logger."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
    logging.captureWarnings(True)
    # ResumableSampler continues an epoch where the checkpoint left it (tests/test_reliability.py), which
    # Lightning cannot see: its warning that a mid-epoch resume is unreliable does not apply.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # A machine with SLURM's client installed runs local jobs too; SLURM jobs are started by srun (vdvae.slurm).
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    # Lightning 2.6's own use of torch's pytree API, deprecated by torch 2.14: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


# The run directory this process's job created (set by RunDirGuard as the job starts), or None: one that
# existed before (a folder of the user's, a run being resumed or requeued) is never removed.
_created_run_dir: Path | None = None


@contextlib.contextmanager
def no_run_dir_on_failure():
    """A failure in the block (bad input, checked before any work) deletes what Hydra wrote for this run,
    if that is all there is and this run created the directory, and re-raises."""
    try:
        yield
    except Exception:
        remove_empty_run_dir()
        raise


def remove_empty_run_dir():
    """Delete this run's directory if this run created it and it holds nothing but what Hydra wrote for it
    (its config and log) and empty folders (a logger's): nothing of a user's, an earlier run's or a resumed
    run's is ever removed."""
    try:
        out = Path(HydraConfig.get().runtime.output_dir).absolute()
        log_file = f"{HydraConfig.get().job.name}.log"
    except ValueError:  # not under Hydra
        return
    if out != _created_run_dir or not out.is_dir() or out.is_symlink():
        return
    for folder, subfolders, files in os.walk(out):
        where = Path(folder).relative_to(out)
        if where.parts[:1] == (".hydra",):
            continue
        links = [d for d in subfolders if (Path(folder) / d).is_symlink()]
        if links or (files and (where != Path(".") or files != [log_file])):
            return  # something this run made that may be worth keeping
    shutil.rmtree(out)


def _entries(directory) -> set[str] | None:
    """The names in `directory`, or None if it does not exist."""
    path = Path(str(directory)).expanduser().absolute()
    return {p.name for p in path.iterdir()} if path.is_dir() else None


def check_resume_on_meta(config: DictConfig):
    """The checkpoint to resume from must be readable and fit the configured model (built on the meta
    device: shapes only, no memory), before a run directory exists. The file is read first: a wrong one
    is refused before Lightning is imported."""
    from vdvae.checkpoints import check_fits, load_checkpoint

    checkpoint = load_checkpoint(config.ckpt_path, mmap=True)
    import torch
    from hydra.utils import instantiate

    with torch.device("meta"):
        module = instantiate(config.model)  # imports Lightning
    check_fits(checkpoint, config.ckpt_path, module)


# What sample.py and compress.py can do.
SAMPLE_MODES = ("samples", "reconstruct", "interpolate", "encode", "decode", "overview")
COMPRESS_MODES = ("compress", "decompress")


def check_mode(cfg: DictConfig):
    """sample.py and compress.py: the mode, and what it needs."""
    task = cfg.get("task_name")
    if task == "sample":
        if cfg.mode not in SAMPLE_MODES:
            raise ConfigError(f"mode={cfg.mode!r}: choose one of {', '.join(SAMPLE_MODES)}")
        if cfg.mode == "decode" and not cfg.latents:
            raise ConfigError("mode=decode needs latents=<file written by mode=encode>")
        if cfg.mode == "interpolate" and not cfg.inputs and cfg.n_images < 2:
            raise ConfigError(f"mode=interpolate needs two images or more: n_images={cfg.n_images}")
    if task == "compress":
        if cfg.mode not in COMPRESS_MODES:
            raise ConfigError(f"mode={cfg.mode!r}: choose one of {', '.join(COMPRESS_MODES)}")
        if cfg.mode == "decompress" and not cfg.file:
            raise ConfigError("mode=decompress needs file=<a file written by mode=compress>")


def check_request(cfg: DictConfig):
    """eval.py, sample.py, compress.py: the mode, and the checkpoint the request names (readable, a vdvae
    checkpoint, and its data config plain data where it will be used), before any work."""
    check_mode(cfg)
    check_trainer(cfg.get("trainer") or {})
    from vdvae.checkpoints import check_checkpoint

    check_checkpoint(cfg.ckpt_path, stored_data=cfg.get("data") is None)


class RunDirGuard(Callback):
    """Refuses, before Hydra creates or writes anything, a run directory that holds another run; and notes
    which directories Hydra is about to create, so that only those are ever removed (`remove_empty_run_dir`).

    A run may write into an existing run's directory only to resume it (`ckpt_path=<run>/checkpoints/...`).
    """

    def __init__(self):
        # What existed before Hydra made anything: the run directory (single runs), or the sweep directory
        # and its entries (multirun; the guard travels to the jobs' processes with Hydra's callbacks).
        self.existed: dict[str, set[str] | None] = {}

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.existed = {"run": _entries(config.hydra.run.dir)}
        # Hydra turns a callback's exception into a warning and goes on: stop the run with its message instead.
        try:
            self.check(config)
        except Exception as error:
            raise SystemExit(f"Error: {error}") from None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.existed = {"sweep": _entries(config.hydra.sweep.dir)}
        if config.get("model") is not None:  # a training sweep: what it optimizes, before its first job
            try:
                check_optimized_metric(config)
            except ConfigError as error:
                raise SystemExit(f"Error: {error}") from None

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        global _created_run_dir
        out = Path(str(config.hydra.runtime.output_dir)).absolute()
        if "run" in self.existed:
            created = self.existed["run"] is None
        else:  # a sweep's job: its directory is new if the sweep's was, or if the sweep's lacked it
            sweep = Path(str(config.hydra.sweep.dir)).absolute()
            before = self.existed.get("sweep")
            created = out.parent == sweep and (before is None or out.name not in before)
        _created_run_dir = out if created and not is_worker_process() else None

    def check(self, config: DictConfig):
        is_training = config.get("model") is not None
        if is_training:
            check_config(config)
            if config.get("ckpt_path"):
                check_resume_on_meta(config)
        elif config.get("task_name") in ("eval", "sample", "compress"):
            check_request(config)
        run_dir = Path(str(config.hydra.run.dir)).expanduser().absolute()
        if not holds_a_run(run_dir) or is_worker_process():
            return
        if is_training and run_of_checkpoint(config.get("ckpt_path")) == run_dir:
            return
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds an earlier run: a new run never writes into it. Resume that run with "
            f"ckpt_path={run_dir / CHECKPOINT_DIR / 'last.ckpt'}, or leave hydra.run.dir unset for a new directory"
        )
