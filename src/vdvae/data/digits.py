"""scikit-learn's 8x8 handwritten digits (1,797 images, 17 grey levels rescaled to 0..255): tiny runs."""

import torch

from vdvae.data.base import DataNotFoundError, ImageDataModule, TensorImages, hold_out


class DigitsDataModule(ImageDataModule):
    name = "digits"

    def __init__(self, test_size: int = 297, **kwargs):
        super().__init__(**kwargs)
        self.test_size = test_size

    def load(self):
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:  # a refusal in one line, as for any other missing data
            raise DataNotFoundError(
                "data=digits: the digits ship with scikit-learn, which is not installed: pip install scikit-learn"
            ) from error
        images = torch.from_numpy(load_digits().images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
        rest, test = hold_out(TensorImages(images), self.test_size, self.split_seed, "test_size")
        train, val = hold_out(rest, self.val_size, self.split_seed + 1)
        return train, val, test
