"""The hierarchical VAE of VDVAE (Child 2020, arXiv 2011.10650): encoder, top-down decoder blocks
with one latent group each, decoder, and the VAE that ties them to a likelihood.

p(x, z) = p(x | z) p(z_0) prod_t p(z_t | z_<t),   q(z | x) = q(z_0 | x) prod_t q(z_t | z_<t, x).
The forward pass returns the ELBO's terms per image and per group, so callers can log the rate of
every group; a plain VAE is the case of a single latent group.
"""

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vdvae.model.blocks import (
    LearnedUnpool,
    ResBlock,
    StridedPool,
    activation_fn,
    bottleneck,
    conv,
    depth_scale,
    parse_block_string,
    widths_by_resolution,
)
from vdvae.model.distributions import gaussian_kl, gaussian_sample, softplus_logstd
from vdvae.model.likelihoods import Bernoulli, DiscretizedMixtureLogistics, nats_to_bits


class NonFiniteOutputError(FloatingPointError):
    """The decoder produced non-finite likelihood parameters, so no image can be drawn."""


@dataclass
class ELBO:
    """The ELBO's terms for a batch: log p(x|z) (N,) and KL per group (N, T), both in nats per image."""

    log_px_z: torch.Tensor
    kl: torch.Tensor
    ndims: int  # data dimensions per image, H * W * C

    @property
    def elbo(self):
        """ELBO per image in nats: log p(x|z) - sum_t KL_t."""
        return self.log_px_z - self.kl.sum(dim=1)

    @property
    def distortion(self):
        """-log p(x|z) in nats per data dimension, (N,)."""
        return -self.log_px_z / self.ndims

    @property
    def rate(self):
        """Total KL in nats per data dimension, (N,)."""
        return self.kl.sum(dim=1) / self.ndims

    @property
    def loss(self):
        """Negative ELBO in nats per data dimension, (N,): the quantity training minimizes."""
        return self.distortion + self.rate

    @property
    def bpd(self):
        """Negative ELBO in bits per data dimension, (N,)."""
        return nats_to_bits(self.loss)


@dataclass
class GroupOutput:
    """What one decoder block did: its latent, posterior and prior parameters, and the KL map."""

    z: torch.Tensor
    prior: tuple | None
    posterior: tuple | None = None
    kl: torch.Tensor | None = None


def _as_conv_input(t):
    """`t` in the dtype autocast runs convolutions in (itself without autocast): a tensor that feeds
    several convolutions is then cast once, not once per convolution."""
    device = t.device.type
    return t.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else t


class Encoder(nn.Module):
    """Bottom-up ResNet. Network "vdvae": returns the last activation at every resolution (zero-padded
    to its width), keyed by resolution. Network "efficient": every block sends a 1x1-projected skip
    (keyed by its index) and pools with a strided conv."""

    def __init__(self, image_channels, widths, specs, image_size, bottleneck_ratio, activation, network, n_groups):
        super().__init__()
        self.widths, self.efficient = widths, network == "efficient"
        self.stem = conv(image_channels, widths[image_size], 1 if self.efficient else 3)
        self.blocks = nn.ModuleList(
            ResBlock(
                widths[s.resolution],
                bottleneck(widths[s.resolution], bottleneck_ratio),
                widths[s.resolution],
                s.resolution,
                residual=True,
                down_rate=None if self.efficient else s.down_rate,
                activation=activation,
            )
            for s in specs
        )
        # Efficient-VDVAE scales every residual branch by the number of latent groups.
        for block in self.blocks:
            block.scale_last(depth_scale(n_groups if self.efficient else len(specs)))
        if self.efficient:
            self.skips = nn.ModuleList(conv(widths[s.resolution], widths[s.resolution], 1) for s in specs)
            self.pools = nn.ModuleDict(
                {
                    str(i): StridedPool(widths[s.resolution], widths[s.resolution // s.down_rate], s.down_rate)
                    for i, s in enumerate(specs)
                    if s.down_rate
                }
            )

    def forward(self, x, checkpointing=False):
        x = self.stem(x)
        activations = {} if self.efficient else {x.shape[-1]: x}
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
            if self.efficient:
                activations[i] = self.skips[i](x)
                if str(i) in self.pools:
                    x = self.pools[str(i)](x)
                continue
            width = self.widths[x.shape[-1]]
            if x.shape[1] < width:
                x = F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1]))
            activations[x.shape[-1]] = x
        return activations


