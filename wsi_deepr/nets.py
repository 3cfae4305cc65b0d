"""Deep-R networks (torch): residual U-Net generator and convolutional discriminator.

Generator (paper, Methods): a U-Net whose every level holds two 3x3 convolutions with a
residual addition and LeakyReLU; max-pooling down, transposed convolution up, skip
concatenation. Widths per level are a parameter, so small fast variants and paper-sized
ones share one definition. The network pads its input to a multiple of ``2 ** (levels-1)``
(edge replication) and crops back, so any height and width work, in torch and in the
exported ONNX graph. An optional global residual (output = input + correction) keeps an
in-focus input unharmed.

Discriminator: blocks of 3x3 convolutions (the second strided), global average pooling,
two fully connected layers, sigmoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NEGATIVE_SLOPE = 0.1


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with LeakyReLU and a residual addition."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.conv1(x), NEGATIVE_SLOPE)
        y = self.conv2(y)
        return F.leaky_relu(y + self.skip(x), NEGATIVE_SLOPE)


class Generator(nn.Module):
    """Residual U-Net mapping a defocused image to an in-focus one.

    Parameters
    ----------
    channels : int
        Input and output channels (3 for RGB brightfield, 1 for fluorescence).
    widths : sequence of int
        Feature channels per level, finest first; ``len(widths)`` levels.
    global_residual : bool
        Add the input to the output (the network learns a correction).
    """

    def __init__(
        self,
        channels: int,
        widths: Sequence[int] = (16, 24, 32, 48, 64),
        global_residual: bool = True,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.widths = tuple(int(w) for w in widths)
        self.global_residual = global_residual
        self.size_multiple = 2 ** (len(self.widths) - 1)
        self.down = nn.ModuleList()
        prev = channels
        for w in self.widths:
            self.down.append(ResidualBlock(prev, w))
            prev = w
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for fine, coarse in zip(self.widths[-2::-1], self.widths[:0:-1], strict=True):
            self.upsample.append(nn.ConvTranspose2d(coarse, fine, 2, stride=2))
            self.up.append(ResidualBlock(2 * fine, fine))
        self.head = nn.Conv2d(self.widths[0], channels, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if global_residual:
            nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        m = self.size_multiple
        pad_h = (m - height % m) % m
        pad_w = (m - width % m) % m
        padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        y = padded
        for level, block in enumerate(self.down):
            if level:
                y = F.max_pool2d(y, 2)
            y = block(y)
            skips.append(y)
        for upsample, block, skip in zip(self.upsample, self.up, skips[-2::-1], strict=True):
            y = block(torch.cat([upsample(y), skip], dim=1))
        y = self.head(y)
        if self.global_residual:
            y = y + padded
        return y[..., :height, :width]


class Discriminator(nn.Module):
    """Convolutional discriminator ending in global pooling, two FC layers and a sigmoid.

    Parameters
    ----------
    channels : int
        Image channels.
    widths : sequence of int
        Channels of the conv blocks; each block halves the resolution.
    """

    def __init__(self, channels: int, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = channels
        for w in widths:
            layers += [
                nn.Conv2d(prev, w, 3, padding=1),
                nn.LeakyReLU(NEGATIVE_SLOPE),
                nn.Conv2d(w, w, 3, stride=2, padding=1),
                nn.LeakyReLU(NEGATIVE_SLOPE),
            ]
            prev = w
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(prev, prev)
        self.fc2 = nn.Linear(prev, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # The paper initialises the fully connected layers to 0.1.
        for fc in (self.fc1, self.fc2):
            nn.init.constant_(fc.weight, 0.1 / fc.in_features)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x).mean(dim=(2, 3))
        y = F.leaky_relu(self.fc1(y), NEGATIVE_SLOPE)
        return torch.sigmoid(self.fc2(y)).squeeze(1)


def macs_per_pixel(generator: Generator, size_px: int = 256) -> float:
    """Multiply-accumulates per input pixel of the generator's convolutions.

    Parameters
    ----------
    generator : Generator
        The network.
    size_px : int
        Edge of the square input used for counting.

    Returns
    -------
    float
        MACs divided by the number of input pixels.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d | nn.ConvTranspose2d)
        kernel = module.weight.shape[2] * module.weight.shape[3]
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels * kernel // module.groups
        else:
            total += inputs[0].numel() * module.out_channels * kernel

    handles = [
        m.register_forward_hook(hook)
        for m in generator.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        generator(torch.zeros(1, generator.channels, size_px, size_px))
    for h in handles:
        h.remove()
    return total / size_px**2
