"""LightningDataModules for every dataset; each reads the real on-disk format.

The modules load on first use (`vdvae.data.CIFAR10DataModule` imports Lightning then), so that a stored
data config is checked before Lightning is imported.
"""

import importlib
import logging
import os

from vdvae.config import wanted_value

log = logging.getLogger(__name__)

# Every public name, and the file that defines it.
_HOMES = {
    "CIFAR10DataModule": "cifar10",
    "DigitsDataModule": "digits",
    "FFHQ256DataModule": "folder",
    "FFHQ1024DataModule": "folder",
    "FashionMNISTDataModule": "mnist",
    "ImageFolderDataModule": "folder",
    "ImageNetDataModule": "imagenet",
    "MNISTDataModule": "mnist",
    "DataNotFoundError": "base",
    "ImageDataModule": "base",
    "Preprocess": "base",
}
__all__ = [*_HOMES, "check_stored_data_config", "data_module_from_config"]

# The data modules a stored config may name: by public name (as conf/data writes it) and by module path.
_STORED_TARGETS = {
    target: name
    for name, home in _HOMES.items()
    if name.endswith("DataModule") and name != "ImageDataModule"
    for target in (f"vdvae.data.{name}", f"vdvae.data.{home}.{name}")
}
_PLAIN = (str, int, float, bool, type(None))
# The numbers and switches a stored config may hold, as (kind, least, most, null allowed); the data module
# checks the rest (paths, the split sizes against the data).
_STORED_VALUES = {
    "batch_size": ("int", 1, None, False),
    "eval_batch_size": ("int", 1, None, True),
    "num_workers": ("int", 0, None, False),
    "image_size": ("int", 1, None, False),
    "channels": ("int", 1, None, False),
    "bits": ("int", 1, 8, False),
    "val_size": ("int", 0, None, False),
    "test_size": ("int", 0, None, False),
    "limit_train": ("int", 1, None, True),
    "split_seed": ("int", None, None, False),
    "seed": ("int", None, None, False),
    "shift": ("number", None, None, False),
    "scale": ("number", None, None, False),
    "binarize": ("bool", None, None, False),
    "original_low_bit": ("bool", None, None, False),
    "random_flip": ("bool", None, None, False),
    "download": ("bool", None, None, False),
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'vdvae.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vdvae.data.{_HOMES[name]}"), name)


def check_stored_data_config(config) -> tuple[str, dict]:
    """The data module a stored data config (a checkpoint's, a W&B artifact's) names, and its arguments.

    Such a config is data, not code: its `_target_` must name one of this package's data modules, every
    other value must be a plain number, string, bool or list of them, and nothing is instantiated by name.
    A data module of your own is used by passing `data=<your config>` to the script instead.
    """
    if not isinstance(config, dict):
        raise ValueError(f"the stored data config is not a mapping ({type(config).__name__})")
    config = dict(config)
    target = config.pop("_target_", None)
    if target not in _STORED_TARGETS:
        raise ValueError(
            f"the stored data config names {target!r}, which is not one of this package's data modules "
            f"({', '.join(sorted(set(_STORED_TARGETS.values())))}); pass data=<name> to choose the data"
        )
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or key.startswith("_") or not all(isinstance(v, _PLAIN) for v in values):
            raise ValueError(f"the stored data config has a value that is not plain data: {key!r}={value!r}")
        if any(isinstance(v, str) and "${" in v for v in values):
            raise ValueError(f"the stored data config has an interpolation in {key!r}={value!r}")
        if key in _STORED_VALUES:
            _check_stored_value(key, value, *_STORED_VALUES[key])
    return _STORED_TARGETS[target], config


def _check_stored_value(key: str, value, kind: str, least, most, nullable: bool):
    wanted = wanted_value(value, kind, least, most, nullable=nullable, nonzero=key == "scale")
    if wanted is not None:
        raise ValueError(
            f"the stored data config's {key}={value!r} is not valid: it must be {wanted}; pass data=<name> "
            f"to use a data config of your own instead"
        )


def data_module_from_config(config, **overrides):
    """One of this package's data modules from a stored data config, checked by `check_stored_data_config`.
    A stored `num_workers` above this machine's cores (a checkpoint made on a bigger machine) is lowered to
    the cores, with a warning."""
    name, arguments = check_stored_data_config(config)
    cores = os.cpu_count() or 1
    if "num_workers" not in overrides and arguments.get("num_workers", 0) > cores:
        log.warning(
            "the stored data config asks for num_workers=%d, more than this machine's %d cores: using %d "
            "(pass data=<name> to choose the data config yourself)",
            arguments["num_workers"],
            cores,
            cores,
        )
        arguments["num_workers"] = cores
    return __getattr__(name)(**{**arguments, **overrides})
