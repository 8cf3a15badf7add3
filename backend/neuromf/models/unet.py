"""MeanFlow UNet: MONAI's DiffusionModelUNet conditioned on (r, t) instead of a single timestep."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

# MONAI's sinusoidal timestep embedding is tuned for diffusion timesteps in [0, 1000]
TIME_SCALE = 1000.0


@dataclass(frozen=True)
class UNetPreset:
    """Architecture of a MeanFlow UNet (and its ControlNet): widths, attention and res blocks per level, norm groups."""
    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_res_blocks: tuple[int, ...]
    norm_num_groups: int
    num_head_channels: int


X_PREDICTION_MIN_T = 0.05  # x-prediction outputs: u = (x - x^) / t would blow up as t -> 0


def x_preconditioning(t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's skip and output scales (Karras et al. 2022) on the straight path z = (1 - t) x + t eps.

    x^ = mean + c_skip (z - (1 - t) mean) + c_out F: at t = 0 the estimate is the input itself (c_skip = 1,
    c_out = 0), at t = 1 it is mean + sigma_data F. Written in t so that neither end divides by zero.

    Args:
        t: times in [0, 1], any shape.
        sigma_data: the data's spread around `mean` that the skip trusts the input for.
    Returns:
        (c_skip, c_out), shaped like t.
    """
    denominator = t ** 2 + sigma_data ** 2 * (1 - t) ** 2
    return sigma_data ** 2 * (1 - t) / denominator, t * sigma_data / denominator.sqrt()

UNET_PRESETS: dict[str, UNetPreset] = {
    # unit tests: seconds on CPU
    "tiny": UNetPreset((16, 32), (False, True), (1, 1), 8, 16),
    # the embedded CPU default on 16^3 latents (64^3 volumes at 3 mm)
    "small": UNetPreset((32, 64, 128), (False, False, True), (1, 1, 1), 16, 32),
    # GPU configuration on 32^3 latents (128^3 volumes): attention at the two lowest levels
    "base": UNetPreset((64, 128, 256, 512), (False, False, True, True), (2, 2, 2, 2), 32, 64),
}


