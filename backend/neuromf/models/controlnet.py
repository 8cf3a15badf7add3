"""Conditional mode (mask -> FLAIR): MONAI's ControlNet on the frozen MeanFlow UNet, conditioned on (r, t).

The lesion mask is a clean input at full resolution. MONAI's `ControlNet` embeds it to the latent grid (here by
default losslessly pixel-unshuffled, 4^3 image voxels -> 64 channels per latent voxel, then convolved: 10x cheaper
on a CPU than strided convolutions at full resolution) and returns one residual per skip connection plus one for
the middle block, which `MeanFlowUNet.forward` adds, so the mask reaches every resolution of the UNet (measured:
through `conv_in` alone it barely moved the FLAIR). The
ControlNet starts as a copy of the UNet's encoder with zero-initialised output convolutions: at step 0 the
conditioned model is exactly the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.nets import ControlNet
from safetensors.torch import load_file
from torch import nn

from neuromf.data.mask_codec import pixel_unshuffle_3d
from neuromf.models.adapter_meta import CONTROLNET_WEIGHTS
from neuromf.models.unet import UNET_PRESETS, MeanFlowUNet, interval_embedding, meanflow_embedding
from neuromf.vae import DOWNSAMPLE
from neuromf.weights import shipped_file


class MeanFlowControlNet(ControlNet):
    """ControlNet whose time conditioning is MeanFlow's (r, t) pair, like `MeanFlowUNet`.

    Args:
        in_channels: latent channels C of the UNet it conditions.
        preset: the UNet's preset (same encoder architecture).
        cond_channels: channels of the full-resolution conditioning (1: the lesion mask).
        embedding_channels: widths of the mask embedding; each entry after the first halves the grid with a strided
            convolution, the rest of the 4x is pixel-unshuffled first.
    """

    def __init__(self, in_channels: int, preset: str = "small", cond_channels: int = 1,
                 embedding_channels: Sequence[int] = (32,)) -> None:
        if preset not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
        # each extra entry of embedding_channels halves the grid; the rest of the 4x is pixel-unshuffled first
        strided = 2 ** (len(embedding_channels) - 1)
        if not embedding_channels or DOWNSAMPLE % strided:
            raise ValueError(f"embedding_channels needs 1 to {DOWNSAMPLE.bit_length()} entries (each after the "
                             f"first halves the grid), got {list(embedding_channels)}")
        unshuffle = DOWNSAMPLE // strided
        p = UNET_PRESETS[preset]
        super().__init__(spatial_dims=3, in_channels=in_channels, num_res_blocks=p.num_res_blocks,
                         channels=p.channels, attention_levels=p.attention_levels,
                         norm_num_groups=p.norm_num_groups, num_head_channels=p.num_head_channels,
                         conditioning_embedding_in_channels=cond_channels * unshuffle ** 3,
                         conditioning_embedding_num_channels=tuple(embedding_channels),
                         use_flash_attention=False)  # forward-mode AD (the JVP) has no fused SDPA
        self.preset = preset
        self.unshuffle = unshuffle
        self.cond_channels = cond_channels
        self.embedding_channels = tuple(int(c) for c in embedding_channels)
        self.interval_embed = interval_embedding(p.channels[0])

    @property
    def arch(self) -> dict:
        """Constructor arguments: stored in the conditional adapter's sidecar to rebuild the ControlNet."""
        return {"preset": self.preset, "in_channels": self.conv_in.conv.in_channels,
                "cond_channels": self.cond_channels, "embedding_channels": list(self.embedding_channels)}

    def forward(self, x: torch.Tensor, r: torch.Tensor, t: torch.Tensor,  # type: ignore[override]
                cond: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the UNet.

        Args:
            x: (B, C, h, w, d) latents at time t.
            r, t: (B,) times in [0, 1] with r <= t.
            cond: (B, cond_channels, 4h, 4w, 4d) conditioning on the image grid (the lesion mask in {0, 1}).
        Returns:
            (down residuals, one per UNet skip connection, each shaped as that skip; middle-block residual), the
            arguments `down_residuals` and `mid_residual` of `MeanFlowUNet.forward`.
        """
        emb = meanflow_embedding(self, x, r, t)
        if self.unshuffle > 1:
            cond = pixel_unshuffle_3d(cond, self.unshuffle)
        h = self.conv_in(x) + self.controlnet_cond_embedding(cond)
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=emb, context=None)
            skips.extend(res)
        h = self.middle_block(hidden_states=h, temb=emb, context=None)
        down = [zero_conv(s) for s, zero_conv in zip(skips, self.controlnet_down_blocks)]
        return down, self.controlnet_mid_block(h)


def controlnet_from_unet(unet: MeanFlowUNet, embedding_channels: Sequence[int] = (32,)) -> MeanFlowControlNet:
    """A ControlNet initialised from the UNet's encoder (conv_in, time embeddings, down and middle blocks).

    Args:
        unet: the frozen stage-1 UNet (image-only, C = 4).
        embedding_channels: widths of the mask embedding (see `MeanFlowControlNet`).
    Returns:
        The ControlNet on the UNet's device; its zero-initialised output convolutions leave the UNet unchanged.
    """
    net = MeanFlowControlNet(unet.in_channels, unet.preset, embedding_channels=embedding_channels)
    target = net.state_dict()
    shared = {k: v for k, v in unet.state_dict().items() if k in target and target[k].shape == v.shape}
    net.load_state_dict(shared, strict=False)
    return net.to(next(unet.parameters()).device)


class ConditionedFlowModel(nn.Module):
    """u(z, r, t | mask): the frozen MeanFlow UNet plus a trainable ControlNet; what stage 2's conditional mode
    trains (only the ControlNet has requires_grad) and samples with."""

    def __init__(self, unet: MeanFlowUNet, controlnet: MeanFlowControlNet) -> None:
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        for p in self.unet.parameters():
            p.requires_grad_(False)

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Average velocity u(z, r, t | cond).

        Args:
            z: (B, 4, h, w, d) image latents at time t.
            r, t: (B,) times in [0, 1] with r <= t.
            cond: (B, 1, 4h, 4w, 4d) lesion mask in {0, 1} on the image grid.
        Returns:
            (B, 4, h, w, d) velocity.
        """
        down, mid = self.controlnet(z, r, t, cond)
        return self.unet(z, r, t, down_residuals=down, mid_residual=mid)


def load_controlnet_weights(controlnet: MeanFlowControlNet, directory: Path) -> MeanFlowControlNet:
    """Load an adapter folder's ControlNet weights into `controlnet` (same architecture); returns it."""
    weights = shipped_file(directory / CONTROLNET_WEIGHTS)  # a shipped ControlNet: its sha256 checked
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise ValueError(f"{directory / CONTROLNET_WEIGHTS}: not a readable safetensors file ({err})") from err
    missing, unexpected = controlnet.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory / CONTROLNET_WEIGHTS}: weights do not fit the ControlNet "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return controlnet
