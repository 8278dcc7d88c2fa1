"""The DDP strategy of the multi-process trainers (trainer=ddp, multi_node), with a collective timeout the
user sets: `trainer.strategy.timeout_s`.

A rank that waits on a collective (the gradients' all-reduce, a barrier) for a rank that is gone, on a
machine that died or a network that failed without closing its connections, waits for this long and then
fails the run, instead of for torch's default of 30 minutes (or, with some backends, forever). The time
must cover the longest a rank may legitimately wait for the others: a validation or a checkpoint save on
rank 0, a slow data loader."""

from datetime import timedelta


def ddp_strategy(timeout_s: float = 1800, **options):
    """Lightning's DDPStrategy with a collective timeout of `timeout_s` seconds; `options` are its own (checked
    before: vdvae.config.check_trainer)."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(timeout=timedelta(seconds=timeout_s), **options)
