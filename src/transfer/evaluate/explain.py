"""Where the model looked: Grad-CAM maps over the backbone's layer groups, and their overlays.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of a layer's output by the mean gradient of the class
score over that output's positions, sums the channels and keeps the positive part: a coarse map of the regions
whose activation raised the score. The layer is the backbone's last layer group (transfer.models.groups owns
them), or the deepest group whose positions the score depends on:

- a CNN (timm, torchvision, the tests' small models): the last group's feature map, e.g. resnet's `layer4`,
  efficientnet_lite0's `head_conv`;
- a ViT: its token outputs with the prefix tokens (class token, registers: timm's `num_prefix_tokens`) dropped
  and the patch tokens laid back on their grid (image size / patch size). With class-token pooling the score
  depends only on the class token after the last block, so the gradient at the last groups' patch tokens is
  zero; the map is then taken at the last block's input (the output of the block before it), where each
  patch token reaches the class token through the last block's attention. With average pooling it is the
  last group's.

The map is upsampled to the model's input and scaled to [0, 1] per image; it shows the model's view of the
image (the evaluation's resize and centre crop), which is what the overlays draw it over. This is the few
lines of torch hooks that it takes rather than the `grad-cam` package (pytorch-grad-cam): that one pulls
opencv-python (about 60 MB of wheel, for a resize and a colour map that torch and matplotlib already do) and
ttach, and would still need the target-layer choice and the ViT reshape written here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from torch import nn

from transfer.pipeline.errors import UserError

CAM_CMAP = "jet"
OVERLAY_ALPHA = 0.45  # the map's share of each overlay pixel: the image stays readable under it


class ExplainError(UserError, ValueError):
    """Grad-CAM cannot be drawn for this model, or an overlay would be written outside the folder named."""


@dataclass
class CamResult:
    maps: torch.Tensor  # float [B, H, W] in [0, 1], at the input's size
    classes: torch.Tensor  # long [B]: the class each map explains
    probabilities: torch.Tensor  # float [B, num_classes]: the model's softmax on these images
    group: str  # the layer group the maps were taken at


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in (_first_tensor(item) for item in output) if t is not None), None)
    return None


def _as_grid(tensor: torch.Tensor, prefix_tokens: int, nhwc: bool) -> torch.Tensor | None:
    """A group's output (or its gradient) as [B, C, h, w]; None when it has no spatial layout."""
    if tensor.ndim == 4:
        return tensor.permute(0, 3, 1, 2) if nhwc else tensor
    if tensor.ndim == 3:  # tokens [B, N, C]: the patch tokens are the last N - prefix, in row-major order
        patches = tensor[:, prefix_tokens:]
        side = int(round(patches.shape[1] ** 0.5))
        if side == 0 or side * side != patches.shape[1]:
            return None
        return patches.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], side, side)
    return None


def _backbone_groups(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], int, bool]:
    backbone = model.backbone
    if hasattr(backbone, "members"):
        raise ExplainError(
            "Grad-CAM needs one backbone: this model concatenates several (a list under backbone:), whose "
            "maps would have different grids; explain a model trained on one backbone"
        )
    network = getattr(backbone, "network", None)
    prefix = int(getattr(network, "num_prefix_tokens", 0) or 0) if network is not None else 0
    return list(backbone.groups.items()), prefix, bool(getattr(backbone, "nhwc", False))


def check_explainable(model: nn.Module) -> None:
    """Raise ExplainError, before any work, for a model Grad-CAM cannot be drawn for (several backbones)."""
    _backbone_groups(model)


