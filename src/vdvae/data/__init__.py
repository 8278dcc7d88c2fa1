"""LightningDataModules for every dataset; each reads the real on-disk format.

The modules load on first use (`vdvae.data.CIFAR10DataModule` imports Lightning then), so that a stored
data config is checked before Lightning is imported.
"""

import importlib

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
    return _STORED_TARGETS[target], config


def data_module_from_config(config, **overrides):
    """One of this package's data modules from a stored data config, checked by `check_stored_data_config`."""
    name, arguments = check_stored_data_config(config)
    return __getattr__(name)(**{**arguments, **overrides})
