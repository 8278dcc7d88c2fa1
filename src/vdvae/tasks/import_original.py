"""The import recipe behind `vdvae-import` (and import_original.py): weights saved by the original VDVAE
code become a checkpoint that evaluation and sampling load.

    vdvae-import --preset cifar10 --model cifar10-model.th --ema cifar10-model-ema.th --out cifar10.ckpt

Files from multi-GPU runs (keys prefixed with `module.`) load as well. Nothing is written unless
every key and shape of both files matches the preset one to one.
"""

import argparse
import sys
from importlib.resources import files
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from vdvae.checkpoints import save_atomically
from vdvae.original import import_checkpoint

CONF = files("vdvae.conf")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="a model preset in conf/model (cifar10, imagenet32, ...)")
    parser.add_argument("--model", required=True, type=Path, help="the original's model.th")
    parser.add_argument("--ema", type=Path, help="the original's model-ema.th (default: a copy of --model)")
    parser.add_argument("--out", required=True, type=Path, help="the checkpoint to write")
    parser.add_argument("--data", help="the data config to record (default: the preset's name, if conf/data has it)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the preset, e.g. model.vae.enc_blocks=...")
    args = parser.parse_args(argv)
    data = args.data or (args.preset if CONF.joinpath("data", f"{args.preset}.yaml").is_file() else None)
    with initialize_config_module("vdvae.conf", version_base="1.3"):
        overrides = [f"+model={args.preset}", *([f"+data={data}"] if data else []), *args.overrides]
        cfg = compose(config_name=None, overrides=overrides)
    hparams = OmegaConf.to_container(cfg.model)
    hparams.pop("_target_"), hparams.pop("_convert_")
    data_config = OmegaConf.to_container(cfg.data) if data else None
    if data_config is not None:  # paths are resolved where the checkpoint is used
        data_config["root"] = str(Path("data") / data)
        data_config["seed"] = 0
    try:
        checkpoint = import_checkpoint(hparams, args.model, args.ema, data_config)
    except (ValueError, FileNotFoundError) as error:
        hint = ""
        if args.preset == "ffhq1024":
            hint = (
                "\nnote: the released ffhq1024 checkpoint has two more encoder blocks than the hyperparameters "
                "of the original code (openai/vdvae issue #3); pass its block string as "
                "\"model.vae.enc_blocks='...'\" (the single quotes for Hydra, the double ones for the shell)"
            )
        sys.exit(f"import_original: {error}{hint}")
    save_atomically(checkpoint, args.out)
    print(f"wrote {args.out} ({args.preset}, {len(checkpoint['state_dict'])} tensors)")
