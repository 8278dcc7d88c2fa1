"""Every config option composes, and instantiates (big models on the meta device)."""

from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF, compose_config
from vdvae import VDVAEModule
from vdvae.data import ImageDataModule

OUT = ["hydra.run.dir=/tmp/unused", "hydra.runtime.output_dir=/tmp/unused"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose(*overrides):
    cfg = compose_config(*overrides, config_name="train")
    cfg.hydra.runtime.output_dir = "/tmp/unused"
    cfg.hydra.runtime.cwd = str(Path.cwd())
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


def test_default_is_the_quick_start():
    cfg = compose()
    assert cfg.model.vae.image_size == cfg.data.image_size == 28 and cfg.data._target_.endswith(
        "FashionMNISTDataModule"
    )
    assert cfg.trainer.max_steps == 2000 and cfg.trainer.max_time is None and "wandb" in cfg.logger


@pytest.mark.parametrize("name", options("model"))
@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp"])
def test_every_model_preset_states_its_run_length(name, trainer):
    """The run length comes with the model preset (its own `trainer:` keys, or its parent's), whatever the
    trainer choice: the model group is composed after the trainer group."""
    import yaml

    cfg = compose(f"model={name}", f"trainer={trainer}")
    preset = name
    while "trainer" not in (config := yaml.safe_load((CONF / "model" / f"{preset}.yaml").read_text())):
        preset = config["defaults"][0]  # the preset it extends
    assert cfg.trainer.max_steps == config["trainer"]["max_steps"], preset


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_compose_consistently(name):
    from vdvae.config import check_config

    cfg = compose(f"experiment={name}")
    check_config(cfg)
    with torch.device("meta"):
        assert isinstance(instantiate(cfg.model), VDVAEModule)
    assert isinstance(instantiate(cfg.data), ImageDataModule)


def test_paper_run_uses_the_paper_hyperparameters():
    cfg = compose("model=vdvae", "data=cifar10")
    assert (cfg.model.lr, cfg.model.ema_decay, cfg.model.grad_clip, cfg.model.skip_threshold) == (
        2e-4,
        0.9999,
        200,
        400,
    )
    assert tuple(cfg.model.betas) == (0.9, 0.9) and cfg.model.weight_decay == 0.01 and cfg.model.warmup_steps == 100
    assert cfg.data.batch_size == 16 and cfg.data.shift == -120.63838 and cfg.trainer.max_steps == 1100000
    assert cfg.model.vae.width == 384


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate(name):
    assert isinstance(instantiate(compose(f"data={name}").data), ImageDataModule)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options(name):
    cfg = compose(f"trainer={name}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert get_class(cfg.trainer._target_) and (
            cfg.trainer.strategy == "auto" or cfg.trainer.strategy._target_ == "vdvae.distributed.ddp_strategy"
        )
        return
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.num_devices >= 1


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options(name, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(f"logger={name}", f"hydra.runtime.output_dir={tmp_path}")
    cfg.paths.output_dir = str(tmp_path)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert bool(loggers) == (name != "none")


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options(name):
    cfg = compose(f"callbacks={name}")
    for c in (cfg.get("callbacks") or {}).values():
        instantiate(c)


@pytest.mark.parametrize("name", options("debug"))
def test_debug_options(name):
    instantiate(compose(f"debug={name}").trainer, logger=False)


@pytest.mark.parametrize(
    "launcher,target",
    [
        ("local", "vdvae_sweepers.local_launcher.LocalLauncher"),
        ("slurm", "vdvae_sweepers.slurm_launcher.SlurmLauncher"),
    ],
)
def test_sweep_launchers(launcher, target):
    cfg = compose(f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=4")
    assert cfg.hydra.launcher._target_.endswith(target)
    get_class(cfg.hydra.launcher._target_)
    if launcher == "slurm":
        assert OmegaConf.select(cfg, "hydra.launcher.tasks_per_node") == 4


def test_unknown_option_names_it():
    with pytest.raises(Exception, match="nonsense"):
        compose("model.nonsense=1")


def test_ddp_waits_for_a_lost_process_as_long_as_its_timeout(monkeypatch):
    from datetime import timedelta

    from vdvae.config import ConfigError, check_trainer

    cfg = compose("trainer=ddp", "trainer.strategy.timeout_s=90")
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.strategy._timeout == timedelta(seconds=90)  # what torch's process group is created with
    for bad in ("0", "-5", "nan", "'soon'"):
        with pytest.raises(ConfigError, match=r"trainer.strategy.timeout_s=.* the seconds a process waits"):
            check_trainer(compose("trainer=ddp", f"trainer.strategy.timeout_s={bad}").trainer)
    assert compose("trainer=ddp", "trainer.strategy=ddp_spawn").trainer.strategy == "ddp_spawn"  # a name still


def test_every_process_of_a_launched_job_finds_one_folder_and_a_log_of_its_own(monkeypatch, tmp_path):
    from vdvae.config import ConfigError, _log_name, _run_name, check_trainer

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "TORCHELASTIC_RUN_ID", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert _log_name("train") == "train" and _run_name() != _run_name()  # a run of its own: date, time, hex
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "digits 2/nodes")
    monkeypatch.setenv("RANK", "1")
    assert _run_name() == "torchrun-digits-2-nodes" and _log_name("train") == "train_rank1"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's id where none was given: each process its own
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun without --rdzv-id"):
        check_trainer(compose("trainer=ddp").trainer)
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # SLURM first: a requeued job, restarted, finds its folder again
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.delenv("RANK")
    assert _run_name() == "slurm-77" and _log_name("eval") == "eval_rank3"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "second")  # torchrun inside a SLURM job: its own run
    assert _run_name() == "torchrun-second"
    from vdvae.run_folder import holds_only_further_ranks_logs

    folder = Path(str(tmp_path)) / "torchrun-x"  # rank 1 may write its log before rank 0 claims the folder
    assert not holds_only_further_ranks_logs(folder)
    folder.mkdir()
    (folder / "train_rank1.log").write_text("")
    assert holds_only_further_ranks_logs(folder)
    (folder / "train.log").write_text("")
    assert not holds_only_further_ranks_logs(folder)
