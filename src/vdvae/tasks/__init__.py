"""The recipes behind the commands, one module per task: train, eval, sample, compress and
import_original (the scripts at the repository root and the `vdvae-*` commands of vdvae.cli call them)."""
