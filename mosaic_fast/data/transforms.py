"""The seed's image transforms (DESIGN.md §3), driven by an explicit random generator.

2D: uint8 (H, W) or (H, W, 3) → float RGB in [0, 1] (grey repeated, as medmnist's ``as_rgb``) → resized
to the model's size (bilinear, antialiased) → ImageNet mean/std. The student's view then gets a
horizontal flip (p = 0.5) and a rotation by U(-15°, 15°) (nearest, zero fill after normalisation), the
seed's order. 3D: uint8 (D, H, W) → /255 in [0, 1], one channel → resized (trilinear). The student's
view gets brightness + U(-0.1, 0.1) and contrast × U(0.9, 1.1) around the mean (p = 0.5 each), clamped
to [0, 1]. Teacher and evaluation views are the clean ones.

Every random draw comes from the ``numpy.random.Generator`` passed in, which the sampler seeds per
sample: the same run, interrupted and resumed, sees the same augmented images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def clean_view_2d(image: np.ndarray, size: int) -> torch.Tensor:
    """Normalised (3, size, size) float view of a uint8 (H, W) or (H, W, 3) image."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)
    x = x.unsqueeze(0).expand(3, -1, -1) if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def augment_2d(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Student view of a normalised 2D image: HFlip(0.5), then RandomRotation(15)."""
    from torchvision.transforms.v2 import functional as TF  # imported here: it takes a second to load

    if rng.random() < 0.5:
        x = TF.horizontal_flip(x)
    angle = float(rng.uniform(-15.0, 15.0))
    return TF.rotate(x, angle, interpolation=TF.InterpolationMode.NEAREST, fill=0.0)


def clean_view_3d(volume: np.ndarray, size: int) -> torch.Tensor:
    """(1, size, size, size) float view in [0, 1] of a uint8 (D, H, W) volume."""
    x = torch.from_numpy(np.ascontiguousarray(volume)).float().div_(255.0)[None]
    if tuple(x.shape[1:]) != (size, size, size):
        x = F.interpolate(x[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0]
    return x


def augment_3d(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Student view of a volume in [0, 1]: brightness ±0.1 and contrast 0.9–1.1 (p = 0.5 each), clamped."""
    if rng.random() < 0.5:
        x = x + float(rng.uniform(-0.1, 0.1))
    if rng.random() < 0.5:
        mean = x.mean()
        x = (x - mean) * float(rng.uniform(0.9, 1.1)) + mean
    return x.clamp(0.0, 1.0)