class DecoderBlock(nn.Module):
    """One top-down block: posterior q(z_t | z_<t, x), prior p(z_t | z_<t), z projection, ResBlock.

    A block with `latent=False` keeps only the ResBlock (used to upsample after the last group).
    `heads` (Efficient-VDVAE's): the prior's ResBlock gives the residual and features of the same
    width, the posterior's the width, and a 1x1 conv on each gives its (mean, scale); the prior's
    last conv is not zeroed. `skip_key` names the encoder activation the posterior reads.
    """

    def __init__(
        self,
        spec,
        width,
        zdim,
        bottleneck_ratio,
        depth,
        latent=True,
        std="exp",
        activation="gelu",
        heads=False,
        skip_key=None,
    ):
        super().__init__()
        self.resolution, self.mixin, self.zdim, self.latent = spec.resolution, spec.mixin, zdim, latent
        self.softplus_std, self.heads, self.skip_key = std == "softplus", heads, skip_key
        self.act = activation_fn(activation)
        mid = bottleneck(width, bottleneck_ratio)
        block = functools.partial(ResBlock, resolution=spec.resolution, activation=activation)
        if latent and heads:
            self.posterior = block(2 * width, mid, width, residual=False)
            self.prior = block(width, mid, 2 * width, residual=False)
            self.posterior_head = conv(width, 2 * zdim, 1)
            self.prior_head = conv(width, 2 * zdim, 1)
        elif latent:
            self.posterior = block(2 * width, mid, 2 * zdim, residual=False)
            self.prior = block(width, mid, 2 * zdim + width, residual=False, zero_last=True)
        if latent:
            self.z_proj = conv(zdim, width, 1)
            with torch.no_grad():
                self.z_proj.weight.mul_(depth_scale(depth))
        self.resnet = block(width, mid, width, residual=True)
        self.resnet.scale_last(depth_scale(depth))

    def forward(self, x, activation=None, z=None, temperature=1.0, use_mean=False, keep=None, choose=None):
        """x: decoder state (N, W, R, R). With `activation` (the encoder's, passed through act)
        the latent comes from the posterior (its mean if `use_mean`), else `z` if given, else the
        prior at `temperature`. `keep` (zdim,) bool prunes the posterior's other variates: they are
        drawn from the prior instead and carry no KL. `choose(out)`, given, picks the latent itself
        from the group's distributions (bits-back coding draws it from an entropy coder)."""
        if not self.latent:
            return self.resnet(x), None
        # Prior and posterior both open with the activation of the state: compute it once. The
        # posterior's act(cat[x, a]) is cat[act(x), act(a)], and act(a) is shared by blocks reading a.
        act_x = _as_conv_input(self.act(x))
        if self.heads:
            residual, features = self.prior(x, act_x).chunk(2, dim=1)
            p_mean, p_logstd = self.prior_head(features).chunk(2, dim=1)
        else:
            p_mean, p_logstd, residual = self.prior(x, act_x).split([self.zdim, self.zdim, x.shape[1]], dim=1)
        # Latents and KL in fp32 also under autocast, like the likelihood (no-ops in fp32).
        p_mean, p_logstd = p_mean.float(), p_logstd.float()
        if self.softplus_std:
            p_logstd = softplus_logstd(p_logstd)
        out = GroupOutput(z=None, prior=(p_mean, p_logstd))
        if activation is not None:
            posterior = self.posterior(None, torch.cat([act_x, activation], dim=1))
            if self.heads:
                posterior = self.posterior_head(posterior)
            q_mean, q_logstd = posterior.float().chunk(2, dim=1)
            if self.softplus_std:
                q_logstd = softplus_logstd(q_logstd)
            out.posterior = (q_mean, q_logstd)
            out.kl = gaussian_kl(q_mean, q_logstd, p_mean, p_logstd)
            if choose is not None:
                out.z = choose(out)
            else:
                out.z = q_mean if use_mean else gaussian_sample(q_mean, q_logstd)
            if keep is not None:
                kept = keep.view(1, -1, 1, 1)
                out.z = torch.where(kept, out.z, gaussian_sample(p_mean, p_logstd))
                out.kl = out.kl * kept
        elif choose is not None:
            out.z = choose(out)
        else:
            out.z = z if z is not None else gaussian_sample(p_mean, p_logstd, temperature)
        x = x + residual + self.z_proj(out.z)
        return self.resnet(x), out


