"""The state-dict layout of the original VDVAE code (openai/vdvae) and its mapping onto `vdvae.VAE`.

The original stores `torch.save(vae.state_dict())` (files from multi-GPU runs prefix every key with
`module.`). Its layout differs from ours only in names; this module renames one onto the other.
"""

import re

import torch

from vdvae.checkpoints import load_weights_only
from vdvae.model import VAE

_BLOCK_CONVS = {"c1": "conv_in", "c2": "conv_mid1", "c3": "conv_mid2", "c4": "conv_out"}
_RULES = [
    (r"encoder\.in_conv\.(.+)", r"encoder.stem.\1"),
    (r"encoder\.enc_blocks\.(\d+)\.(c[1-4])\.(.+)", lambda m: f"encoder.blocks.{m[1]}.{_BLOCK_CONVS[m[2]]}.{m[3]}"),
    (
        r"decoder\.dec_blocks\.(\d+)\.enc\.(c[1-4])\.(.+)",
        lambda m: f"decoder.blocks.{m[1]}.posterior.{_BLOCK_CONVS[m[2]]}.{m[3]}",
    ),
    (
        r"decoder\.dec_blocks\.(\d+)\.(prior|resnet)\.(c[1-4])\.(.+)",
        lambda m: f"decoder.blocks.{m[1]}.{m[2]}.{_BLOCK_CONVS[m[3]]}.{m[4]}",
    ),
    (r"decoder\.dec_blocks\.(\d+)\.z_proj\.(.+)", r"decoder.blocks.\1.z_proj.\2"),
    (r"decoder\.gain", "decoder.out_gain"),
    (r"decoder\.bias", "decoder.out_bias"),
    (r"decoder\.out_net\.out_conv\.(.+)", r"likelihood.out_conv.\1"),
]


def our_key(original_key: str, bias_resolutions: list[int]) -> str:
    """The name in `vdvae.VAE` of a key of the original's state dict (without `module.`)."""
    match = re.fullmatch(r"decoder\.bias_xs\.(\d+)", original_key)
    if match:
        index = int(match[1])
        if index >= len(bias_resolutions):
            raise KeyError(f"original key {original_key!r}: the model has only {len(bias_resolutions)} bias states")
        return f"decoder.bias.{bias_resolutions[index]}"
    for pattern, replacement in _RULES:
        if re.fullmatch(pattern, original_key):
            return re.sub(pattern, replacement, original_key)
    raise KeyError(f"original key {original_key!r} has no counterpart in vdvae.VAE")


def convert_state_dict(original: dict, model: VAE) -> dict:
    """Rename an original state dict to `model`'s names, checking keys and shapes one to one."""
    original = {k.removeprefix("module."): v for k, v in original.items()}
    bias_resolutions = sorted(int(r) for r in model.decoder.bias)
    ours = model.state_dict()
    converted = {}
    for key, value in original.items():
        name = our_key(key, bias_resolutions)
        if name not in ours:
            raise KeyError(f"original key {key!r} maps to {name!r}, which this model does not have")
        if tuple(ours[name].shape) != tuple(value.shape):
            raise ValueError(
                f"original key {key!r}: shape {tuple(value.shape)} != {tuple(ours[name].shape)} of {name!r}"
            )
        converted[name] = value
    missing = sorted(set(ours) - set(converted))
    if missing:
        raise KeyError(f"the original state dict lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")
    return converted


def load_original(model: VAE, original: dict) -> VAE:
    """Load an original state dict into `model` in place and return it."""
    model.load_state_dict(convert_state_dict(original, model))
    return model


def read_original(path) -> dict:
    """A state dict saved by the original code (model.th or model-ema.th), loaded safely."""
    state = load_weights_only(path, "PyTorch file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (a dict of tensors) as the original code saves")
    return state


def import_checkpoint(module_hparams: dict, model_file, ema_file=None, data_config: dict | None = None) -> dict:
    """A vdvae checkpoint from the original's model (and EMA) state dicts; raises before returning on any
    missing or extra key or shape mismatch. Without an EMA file, the EMA is a copy of the weights."""
    from vdvae.lit_module import VDVAEModule

    with torch.device("meta"):
        module = VDVAEModule(**module_hparams)
    model_state = read_original(model_file)
    ema_state = read_original(ema_file) if ema_file else model_state
    checkpoint = {"state_dict": {}, "hyper_parameters": module_hparams, "imported_from": str(model_file)}
    for prefix, state in (("vae", model_state), ("ema", ema_state)):
        try:
            converted = convert_state_dict(state, getattr(module, prefix))
        except (KeyError, ValueError) as error:
            raise ValueError(f"{prefix} weights in {model_file if prefix == 'vae' else ema_file}: {error}") from error
        checkpoint["state_dict"].update({f"{prefix}.{k}": v for k, v in converted.items()})
    for name, buffer in module.state_dict().items():  # the module's own counters, zero
        if not name.startswith(("vae.", "ema.")):
            checkpoint["state_dict"][name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    if data_config is not None:
        checkpoint["data_config"] = data_config
    return checkpoint


# Our VAE's argument -> the original's hyperparameter of the same meaning.
_HPARAMS = {
    "image_size": "image_size",
    "image_channels": "image_channels",
    "width": "width",
    "custom_widths": "custom_width_str",
    "zdim": "zdim",
    "enc_blocks": "enc_blocks",
    "dec_blocks": "dec_blocks",
    "bottleneck_ratio": "bottleneck_multiple",
    "num_mixtures": "num_mixtures",
    "no_bias_above": "no_bias_above",
}


def to_original_hparams(vae_kwargs: dict) -> dict:
    """The original's hyperparameters (its `H`) for a VAE configured with `vae_kwargs`."""
    h = {theirs: vae_kwargs[ours] for ours, theirs in _HPARAMS.items()}
    h["custom_width_str"] = h["custom_width_str"] or ""
    return h


def from_original_hparams(h: dict) -> dict:
    """VAE arguments from the original's hyperparameters (`custom_width` is accepted for `custom_width_str`)."""
    h = {"custom_width_str": h.get("custom_width", ""), "image_channels": 3, **h}
    kwargs = {ours: h[theirs] for ours, theirs in _HPARAMS.items()}
    kwargs["custom_widths"] = kwargs["custom_widths"] or None
    return kwargs
