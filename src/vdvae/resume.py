"""Resume, in one place: what a checkpoint must hold beyond Lightning's own state for a resumed run to
continue bit for bit, the checks that a checkpoint fits the configured run, and finding the `last.ckpt`
that a requeued job resumes from.

`ResumeState`, a callback that training always has, writes into every checkpoint every rank's generator
states (torch, numpy, Python, this process's GPU), the cosine's length (it may follow trainer.max_steps),
the data config (evaluation and sampling read the data from it), the run's identity, the W&B run id (a resumed run
continues its W&B run) and the overrides of the command that made the run (`ckpt_path=` alone resumes it with
them: `with_recorded_overrides`), and records a save between two epochs as the next epoch's start. As training
starts it restores the generators, applies this run's optimizer settings over the restored ones (with a
warning where they differ: resuming with a lower model.lr rescues a diverging run) and warns where the
cosine's length changed.
"""

import logging
import os
import random

import numpy as np
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning import Callback
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from vdvae import run_folder
from vdvae.checkpoints import CheckpointError, load_checkpoint, state_mismatch
from vdvae.config import SWEEP_CHOICES
from vdvae.errors import ConfigError, one_line, refuse
from vdvae.schedule import cosine_length, lr_factor

log = logging.getLogger(__name__)


def previous_last_checkpoint() -> str | None:
    """`last.ckpt` of this job's run directory if it already has one: the job is a requeued one (a SLURM
    job that submitit resubmits with its original overrides into the same directory), which resumes."""
    folder = run_folder.current()
    if folder is None:
        return None
    return check_last_is_own(folder, run_folder.own_identity())


def check_last_is_own(folder, identity: str | None) -> str | None:
    """The `last.ckpt` in run folder `folder` that a requeued run with `identity` resumes from, if there is
    one: only one that this run wrote (its identity is in it), never whatever sits in the folder."""
    last = run_folder.last_checkpoint(folder)
    if not last.is_file():
        return None
    written_by = load_checkpoint(last).get("run_id")
    if written_by != identity:
        raise ConfigError(
            f"{last} was not written by this run (run {one_line(str(written_by), 80)}, this is run {identity}): "
            f"nothing resumed from it, nothing written; resume it explicitly with ckpt_path={last}"
        )
    return str(last)


# The checkpoint's key for the overrides of the command that made the run (Hydra's task overrides).
OVERRIDES = "overrides"
# What an override read from a file may not mention: the keys that make Hydra's instantiate run code.
_CODE = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def _key(override: str) -> tuple | None:
    """An override's key and package (`model`, `trainer.max_steps`, ...), or None if it does not parse."""
    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except Exception:
        return None
    return parsed.key_or_group, parsed.package


def with_recorded_overrides(argv: list[str]) -> list[str]:
    """`argv` of `train.py ... ckpt_path=<checkpoint> ...` with the overrides of the command that made that
    checkpoint's run added after `ckpt_path` (those whose key is not typed now): resuming needs `ckpt_path`
    alone, plus what changes (`trainer.max_steps=...`). The recorded overrides are data: any that names code
    or Hydra's own settings is refused in one line. Also for a sweep (`-m ... ckpt_path=...`, e.g. on SLURM:
    its jobs start from the checkpoint in folders of their own). Unchanged for a checkpoint that is not a
    local file or records no overrides (the run's checks then say what does not fit)."""
    typed = [(i, arg) for i, arg in enumerate(argv) if i > 0 and "=" in arg and not arg.startswith("-")]
    keys = {_key(arg): i for i, arg in typed}
    at = keys.get(("ckpt_path", None))
    if at is None:
        return argv
    (value,) = (o.value() for o in OverridesParser.create().parse_overrides([argv[at]]))
    if not isinstance(value, str) or not os.path.isfile(value):
        return argv
    try:
        overrides = load_checkpoint(value).get(OVERRIDES)
    except (CheckpointError, OSError):
        return argv  # the run's own checks explain it
    if overrides is None:
        return argv
    if not isinstance(overrides, list) or len(overrides) > 1000 or not all(isinstance(o, str) for o in overrides):
        refuse(f"{value}: its recorded overrides are not a list of strings; the file is damaged or crafted")
    # Those typed now win; a sweep's own choice (an Optuna trial records hparams_search=optuna) is no part of
    # the run's config.
    recorded = []
    for override in overrides:
        key = _key(override)
        if key not in keys and (key is None or key[0] not in SWEEP_CHOICES):
            recorded.append(override)
    _check_recorded(recorded, value)
    return argv[: at + 1] + recorded + argv[at + 1 :]


