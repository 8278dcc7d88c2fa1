"""Score a checkpoint on its test set: `python eval.py ckpt_path=... iw_samples=1000` (`vdvae-eval`)."""

from vdvae.cli import evaluate

if __name__ == "__main__":
    evaluate()
