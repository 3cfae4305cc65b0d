"""Deep-R training losses (torch): MS-SSIM, BerHu and least-squares adversarial terms.

Generator loss, eq. (1) of the paper::

    L_G = lambda (1 - D(G(x)))^2 + nu (1 - MSSSIM(y, G(x))) + xi BerHu(y, G(x))

(the paper writes ``MSSSIM`` for the structural term; as a loss to minimise it is used as
``1 - MSSSIM``). Discriminator loss, eq. (2)::

    L_D = D(G(x))^2 + (1 - D(y))^2

MS-SSIM follows ``tf.image.ssim_multiscale`` with its defaults: 5 scales with power factors
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333), an 11x11 Gaussian window of sigma 1.5, K1 = 0.01,
K2 = 0.03, 'valid' filtering, 2x2 average pooling between scales (odd sizes padded
symmetrically first), and negative contrast-structure values clipped to zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW_PX = 11
WINDOW_SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _gaussian_window(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(WINDOW_PX, dtype=dtype, device=device) - (WINDOW_PX - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * WINDOW_SIGMA**2))
    g = g / g.sum()
    return g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    x = F.conv2d(x, window, groups=c)
    return F.conv2d(x, window.transpose(2, 3), groups=c)


def _ssim_and_cs(
    x: torch.Tensor, y: torch.Tensor, max_val: torch.Tensor, window: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    c1 = (K1 * max_val) ** 2
    c2 = (K2 * max_val) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    sigma_xx = _blur(x * x, window) - mu_x**2
    sigma_yy = _blur(y * y, window) - mu_y**2
    sigma_xy = _blur(x * y, window) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    cs = (2 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2)
    return (luminance * cs).mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def ms_ssim(x: torch.Tensor, y: torch.Tensor, max_val: float | torch.Tensor) -> torch.Tensor:
    """Multi-scale SSIM as ``tf.image.ssim_multiscale`` computes it.

    Parameters
    ----------
    x, y : Tensor of shape (N, C, H, W)
        Images to compare; H and W at least 11 * 16 = 176.
    max_val : float or Tensor of shape (N,)
        Dynamic range of the images (per image when a tensor).

    Returns
    -------
    Tensor of shape (N,)
        MS-SSIM per image, averaged over channels.
    """
    if min(x.shape[-2:]) < WINDOW_PX * 2 ** (len(POWER_FACTORS) - 1):
        raise ValueError("MS-SSIM with 5 scales needs images of at least 176 x 176 pixels")
    window = _gaussian_window(x.shape[1], x.dtype, x.device)
    mv = torch.as_tensor(max_val, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    values = []
    for scale in range(len(POWER_FACTORS)):
        ssim, cs = _ssim_and_cs(x, y, mv, window)
        if scale == len(POWER_FACTORS) - 1:
            values.append(F.relu(ssim))
        else:
            values.append(F.relu(cs))
            pad_h, pad_w = x.shape[-2] % 2, x.shape[-1] % 2
            if pad_h or pad_w:
                # tf pads odd sizes symmetrically (edge repeated) before pooling
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
                y = F.pad(y, (0, pad_w, 0, pad_h), mode="replicate")
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=-1)  # (N, C, scales)
    weights = torch.tensor(POWER_FACTORS, dtype=x.dtype, device=x.device)
    return torch.prod(stacked**weights, dim=-1).mean(dim=1)


def berhu(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    c: torch.Tensor | float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reversed Huber loss, eq. (4) of the paper.

    Parameters
    ----------
    prediction, target : Tensor of shape (N, C, H, W)
        Network output and ground truth (normalised).
    c : Tensor of shape (N,) or float, optional
        Threshold between the L1 and the L2 branch; default 10% of each target's
        standard deviation, as in the paper.
    reduction : {"mean", "sum"}
        Mean over pixels (scale-free, used in training) or the paper's plain sum.

    Returns
    -------
    Tensor of shape (N,)
        The loss per image.
    """
    if c is None:
        c = 0.1 * target.flatten(1).std(dim=1)
    c_t = torch.as_tensor(c, dtype=target.dtype, device=target.device).reshape(-1, 1, 1, 1)
    c_t = torch.clamp(c_t, min=1e-6)
    diff = (prediction - target).abs()
    loss = torch.where(diff <= c_t, diff, (diff**2 + c_t**2) / (2 * c_t))
    if reduction == "sum":
        return loss.flatten(1).sum(dim=1)
    if reduction == "mean":
        return loss.flatten(1).mean(dim=1)
    raise ValueError("reduction must be 'mean' or 'sum'")


def generator_adversarial(d_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares adversarial term of eq. (1): ``(1 - D(G(x)))^2`` per image."""
    return (1.0 - d_fake) ** 2


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor) -> torch.Tensor:
    """Eq. (2): ``D(G(x))^2 + (1 - D(y))^2`` per image."""
    return d_fake**2 + (1.0 - d_real) ** 2
