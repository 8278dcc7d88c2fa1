"""The state-dict layout of the original VDVAE code (openai/vdvae) and its mapping onto `vdvae.VAE`.

The original stores `torch.save(vae.state_dict())` (files from multi-GPU runs prefix every key with
`module.`). Its layout differs from ours only in names; this module renames one onto the other.
"""

import re

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