def _check_recorded(overrides: list[str], path):
    """Refuse, in one line, recorded overrides that are not plain settings (see _CODE)."""
    for override in overrides:
        key = _key(override)
        why = (
            "it does not parse"
            if key is None
            else "it sets Hydra's own settings (launchers, callbacks, the run's folder)"
            if key[0].startswith("hydra")
            else "it names another checkpoint"
            if key[0] == "ckpt_path"
            else "it names code to run"
            if any(word in override for word in _CODE)
            else None
        )
        if why:
            refuse(
                f"{path}: its recorded override {one_line(repr(override), 100)} is refused ({why}); a checkpoint "
                f"is data, never code: type that override yourself to keep it (or one of the same key to replace it)"
            )


class ResumeState(Callback):
    """Writes and restores what an exact resume needs beyond Lightning's state (see the module's docstring).
    `data_config`: the data module's config as plain values."""

    def __init__(self, data_config: dict | None = None):
        self.data_config = data_config
        self.restored: dict | None = None

    def on_save_checkpoint(self, trainer, module, checkpoint):
        checkpoint["rng_states"] = _rng_states_of_every_rank()
        identity = run_folder.own_identity()
        if identity is not None:  # what a requeued job resumes from (previous_last_checkpoint)
            checkpoint["run_id"] = identity
        if module.hparams.lr_schedule == "cosine":  # its length may follow trainer.max_steps
            checkpoint["cosine_length"] = cosine_length(module.hparams, trainer.max_steps)
        if self.data_config is not None:
            checkpoint["data_config"] = self.data_config
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["wandb_run_id"] = logger.version
                if trainer.is_global_zero:  # (other ranks have no W&B run)
                    checkpoint["wandb_group"] = logger.experiment.group  # eval's W&B run joins it
        checkpoint[OVERRIDES] = [o for o in run_folder.overrides() if _key(o) != ("ckpt_path", None)]
        _start_the_next_epoch_if_this_one_ended(checkpoint)

    def on_load_checkpoint(self, trainer, module, checkpoint):
        self.restored = {key: checkpoint.get(key) for key in ("rng_states", "cosine_length")}

    def on_train_start(self, trainer, module):
        restored, self.restored = self.restored or {}, None
        _apply_configured_optimizer_settings(trainer, module)
        _warn_if_the_cosine_changed(trainer, module, restored.get("cosine_length"))
        states = restored.get("rng_states")
        if states and len(states) == trainer.world_size:
            _set_rng_state(states[trainer.global_rank])
        elif trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)  # distinct noise on every rank


def _rng_states_of_every_rank() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)  # weights-only safe
    state = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state,
        "python": random.getstate(),
        # This process's own GPU only: a resume on a machine with fewer GPUs, or with this rank on
        # another device index, restores it all the same.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(own_cuda_state(state["cuda"]))


def own_cuda_state(states: list):
    """This process's GPU's generator state among a checkpoint's: its one state, or, in checkpoints that
    stored every visible GPU's, this device's (the first where the saving machine had fewer)."""
    if len(states) == 1:
        return states[0]
    index = torch.cuda.current_device()
    return states[index] if index < len(states) else states[0]


