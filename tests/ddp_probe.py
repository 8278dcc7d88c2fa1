"""A callback for the DDP test: every rank writes a checksum of its weights and what it evaluated."""

import json
from pathlib import Path

import torch
from lightning import Callback


class RankProbe(Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.test_images = 0

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test_images += batch[0].shape[0]

    def on_test_end(self, trainer, module):
        weights = torch.cat([p.detach().flatten().double() for p in module.vae.parameters()])
        ema = torch.cat([p.detach().flatten().double() for p in module.ema.parameters()])
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "weights": weights.tolist()[:2000],
            "weights_sum": weights.sum().item(),
            "ema_sum": ema.sum().item(),
            "test_images_seen": self.test_images,
            "steps": trainer.global_step,
            "test_n_images": float(trainer.callback_metrics["test/n_images"]),
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
