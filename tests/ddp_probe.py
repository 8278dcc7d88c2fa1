"""A callback for the DDP test: every rank writes its weights as training ends and what it evaluated."""

import json
from pathlib import Path

import torch
from lightning import Callback


class RankProbe(Callback):
    """Weights as training ends (testing then loads the best checkpoint, rank 0's, into every rank), and the
    test images each rank saw."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.test_images, self.trained = 0, {}

    def on_train_end(self, trainer, module):
        weights = torch.cat([p.detach().flatten().double() for p in module.vae.parameters()])
        ema = torch.cat([p.detach().flatten().double() for p in module.ema.parameters()])
        self.trained = {
            "weights": weights.tolist()[:2000],
            "weights_sum": weights.sum().item(),
            "ema_sum": ema.sum().item(),
            "steps": trainer.global_step,
        }

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test_images += batch[0].shape[0]

    def on_test_end(self, trainer, module):
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            **self.trained,
            "test_images_seen": self.test_images,
            "test_n_images": float(trainer.callback_metrics["test/n_images"]),
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