def _start_the_next_epoch_if_this_one_ended(checkpoint: dict):
    """A save between two epochs (SIGTERM at an epoch's last step stops the fit loop once the epoch is
    counted complete; a run's final save) records the finished epoch's batches as the current epoch's:
    resumed so, Lightning would take the next epoch as done already and skip it. Record the next epoch's
    start instead, as Lightning's own reset at that start would."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epoch = fit_loop.get("epoch_progress", {}).get("current", {})
    batches = fit_loop.get("epoch_loop.batch_progress")
    if epoch and batches and epoch["ready"] == epoch["completed"] and batches["current"]["ready"]:
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False


def _apply_configured_optimizer_settings(trainer, module):
    """The optimizer's settings as this run configures them (model.lr, betas, eps, weight_decay), also
    where a resumed optimizer state brought the ones it was saved with. Unchanged settings are left as
    restored (an exact resume)."""
    h = module.hparams
    optimizer, schedule = module.optimizers().optimizer, module.lr_schedulers()
    wanted = {"betas": tuple(h.betas), "eps": h.eps, "weight_decay": h.weight_decay}
    changed = {}
    for group in optimizer.param_groups:
        for key, value in wanted.items():
            if (tuple(group[key]) if key == "betas" else group[key]) != value:
                changed[key] = (group[key], value)
                group[key] = value
    if any(base != h.lr for base in schedule.base_lrs):
        changed["lr"] = (schedule.base_lrs[0], h.lr)
        schedule.base_lrs = [h.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = h.lr
            group["lr"] = h.lr * lr_factor(schedule.last_epoch, h, trainer.max_steps)
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    for key, (before, now) in changed.items() if trainer.is_global_zero else ():
        log.warning("resuming with model.%s=%s (the checkpoint's optimizer had %s)", key, now, before)


def _warn_if_the_cosine_changed(trainer, module, before):
    """A cosine whose length follows trainer.max_steps changes under a resume with another max_steps, and
    the learning rate jumps at once: say so, and how to keep the saved schedule."""
    if not isinstance(before, int) or module.hparams.lr_schedule != "cosine" or not trainer.is_global_zero:
        return
    now = cosine_length(module.hparams, trainer.max_steps)
    if now != before:
        log.warning(
            "the cosine schedule's length is %d now, %d when the checkpoint was saved (trainer.max_steps changed): "
            "the learning rate changes at once; model.decay_steps=%d keeps the saved schedule",
            now,
            before,
            before,
        )


def check_resume_on_meta(config: DictConfig, checkpoint: dict | None):
    """The configured model must build (on the meta device: shapes only, no memory), and the checkpoint to
    resume from (read from `config.ckpt_path`), if any, fit it, before a run directory exists."""
    try:
        with torch.device("meta"):
            module = instantiate(config.model)
    except InstantiationException as error:  # the model's own refusal (a ValueError), under Hydra's wrapper
        if not isinstance(error.__cause__, ValueError):
            raise
        raise ConfigError(one_line(error.__cause__, 500)) from error
    if checkpoint is not None:
        check_fits(checkpoint, config.ckpt_path, module)


def check_fits(checkpoint: dict, path, module) -> dict:
    """`checkpoint` (read from `path`), after checking that its weights fit `module` for resuming its
    training (the first few mismatched keys are named)."""
    optimizer_states = checkpoint.get("optimizer_states")
    mismatch = (
        state_mismatch(module.state_dict(), checkpoint["state_dict"])
        or optimizer_mismatch(optimizer_states, list(module.vae.parameters()))
        or optimizer_kind_mismatch(optimizer_states, module.hparams.optimizer)
    )
    if mismatch:
        raise CheckpointError(
            f"{path} does not fit the configured model ({mismatch}). Resume with the model config it was "
            f"trained with (its .hydra/config.yaml), or start a new run without ckpt_path"
        )
    mismatch = counter_mismatch(checkpoint)
    if mismatch:
        raise CheckpointError(
            f"{path}: its step counters disagree ({mismatch}); the file is damaged: resume from another "
            f"checkpoint of the run"
        )
    try:
        check_rng_states(checkpoint.get("rng_states"))
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: its random number generator states cannot be restored ({one_line(error, 200)}); "
            f"the file is damaged: resume from another checkpoint of the run"
        ) from error
    return checkpoint


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def counter_mismatch(checkpoint: dict) -> str:
    """The counters a resume restores, checked against the checkpoint's global step, or "": the loops'
    step count (what Lightning restores the step from) equals it, every learning-rate scheduler has
    stepped once per update, no optimizer has stepped more often, and every loop counter is a count."""
    if "global_step" not in checkpoint:  # weights alone (an imported model): no training state to restore
        return ""
    step = checkpoint["global_step"]
    if not _is_count(step):
        return f"global_step={one_line(repr(step), 40)}, not a count"
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    progress = [(name, value) for name, value in _leaves(fit_loop) if not name.endswith("is_last_batch")]
    bad = [name for name, value in progress if not _is_count(value)]
    if bad:
        return f"the fit loop's {bad[0]}={one_line(repr(dict(progress)[bad[0]]), 40)}, not a count"
    stepped = sum(
        value
        for name, value in progress
        if name.endswith("optim_step_progress.total.completed") or name.endswith("optimizer.step.total.completed")
    )
    if progress and stepped != step:
        return f"global_step={step}, the fit loop's step count {stepped}"
    for scheduler in checkpoint.get("lr_schedulers") or []:
        last = scheduler.get("last_epoch") if isinstance(scheduler, dict) else None
        if last != step:
            return f"global_step={step}, the learning-rate schedule's step {one_line(repr(last), 40)}"
    for stored in checkpoint.get("optimizer_states") or []:
        for state in (stored.get("state") or {}).values() if isinstance(stored, dict) else []:
            count = state.get("step") if isinstance(state, dict) else None
            if torch.is_tensor(count) and count.numel() == 1 and not 0 <= float(count) <= step:
                return f"global_step={step}, an optimizer's step count {float(count):g}"
    return ""


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def optimizer_mismatch(optimizer_states, params: list) -> str:
    """The optimizer's stored state, checked as the weights are (see `state_mismatch`): every tensor it holds
    for a parameter (moments, step count) belongs to one of `params` and has its shape (a scalar step count),
    so that no moment of another shape is broadcast into the model's (the whole step copies them), or ""."""
    expected, found = {}, {}
    for stored in optimizer_states or []:
        states = stored.get("state") if isinstance(stored, dict) else None
        if not isinstance(states, dict) or not all(isinstance(tensors, dict) for tensors in states.values()):
            return "its optimizer state is not one dictionary of tensors per parameter"
        for index, tensors in states.items():
            for name, value in tensors.items():
                key = f"optimizer {name} of parameter {index}"
                found[key] = value
                if isinstance(index, int) and 0 <= index < len(params):
                    expected[key] = torch.zeros(()) if name == "step" else params[index]
    return state_mismatch(expected, found)


