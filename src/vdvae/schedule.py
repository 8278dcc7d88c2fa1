"""The learning rate over a run, as a factor of `model.lr` at each update (nanoGPT's `get_lr` shape).

Linear warm-up over `warmup_steps`, then constant; or with `lr_schedule=cosine` constant up to
`decay_start` (default: the end of warm-up), then half a cosine down to `lr_min`, then `lr_min`. With
`cosine_phase=start` the cosine's phase counts from `decay_start`: it takes `decay_steps` updates (default:
up to `trainer.max_steps`). With `cosine_phase=zero` (Efficient-VDVAE's PyTorch code) its phase counts
from step 0: it reaches `lr_min` at step `decay_steps` (default: `trainer.max_steps`), and is scaled to
continue from the peak at `decay_start` (torch's CosineAnnealingLR recursion there, in closed form).

`h` is the model's hyperparameters (anything with those attributes and `lr`).
"""

import math


def lr_factor(step: int, h, max_steps: int | None) -> float:
    """The learning rate at update `step` over `h.lr`; `max_steps`: trainer.max_steps."""
    warmup = max(h.warmup_steps, 1)
    if step < warmup or h.lr_schedule == "constant":
        return min(1.0, step / warmup)
    start, decay = decay_start(h), cosine_length(h, max_steps)
    if step < start:
        return 1.0
    floor = h.lr_min / h.lr
    if h.cosine_phase == "zero":
        # lr(t) - lr_min = (lr(t-1) - lr_min) (1 + cos(pi t / T)) / (1 + cos(pi (t-1) / T)) from the peak at
        # t = decay_start - 1 telescopes to this; held at lr_min after T, as its float32 rate stays there.
        cosine = (1 + math.cos(math.pi * min(step, decay) / decay)) / (1 + math.cos(math.pi * (start - 1) / decay))
    else:
        cosine = 0.5 * (1 + math.cos(math.pi * min(step - start, decay) / decay))
    return floor + (1 - floor) * cosine


def decay_start(h) -> int:
    return max(h.warmup_steps, 1, h.decay_start or 0)


def cosine_length(h, max_steps: int | None) -> int:
    """With `cosine_phase=start` the cosine's length: `decay_steps`, or the updates after its start up to
    `max_steps` (at least 1: a run that ends before the cosine starts never reaches it). With
    `cosine_phase=zero` the step it ends at: `decay_steps`, or `max_steps` (at least its start). A cosine
    without a length, or one that ends before it starts, is refused (ValueError)."""
    zero = h.cosine_phase == "zero"
    if h.decay_steps:
        if zero and h.decay_steps < decay_start(h):
            raise ValueError(
                f"model.cosine_phase=zero counts the cosine from step 0, so model.decay_steps={h.decay_steps} "
                f"(the step it reaches model.lr_min) must be at least where it starts, model.decay_start "
                f"(here {decay_start(h)}): raise model.decay_steps, or use model.cosine_phase=start"
            )
        return h.decay_steps
    if max_steps is None or max_steps < 0:
        raise ValueError("model.lr_schedule=cosine needs model.decay_steps or a trainer.max_steps")
    if zero:
        return max(decay_start(h), max_steps)
    return max(1, max_steps - decay_start(h))


def check_schedule(h, max_steps: int | None):
    """A cosine needs a length: refused before training (train.py calls this before any output, with the
    trainer's max_steps), not once warm-up is over."""
    if h.lr_schedule == "cosine":
        cosine_length(h, max_steps)
