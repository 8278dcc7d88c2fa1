"""LightningDataModules for every dataset; each reads the real on-disk format."""

from vdvae.data.base import DataNotFoundError, ImageDataModule, Preprocess
from vdvae.data.cifar10 import CIFAR10DataModule
from vdvae.data.digits import DigitsDataModule
from vdvae.data.folder import FFHQ256DataModule, FFHQ1024DataModule, ImageFolderDataModule
from vdvae.data.imagenet import ImageNetDataModule
from vdvae.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "DataNotFoundError",
    "DigitsDataModule",
    "FFHQ256DataModule",
    "FFHQ1024DataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "Preprocess",
    "data_module_from_config",
]

# Each by its public name (as conf/data writes it) and by its module path.
_MODULES = {
    name: cls
    for cls in (
        CIFAR10DataModule,
        DigitsDataModule,
        FFHQ256DataModule,
        FFHQ1024DataModule,
        FashionMNISTDataModule,
        ImageFolderDataModule,
        ImageNetDataModule,
        MNISTDataModule,
    )
    for name in (f"vdvae.data.{cls.__name__}", f"{cls.__module__}.{cls.__name__}")
}
_PLAIN = (str, int, float, bool, type(None))


def data_module_from_config(config, **overrides) -> ImageDataModule:
    """One of this package's data modules from a stored data config (a checkpoint's, a W&B artifact's).

    Such a config is data, not code: its `_target_` must name one of the modules above, every other value
    must be a plain number, string, bool or list of them, and nothing is instantiated by name. A data
    module of your own is used by passing `data=<your config>` to the script instead.
    """
    if not isinstance(config, dict):
        raise ValueError(f"the stored data config is not a mapping ({type(config).__name__})")
    config = dict(config)
    target = config.pop("_target_", None)
    if target not in _MODULES:
        raise ValueError(
            f"the stored data config names {target!r}, which is not one of this package's data modules "
            f"({', '.join(sorted(c.__name__ for c in _MODULES.values()))}); pass data=<name> to choose the data"
        )
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or key.startswith("_") or not all(isinstance(v, _PLAIN) for v in values):
            raise ValueError(f"the stored data config has a value that is not plain data: {key!r}={value!r}")
        if any(isinstance(v, str) and "${" in v for v in values):
            raise ValueError(f"the stored data config has an interpolation in {key!r}={value!r}")
    return _MODULES[target](**{**config, **overrides})