# The moment only each optimizer keeps (both keep step and exp_avg).
OPTIMIZER_MOMENTS = {"adamw": "exp_avg_sq", "adamax": "exp_inf"}


def optimizer_kind_mismatch(optimizer_states, optimizer: str) -> str:
    """Where the stored optimizer state is another optimizer's than `optimizer` (model.optimizer), which would
    fail at the first update: which one it is, or ""."""
    stored = {name for s in optimizer_states or [] for tensors in s["state"].values() for name in tensors}
    for kind, moment in OPTIMIZER_MOMENTS.items():
        if kind != optimizer and moment in stored:
            return f"its optimizer state is {kind}'s ({moment}), and model.optimizer={optimizer}"
    return ""


def check_rng_states(states):
    """The generator states a training checkpoint stores (`ResumeState.on_save_checkpoint`), each set on a
    scratch generator of its library: a state that would fail as training starts fails now."""
    if states is None:
        return
    if not isinstance(states, list) or not states or not all(isinstance(s, dict) for s in states):
        raise TypeError("not a list of one state per process")
    for state in states:
        torch.Generator().set_state(state["torch"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        if not torch.is_tensor(keys) or keys.dtype != torch.int64:
            raise TypeError("numpy's key is not an int64 tensor")
        np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.Random().setstate(state["python"])
        if not isinstance(state["cuda"], list) or not all(
            torch.is_tensor(t) and t.dtype == torch.uint8 for t in state["cuda"]
        ):
            raise TypeError("the CUDA states are not a list of uint8 tensors")
