"""Convert weights saved by the original VDVAE code into a checkpoint that eval.py and sample.py load
(`vdvae-import` when installed):

    python import_original.py --preset cifar10 --model cifar10-model.th --ema cifar10-model-ema.th \
        --out checkpoints/cifar10-original.ckpt
"""

from vdvae.tasks.import_original import main

if __name__ == "__main__":
    main()