def meanflow_embedding(net: nn.Module, x: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The (r, t) conditioning shared by the UNet and its ControlNet: embed(t) + interval_embed(t - r).

    t - r is computed here, inside the function a JVP differentiates, so a tangent on t moves it.

    Args:
        net: a `MeanFlowUNet` or `MeanFlowControlNet` (its `time_embed`, `interval_embed`, `block_out_channels`).
        x: (B, C, h, w, d) latents; only its batch size and dtype are used.
        r, t: (B,) times in [0, 1] with r <= t.
    Returns:
        (B, 4 * channels[0]) time embedding, in x's dtype.
    Raises:
        ValueError: r or t is not of shape (B,).
    """
    if r.ndim != 1 or t.ndim != 1 or r.shape[0] != x.shape[0] or t.shape[0] != x.shape[0]:
        raise ValueError(f"r and t must have shape ({x.shape[0]},), got {tuple(r.shape)} and {tuple(t.shape)}")
    width = net.block_out_channels[0]

    def embed(values: torch.Tensor) -> torch.Tensor:
        return get_timestep_embedding(values * TIME_SCALE, width).to(x.dtype)

    return net.time_embed(embed(t)) + net.interval_embed(embed(t - r))


def interval_embedding(width: int) -> nn.Sequential:
    """Embedding of t - r whose last layer starts at zero: a flow-matching network is unchanged by adding it.

    Args:
        width: channels[0] of the UNet preset (the sinusoidal embedding's size).
    Returns:
        Linear(width, 4 width) -> SiLU -> Linear(4 width, 4 width): (B, width) -> (B, 4 * width), zero at init.
    """
    embed = nn.Sequential(nn.Linear(width, width * 4), nn.SiLU(), nn.Linear(width * 4, width * 4))
    nn.init.zeros_(embed[2].weight)
    nn.init.zeros_(embed[2].bias)
    return embed


class MeanFlowUNet(DiffusionModelUNet):
    """u_theta(z, r, t): the average velocity between times r <= t (t=0 data, t=1 noise).

    The UNet's own timestep embedding sees t; a second embedding of (t - r), zero-initialised in its last layer,
    is added to it. A plain flow-matching UNet's weights therefore load unchanged and give identical outputs.
    The interval t - r is computed inside forward so a JVP with tangent (v, 0, 1) over (z, r, t) sees it move.

    Args:
        in_channels: latent channels C of the input (B, C, h, w, d); 4 for image latents.
        out_channels: channels of the output velocity; default in_channels.
        preset: architecture from `UNET_PRESETS` ("tiny", "small", "base").
        use_flash_attention: fused attention kernels; they have no forward-mode AD, so off wherever a JVP runs.
    """

    def __init__(self, in_channels: int = 4, out_channels: int | None = None, preset: str = "small",
                 use_flash_attention: bool = False) -> None:
        if preset not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
        p = UNET_PRESETS[preset]
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels or in_channels,
            num_res_blocks=p.num_res_blocks,
            channels=p.channels,
            attention_levels=p.attention_levels,
            norm_num_groups=p.norm_num_groups,
            num_head_channels=p.num_head_channels,
            # fused SDPA kernels have no forward-mode AD: keep them off wherever a JVP runs
            use_flash_attention=use_flash_attention,
        )
        self.preset = preset
        self.interval_embed = interval_embedding(p.channels[0])
        # joint mode: the last `skip_channels` outputs get their input added (u = z + g), so at t = 1 the
        # network need not carry the noise through itself: one-step x = eps - u = -g (see widen_io_channels)
        self.skip_channels = 0
        # joint mode, x-prediction: the last `x_channels` outputs are a clean-latent estimate x^ and the velocity is
        # u = (x - x^) / t, exact on the straight path for every t; k-step and Euler sampling then move like DDIM,
        # which commits to a lesion step by step instead of averaging over where it could be
        self.x_channels = 0
        # ... with a skip (`x_preconditioning`) when x_sigma_data > 0: at small t the estimate is the input, so a
        # lesion the sampler has drawn is kept, not shrunk by a network that must learn the identity through LoRA
        self.x_sigma_data = 0.0
        self.x_mean = 0.0  # the mask channels' mean (about the empty mask's value), what F = 0 estimates at t = 1

    @property
    def arch(self) -> dict:
        """Constructor arguments + preset architecture: written to `model.json` to rebuild the UNet."""
        return {"preset": self.preset, "in_channels": self.in_channels, "out_channels": self.out_channels,
                **asdict(UNET_PRESETS[self.preset])}

    def forward(self, x: torch.Tensor, r: torch.Tensor, t: torch.Tensor,  # type: ignore[override]
                down_residuals: list[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        """Average velocity u(x, r, t).

        Args:
            x: (B, C, h, w, d) latents at time t.
            r, t: (B,) times in [0, 1] with r <= t.
            down_residuals, mid_residual: optional ControlNet residuals added to the skip connections and the
                middle block (the shapes `MeanFlowControlNet` returns), as in MONAI's DiffusionModelUNet.
        Returns:
            (B, C_out, h, w, d).
        """
        emb = meanflow_embedding(self, x, r, t)
        h = self.conv_in(x)
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=emb, context=None)
            skips.extend(res)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down residuals, got {len(down_residuals)}")
            skips = [s + extra for s, extra in zip(skips, down_residuals)]
        h = self.middle_block(hidden_states=h, temb=emb, context=None)
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(hidden_states=h, res_hidden_states_list=skips[-n:], temb=emb, context=None)
            skips = skips[:-n]
        out = self.out(h)
        if self.skip_channels:
            k = self.skip_channels
            out = torch.cat([out[:, :-k], out[:, -k:] + x[:, -k:]], dim=1)
        if self.x_channels:
            k = self.x_channels
            t_col = t.view(-1, *([1] * (x.dim() - 1)))
            estimate = out[:, -k:]
            if self.x_sigma_data > 0:
                c_skip, c_out = x_preconditioning(t_col, self.x_sigma_data)
                estimate = self.x_mean + c_skip * (x[:, -k:] - (1 - t_col) * self.x_mean) + c_out * estimate
            out = torch.cat([out[:, :-k], (x[:, -k:] - estimate) / t_col.clamp(min=X_PREDICTION_MIN_T)], dim=1)
        return out


def build_unet(preset: str, in_channels: int = 4, out_channels: int | None = None) -> MeanFlowUNet:
    """A fresh MeanFlow UNet of a preset (`UNET_PRESETS`).

    Args:
        preset: "tiny", "small" or "base".
        in_channels: latent channels C of its input (B, C, h, w, d).
        out_channels: channels of its output velocity; default in_channels.
    Returns:
        The untrained `MeanFlowUNet`.
    """
    return MeanFlowUNet(in_channels=in_channels, out_channels=out_channels, preset=preset)
