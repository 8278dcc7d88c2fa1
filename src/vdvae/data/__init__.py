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
]
