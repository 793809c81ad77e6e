"""Image-quality metrics (PSNR, SSIM, LPIPS) on images in [0, 1].

LPIPS is built fully offline: the ``lpips`` package normally downloads torchvision's
ImageNet AlexNet/VGG16 at construction; here the backbone is created randomly
(``pnet_rand=True``) and its conv weights are then loaded from a local safetensors file
(``<weights_dir>/{alexnet,vgg16}_features.safetensors``, keys as in
``torchvision.models.alexnet().features.state_dict()``).  The small linear heads ship
inside the lpips wheel.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from lrf.errors import WeightsError, describe_error

__all__ = ["psnr", "ssim", "LPIPS", "default_lpips_dir"]

_BACKBONE_FILES = {"alex": "alexnet_features.safetensors", "vgg": "vgg16_features.safetensors"}


def _as_batch(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    if pred.dim() == 3:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    if pred.dim() != 4:
        raise ValueError(f"expected [B,C,H,W] or [C,H,W] images, got {tuple(pred.shape)}")
    return pred, target


@torch.no_grad()
def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """Mean over the batch of per-image PSNR in dB (the usual NeRF evaluation convention).

    Identical images give ``inf``.  Inputs are not clamped: clamp predictions first if they
    may leave [0, 1].
    """
    pred, target = _as_batch(pred, target)
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    values = [math.inf if m == 0 else 10.0 * math.log10(data_range**2 / m) for m in mse.tolist()]
    return float(sum(values) / len(values))


@torch.no_grad()
def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (torchmetrics defaults: 11x11 Gaussian window, sigma 1.5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = _as_batch(pred, target)
    value = structural_similarity_index_measure(pred.float(), target.float(), data_range=data_range)
    return float(value)


def default_lpips_dir() -> Path:
    """``$LRF_SHARED/weights/lpips``; ``LRF_SHARED`` defaults to ``<repo>/../shared``."""
    shared = os.environ.get("LRF_SHARED") or Path(__file__).resolve().parents[1].parent / "shared"
    return Path(shared) / "weights" / "lpips"


def _load_backbone(kind: str, path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WeightsError(kind, path, "file not found" if not path.exists() else "not a file")
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as exc:  # truncated / not safetensors
        raise WeightsError(kind, path, f"cannot be read as safetensors ({describe_error(exc)})") from None


class LPIPS(nn.Module):
    """Frozen LPIPS distance, differentiable w.r.t. its inputs (usable as a loss).

    ``forward(pred, target)`` takes images in [0, 1] ([B,3,H,W] or [3,H,W]) and returns the
    per-image distance, shape [B] (a scalar for unbatched input).  The module stays in eval
    mode even if a parent calls ``.train()`` (the heads contain dropout).
    """

    def __init__(
        self,
        net: str = "alex",
        weights_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        if net not in _BACKBONE_FILES:
            raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(_BACKBONE_FILES)}")
        self.net_name = net
        kind = f"lpips-{net}"
        path = Path(weights_dir if weights_dir is not None else default_lpips_dir()) / _BACKBONE_FILES[net]
        backbone = _load_backbone(kind, path)  # fail before building anything

        import lpips

        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" noise
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)

        # lpips splits torchvision's `features` into slice1..5, keeping the original
        # Sequential indices as child names, so `features.<i>.weight` -> `net.sliceK.<i>.weight`.
        targets: dict[str, Tensor] = {}
        for slice_name, block in model.net.named_children():
            for idx, layer in block.named_children():
                for pname, param in layer.named_parameters(recurse=False):
                    targets[f"{idx}.{pname}"] = param
        missing = sorted(set(targets) - set(backbone))
        extra = sorted(set(backbone) - set(targets))
        wrong = [k for k in targets if k in backbone and backbone[k].shape != targets[k].shape]
        if missing or extra or wrong:
            problems = []
            if missing:
                problems.append(f"missing keys {missing[:3]}")
            if extra:
                problems.append(f"unexpected keys {extra[:3]}")
            if wrong:
                k = wrong[0]
                problems.append(
                    f"wrong shape for {k}: {tuple(backbone[k].shape)} (expected {tuple(targets[k].shape)})"
                )
            raise WeightsError(kind, path, f"does not match torchvision {net} features: " + "; ".join(problems))
        with torch.no_grad():
            for key, param in targets.items():
                param.copy_(backbone[key].to(param.dtype))

        self.model = model
        self.model.eval()
        self.model.requires_grad_(False)
        self.to(device)

    def train(self, mode: bool = True) -> "LPIPS":
        """Always eval: LPIPS is a fixed metric, never trained here."""
        return super().train(False)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        unbatched = pred.dim() == 3
        pred, target = _as_batch(pred, target)
        dist = self.model(pred, target, normalize=True)  # normalize: [0,1] -> [-1,1]
        dist = dist.flatten()
        return dist[0] if unbatched else dist


def load_lpips(net: str, weights_dir: str | Path, device="cpu") -> "LPIPS":
    """The LPIPS metric/loss whose backbone lies in the weights folder's lpips/ (no download)."""
    return LPIPS(net, Path(weights_dir) / "lpips", device=device)


def psnr_l1(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, mean L1) of a clamped prediction; the numbers alignment/recon reports use."""
    pred = pred.clamp(0, 1)
    return psnr(pred, target), float((pred - target).abs().mean())