class Decoder(nn.Module):
    """Top-down stack of DecoderBlocks over learned bias states. Network "vdvae": blocks at R share
    the encoder's activation at R, upsampling is nearest-neighbour, and a per-channel gain and bias
    end it. Network "efficient": each block reads its paired encoder block's skip (`skip_keys`),
    upsampling is learned, and there is no gain or bias."""

    def __init__(
        self,
        widths,
        specs,
        image_size,
        zdim,
        bottleneck_ratio,
        no_bias_above,
        no_latent_above,
        std="exp",
        activation="gelu",
        network="vdvae",
        skip_keys=None,
    ):
        super().__init__()
        self.widths, self.image_size = widths, image_size
        efficient = network == "efficient"
        latent = [no_latent_above is None or s.resolution <= no_latent_above for s in specs]
        self.blocks = nn.ModuleList(
            DecoderBlock(
                s,
                widths[s.resolution],
                zdim,
                bottleneck_ratio,
                sum(latent) if efficient else len(specs),
                latent=has_latent,
                std=std,
                activation=activation,
                heads=efficient,
                skip_key=s.resolution if skip_keys is None else skip_keys[i],
            )
            for i, (s, has_latent) in enumerate(zip(specs, latent, strict=True))
        )
        resolutions = sorted({s.resolution for s in specs})
        self.bias = nn.ParameterDict(
            {str(r): nn.Parameter(torch.zeros(1, widths[r], r, r)) for r in resolutions if r <= no_bias_above}
        )
        self.unpools = nn.ModuleDict(
            {
                str(i): LearnedUnpool(widths[s.mixin], widths[s.resolution], s.resolution, s.resolution // s.mixin)
                for i, s in enumerate(specs)
                if efficient and s.mixin is not None
            }
        )
        if efficient:
            self.out_gain = self.out_bias = None
        else:
            self.out_gain = nn.Parameter(torch.ones(1, widths[image_size], 1, 1))
            self.out_bias = nn.Parameter(torch.zeros(1, widths[image_size], 1, 1))

    @property
    def n_groups(self):
        return sum(block.latent for block in self.blocks)

    def forward(
        self,
        n,
        activations=None,
        latents=(),
        temperature=1.0,
        use_mean=False,
        checkpointing=False,
        keep_distributions=True,
        variate_masks=None,
        choose=None,
    ):
        """Run the blocks top-down. Groups take the posterior when `activations` is given, else
        `latents[t]` while there are given latents, else the prior at temperature(s); or, with
        `choose`, the latent `choose(t, group_output)` returns for group t.

        Without `keep_distributions` the groups keep only z and the KL map, so that (with
        checkpointing) the prior's and posterior's outputs are freed block by block."""
        temps = list(temperature) if isinstance(temperature, Sequence) else [temperature] * self.n_groups
        if len(temps) != self.n_groups:
            raise ValueError(f"got {len(temps)} temperatures for {self.n_groups} latent groups")
        ref = self.blocks[0].resnet.conv_in.weight
        states, groups, act_activations = {}, [], {}
        for i, block in enumerate(self.blocks):
            r, w = block.resolution, self.widths[block.resolution]
            if r in states:
                x = states[r]
            elif str(r) in self.bias:
                x = self.bias[str(r)].expand(n, -1, -1, -1)
            else:
                x = ref.new_zeros(n, w, r, r)
            if str(i) in self.unpools:
                x = x + self.unpools[str(i)](states[block.mixin])
            elif block.mixin is not None:
                x = x + F.interpolate(states[block.mixin][:, :w], scale_factor=r // block.mixin, mode="nearest")
            t = len(groups)
            key = block.skip_key
            if activations is not None and block.latent and key not in act_activations:
                act_activations[key] = _as_conv_input(block.act(activations[key]))
            kwargs = dict(
                activation=act_activations.get(key),
                z=latents[t] if block.latent and t < len(latents) else None,
                temperature=temps[t] if block.latent else 1.0,
                use_mean=use_mean,
                keep=variate_masks[t] if variate_masks is not None and block.latent else None,
                choose=functools.partial(choose, t) if choose is not None and block.latent else None,
            )
            if checkpointing:
                x, out = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x, out = block(x, **kwargs)
            states[r] = x
            if out is not None:
                groups.append(out if keep_distributions else GroupOutput(z=out.z, prior=None, kl=out.kl))
        h = states[self.image_size]
        return (h if self.out_gain is None else h * self.out_gain + self.out_bias), groups


class VAE(nn.Module):
    """A VDVAE: encoder, top-down decoder and likelihood, configured from plain values.

    Args:
        image_size, image_channels: the data's shape, (channels, size, size).
        width: channels of the residual stream; `custom_widths` overrides it per resolution
            ("512:32,256:64" or {512: 32}); channels are zero-padded where the width grows.
        zdim: channels of each latent group.
        bottleneck_ratio: inner width of every block as a fraction of its width.
        enc_blocks, dec_blocks: block strings (see vdvae.model.blocks).
        likelihood: "dmol" (discretized mixture of logistics) or "bernoulli".
        num_mixtures, bits: the mixture's components and the data's bit depth.
        no_bias_above: learned decoder input states only at resolutions up to this.
        no_latent_above: decoder blocks above this resolution carry no latent (None: all do);
            with a single block at or below it, this is a plain one-group VAE.
        checkpointing: recompute each block's activations in the backward pass (saves memory).
        channels_last: run convolutions in the NHWC memory format (faster on most hardware).
        std: how the prior's and posterior's scale come from the network: "exp" (std = exp(output), the
            paper's) or "softplus" (std = softplus(ln2 * output) / ln2, Efficient-VDVAE's).
        min_log_scale: floor on the mixture's logistic log-scales (-7, the paper's; Efficient-VDVAE: -250).
        mixture_std: the mixture's scales as "exp" (of the head's output, the paper's) or "softplus" (as `std`).
        activation: "gelu" (the paper's) or "silu" (Efficient-VDVAE's).
        network: "vdvae" (the paper's blocks) or "efficient" (Efficient-VDVAE's, Hazami et al. 2022): a 1x1
            stem; each encoder block sends a 1x1-projected skip to its mirror decoder block (the decoder's
            `RrN` blocks reuse the skip before them); strided-conv pooling and learned unpooling, each with
            LeakyReLU(0.1); separate 1x1 heads for the prior's and posterior's (mean, scale); residual
            branches scaled by the number of groups; no output gain and bias.
    """

    def __init__(
        self,
        image_size: int,
        image_channels: int,
        width: int,
        zdim: int,
        enc_blocks: str,
        dec_blocks: str,
        custom_widths: str | Mapping | None = None,
        bottleneck_ratio: float = 0.25,
        likelihood: str = "dmol",
        num_mixtures: int = 10,
        bits: int = 8,
        no_bias_above: int = 64,
        no_latent_above: int | None = None,
        checkpointing: bool = False,
        channels_last: bool = False,
        std: str = "exp",
        min_log_scale: float = -7.0,
        mixture_std: str = "exp",
        activation: str = "gelu",
        network: str = "vdvae",
    ):
        super().__init__()
        if std not in ("exp", "softplus"):
            raise ValueError(f"std must be 'exp' (the paper's) or 'softplus' (Efficient-VDVAE's), got {std!r}")
        if network not in ("vdvae", "efficient"):
            raise ValueError(f"network must be 'vdvae' (the paper's) or 'efficient' (Efficient-VDVAE's): {network!r}")
        activation_fn(activation)
        enc_specs = parse_block_string(enc_blocks, "encoder")
        dec_specs = parse_block_string(dec_blocks, "decoder")
        resolutions = {image_size} | {s.resolution for s in enc_specs + dec_specs}
        resolutions |= {s.resolution // s.down_rate for s in enc_specs if s.down_rate}
        widths = widths_by_resolution(width, custom_widths, resolutions)
        _check_architecture(image_size, widths, enc_specs, dec_specs, zdim, no_latent_above, network)
        skip_keys = mirrored_skips(enc_specs, dec_specs) if network == "efficient" else None
        n_groups = sum(no_latent_above is None or s.resolution <= no_latent_above for s in dec_specs)
        self.image_size, self.image_channels = image_size, image_channels
        self.checkpointing, self.channels_last = checkpointing, channels_last
        self.encoder = Encoder(
            image_channels, widths, enc_specs, image_size, bottleneck_ratio, activation, network, n_groups
        )
        self.decoder = Decoder(
            widths,
            dec_specs,
            image_size,
            zdim,
            bottleneck_ratio,
            no_bias_above,
            no_latent_above,
            std,
            activation,
            network,
            skip_keys,
        )
        if likelihood == "dmol":
            self.likelihood = DiscretizedMixtureLogistics(
                widths[image_size], image_channels, num_mixtures, bits, min_log_scale, mixture_std
            )
        elif likelihood == "bernoulli":
            self.likelihood = Bernoulli(widths[image_size], image_channels)
        else:
            raise ValueError(f"likelihood must be 'dmol' or 'bernoulli', got {likelihood!r}")
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def n_groups(self) -> int:
        return self.decoder.n_groups

    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(zdim, R, R) of every latent group, top-down."""
        return [(b.zdim, b.resolution, b.resolution) for b in self.decoder.blocks if b.latent]

    def _check_input(self, x):
        expected = (self.image_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x, target, use_mean=False, variate_masks=None) -> ELBO:
        """ELBO terms for model inputs x (N, C, H, W) and likelihood targets of the same shape.

        `use_mean` takes the posterior mean in every group instead of a sample (deterministic).
        `variate_masks` (one (zdim,) bool tensor per group, see `vdvae.pruning`) keeps only those
        posterior variates; the others come from the prior and cost no KL.
        """
        x = self._check_input(x)
        activations = self.encoder(x, self.checkpointing)
        h, groups = self.decoder(
            x.shape[0],
            activations,
            use_mean=use_mean,
            checkpointing=self.checkpointing,
            keep_distributions=False,
            variate_masks=variate_masks,
        )
        log_px_z = self.likelihood.log_prob(self.likelihood(h), target)
        kl = torch.stack([g.kl.float().sum(dim=(1, 2, 3)) for g in groups], dim=1)
        return ELBO(log_px_z=log_px_z, kl=kl, ndims=target[0].numel())

    @torch.no_grad()
    def encode(self, x, use_mean=True) -> list:
        """The posterior latents of every group, top-down: a list of (N, zdim, R, R) tensors."""
        activations = self.encoder(self._check_input(x))
        _, groups = self.decoder(x.shape[0], activations, use_mean=use_mean)
        return [g.z for g in groups]

    @torch.no_grad()
    def decode(self, latents, temperature=1.0, mode=None, n=None):
        """Images (N, C, H, W) uint8 from the given latents of the first k groups, the rest drawn
        from the prior at `temperature` (one value or one per group).

        `mode` returns the likelihood's most likely component mean instead of a sample; by default
        it is on when every temperature is 0, so that sampling is then deterministic.
        """
        n = latents[0].shape[0] if latents else n
        h, _ = self.decoder(n, latents=list(latents), temperature=temperature)
        if mode is None:
            temps = temperature if isinstance(temperature, Sequence) else [temperature]
            mode = all(t == 0 for t in temps)
        params = self.likelihood(h)
        if not torch.isfinite(params).all():
            raise NonFiniteOutputError("the model's output is not finite (diverged weights?): nothing to draw")
        return self.likelihood.to_uint8(self.likelihood.sample(params, mode=mode))

    def sample(self, n: int, temperature=1.0, mode=None):
        """n unconditional samples, uint8 (N, C, H, W); see `decode` for temperature and mode."""
        return self.decode([], temperature, mode, n=n)

    def reconstruct(self, x, k=None, temperature=1.0, mode=None):
        """Keep the posterior means of the first k groups of x (all by default), sample the rest."""
        latents = self.encode(x)
        return self.decode(latents[: self.n_groups if k is None else k], temperature, mode, n=x.shape[0])


def mirrored_skips(enc_specs, dec_specs) -> list[int]:
    """For each decoder block, the index of the encoder block whose skip it reads (Efficient-VDVAE's
    pairing): at each resolution the decoder's blocks take the encoder's in reverse order, one to one,
    and `RrN` blocks take the skip of the block before them. Fails, naming the resolution, otherwise."""
    unused = {}
    for i, s in enumerate(enc_specs):
        unused.setdefault(s.resolution, []).append(i)

    def mismatch(r):
        n_enc = sum(s.resolution == r for s in enc_specs)
        n_dec = sum(s.resolution == r and not s.reuses_skip for s in dec_specs)
        return ValueError(
            f"network=efficient pairs encoder and decoder blocks: at resolution {r} the encoder has {n_enc} "
            f"blocks but the decoder {n_dec} (not counting RrN blocks, which reuse a skip)"
        )

    keys, previous = [], None
    for s in dec_specs:
        if s.reuses_skip:
            if previous != s.resolution:
                raise ValueError(f"decoder block {s.resolution}rN: no block at {s.resolution} before it to share")
            keys.append(keys[-1])
        elif unused.get(s.resolution):
            keys.append(unused[s.resolution].pop())
        else:
            raise mismatch(s.resolution)
        previous = s.resolution
    left = [r for r, indices in unused.items() if indices]
    if left:
        raise mismatch(left[0])
    return keys


def _check_architecture(image_size, widths, enc_specs, dec_specs, zdim, no_latent_above, network="vdvae"):
    """Fail at construction, naming the problem, if the block strings cannot form a VDVAE."""
    if zdim < 1:
        raise ValueError(f"zdim must be positive, got {zdim}")
    res = image_size
    if enc_specs[0].resolution != image_size:
        raise ValueError(f"encoder starts at resolution {enc_specs[0].resolution} but image_size is {image_size}")
    reached = {image_size}
    for s in enc_specs:
        if s.resolution != res:
            raise ValueError(f"encoder block at resolution {s.resolution} follows blocks that end at {res}")
        if s.down_rate is not None:
            if res % s.down_rate:
                raise ValueError(f"encoder: resolution {res} is not divisible by the pool factor {s.down_rate}")
            res //= s.down_rate
            if network == "vdvae" and widths[res] < widths[s.resolution]:
                raise ValueError(
                    f"custom widths: width {widths[res]} at resolution {res} is below {widths[s.resolution]} at "
                    f"{s.resolution}; encoder channels can only grow (they are zero-padded)"
                )
        reached.add(res)
    decoded = set()
    for s in dec_specs:
        if s.resolution not in reached:
            raise ValueError(
                f"decoder block at resolution {s.resolution}: the encoder never reaches it (it has {sorted(reached)})"
            )
        if s.mixin is not None:
            if s.mixin not in decoded:
                raise ValueError(
                    f"decoder block {s.resolution}m{s.mixin}: no earlier decoder block at resolution {s.mixin}"
                )
            if s.resolution % s.mixin or s.resolution <= s.mixin:
                raise ValueError(
                    f"decoder block {s.resolution}m{s.mixin}: {s.resolution} must be a multiple of {s.mixin}"
                )
        decoded.add(s.resolution)
    if dec_specs[-1].resolution != image_size:
        raise ValueError(f"decoder ends at resolution {dec_specs[-1].resolution} but image_size is {image_size}")
    if not any(no_latent_above is None or s.resolution <= no_latent_above for s in dec_specs):
        raise ValueError(f"no_latent_above={no_latent_above} leaves the decoder without a latent group")