def grad_cam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor | None = None) -> CamResult:
    """Grad-CAM maps of a Classifier for a batch of model inputs [B, 3, H, W].

    `classes` are the classes to explain, one per image; None explains each image's predicted class. The
    model is run in eval mode with gradients on (its parameters need none: the input asks for them).
    """
    groups, prefix, nhwc = _backbone_groups(model)
    captured: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(_module, _inputs, output):
            tensor = _first_tensor(output)
            if tensor is not None and tensor.requires_grad:
                captured[name] = tensor

        return hook

    was_training = model.training
    model.eval()
    handles = [group.register_forward_hook(recorder(name)) for name, group in groups]
    try:
        with torch.enable_grad():
            # Frozen parameters need no gradient; the input's makes every activation carry one.
            inputs = images.detach().clone().requires_grad_(True)
            logits = model(inputs).float()
            chosen = logits.argmax(1) if classes is None else torch.as_tensor(classes, device=logits.device).long()
            score = logits.gather(1, chosen[:, None]).sum()  # images are independent: one backward for all
            names = [name for name, _ in groups if name in captured]
            grads = torch.autograd.grad(score, [captured[name] for name in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name, grad in reversed(list(zip(names, grads))):
        activation = _as_grid(captured[name].detach(), prefix, nhwc)
        gradient = None if grad is None else _as_grid(grad, prefix, nhwc)
        if activation is None or gradient is None or not bool(gradient.abs().sum() > 0):
            continue  # no spatial layout, or the score does not depend on its positions (a ViT's last groups)
        weights = gradient.float().mean((2, 3), keepdim=True)
        cam = torch.relu((weights * activation.float()).sum(1, keepdim=True))
        cam = nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(1).clamp_min(torch.finfo(cam.dtype).tiny)[:, None, None]
        maps = (cam / peak).clamp(0, 1).cpu()
        return CamResult(maps, chosen.cpu(), logits.detach().softmax(1).cpu(), name)
    raise ExplainError(
        f"Grad-CAM: no layer group of this backbone ({', '.join(n for n, _ in groups)}) has a spatial output "
        "the class score depends on"
    )


def grad_cam_batches(model: nn.Module, images: Sequence[torch.Tensor], batch_size: int = 16) -> CamResult:
    """`grad_cam` over many model inputs [3, H, W], `batch_size` at a time, on the model's device (a backward
    pass keeps every activation of the batch: the batch bounds the memory)."""
    device = next(model.parameters()).device
    parts = [
        grad_cam(model, torch.stack(list(images[start : start + batch_size])).to(device))
        for start in range(0, len(images), batch_size)
    ]
    if not parts:
        raise ExplainError("Grad-CAM: no image to explain")
    return CamResult(
        torch.cat([p.maps for p in parts]),
        torch.cat([p.classes for p in parts]),
        torch.cat([p.probabilities for p in parts]),
        parts[0].group,
    )


# --- Overlays --------------------------------------------------------------------------------------


def input_pixels(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A model input [3, H, W] back to the uint8 RGB pixels [H, W, 3] the model saw (mean/std undone)."""
    scale = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * scale + shift).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(1, 2, 0).numpy()


def overlay(pixels: np.ndarray, cam: torch.Tensor | np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The map in the `jet` colour map blended over uint8 RGB pixels [H, W, 3] of the same size."""
    colours = matplotlib.colormaps[CAM_CMAP](np.asarray(cam, dtype=np.float32))[..., :3] * 255
    return (pixels.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def side_by_side(pixels: np.ndarray, cam: torch.Tensor | np.ndarray, min_side: int = 224) -> Image.Image:
    """[the model's view | its Grad-CAM overlay] as one image, enlarged (nearest) to at least `min_side`."""
    both = np.concatenate([pixels, overlay(pixels, cam)], axis=1)
    image = Image.fromarray(both)
    factor = max(1, -(-min_side // pixels.shape[0]))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def overlay_name(index: int, source: str) -> str:
    """The overlay file's name for the index-th input: its position, then its file stem made safe."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem).strip("._") or "image"
    return f"{index:04d}_{stem[:80]}.png"


def write_overlay(out_dir: str | os.PathLike, name: str, image: Image.Image) -> Path:
    """Write `image` as out_dir/name, atomically; refuse any path that would land outside `out_dir`."""
    from transfer.pipeline.files import atomic_path

    root = Path(out_dir).resolve()
    target = root / name
    # A name with a separator, or a link already there pointing elsewhere, would escape the folder.
    if Path(name).name != name or target.resolve().parent != root:
        raise ExplainError(f"--explain {out_dir}: refusing to write {name!r}, which is not a file inside it")
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
    return target


EXPLAIN_BATCH = 16  # images per backward pass in `explain_images`: it keeps every activation of the batch


def explain_images(
    saved, items: Sequence[tuple[int, str]], out_dir: str | os.PathLike, device: torch.device | str = "cpu"
) -> list[Path]:
    """`transfer predict --explain DIR`: one PNG per (position, image path), [the model's view | its Grad-CAM
    overlay] for the predicted class, written into `out_dir` and nowhere else; returns the files written.

    Each image is decoded and prepared as the evaluation does (transfer.evaluate.inference.model_input).
    """
    from transfer.evaluate.inference import model_input

    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ExplainError(f"--explain {out_dir}: exists and is not a folder; name a folder for the overlays")
    root.mkdir(parents=True, exist_ok=True)
    config = saved.data_config
    model = saved.model.eval().to(device)
    written = []
    for start in range(0, len(items), EXPLAIN_BATCH):
        chunk = items[start : start + EXPLAIN_BATCH]
        inputs = [model_input(source, config) for _, source in chunk]
        result = grad_cam(model, torch.stack(inputs).to(device))
        for (index, source), tensor, cam in zip(chunk, inputs, result.maps):
            image = side_by_side(input_pixels(tensor, config.mean, config.std), cam)
            written.append(write_overlay(root, overlay_name(index, source), image))
    return written
