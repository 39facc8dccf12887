"""How the classification head starts fine-tuning (finetune.head_init).

    probe     the linear probe's weights, fitted on the cached features (linear probe, then fine-tune:
              the pretrained features are not wrecked by a random head's large early gradients)
    xavier    random (Xavier-uniform weights, zero bias)
    imagenet  for each target class whose name matches an ImageNet category of the backbone (any of the
              category's comma-separated synonyms, case-insensitive; a class name like `T-shirt_top` is
              also tried part by part), the head row starts from the pretrained classifier's row;
              the other rows are Xavier
"""

from __future__ import annotations

import re

import torch
from torch import nn


def xavier_head(head: nn.Linear, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = (6.0 / (head.in_features + head.out_features)) ** 0.5
        head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 * bound - bound)
        head.bias.zero_()


def imagenet_descriptions() -> list[str]:
    """The 1000 ImageNet-1k category descriptions in classifier order ("jersey, T-shirt, tee shirt")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(index) for index in range(1000)]


def _normalise(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def _candidates(class_name: str) -> list[str]:
    """The whole class name first, then its parts split on '_', '/' and ' '."""
    whole = _normalise(class_name)
    parts = [_normalise(part) for part in re.split(r"[_/ ]+", class_name) if part.strip()]
    return [whole] + [part for part in parts if part != whole]


def match_imagenet_classes(classes: list[str], descriptions: list[str]) -> dict[int, int]:
    """{target class index: ImageNet index} for the classes whose name is an ImageNet synonym."""
    synonyms: dict[str, int] = {}
    for index, description in enumerate(descriptions):
        for synonym in description.split(","):
            synonyms.setdefault(_normalise(synonym), index)  # the first category wins on shared synonyms
    matches = {}
    for target, name in enumerate(classes):
        for candidate in _candidates(name):
            if candidate in synonyms:
                matches[target] = synonyms[candidate]
                break
    return matches


def imagenet_overlap_head(head: nn.Linear, classes: list[str], classifier: nn.Linear | None, seed: int,
                          descriptions: list[str] | None = None) -> dict[str, str]:
    """Xavier head whose rows for ImageNet-matching classes are the pretrained classifier's; returns matches."""
    if classifier is None:
        raise ValueError("finetune.head_init: imagenet needs the ImageNet classifier: set backbone.weights: "
                         "imagenet, or use head_init: probe or xavier")
    if classifier.in_features != head.in_features:
        raise ValueError(f"the ImageNet classifier takes {classifier.in_features} features but the head "
                         f"{head.in_features}; use head_init: probe or xavier for this backbone")
    descriptions = descriptions or imagenet_descriptions()
    xavier_head(head, seed)
    matches = match_imagenet_classes(classes, descriptions)
    with torch.no_grad():
        for target, source in matches.items():
            head.weight[target] = classifier.weight[source]
            head.bias[target] = classifier.bias[source]
    return {classes[target]: descriptions[source] for target, source in matches.items()}
