"""Grad-CAM (transfer.evaluate.explain): on a data set where a bright patch in one corner decides the class,
a small CNN trained on it looks at that corner; a ViT's map is on its patch grid; overlays stay in their folder."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from finetune_helpers import tiny_classifier
from PIL import Image

from transfer.evaluate.diagnostics import (
    GRADCAM_CORRECT_PNG,
    GRADCAM_MISTAKES_PNG,
    correct_sample,
    write_run_diagnostics,
)
from transfer.evaluate.explain import (
    ExplainError,
    grad_cam,
    grad_cam_batches,
    input_pixels,
    overlay_name,
    side_by_side,
    write_overlay,
)
from transfer.models.backbones import Classifier, load_backbone

SIZE, PATCH = 32, 8
CORNERS = [(0, 0), (0, SIZE - PATCH), (SIZE - PATCH, 0), (SIZE - PATCH, SIZE - PATCH)]
MIN_CORNER_MASS = 0.5  # of the map, in the top-left quarter of the image (a uniform map puts 0.25 there)


def corner_data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy grey images with one bright patch: class 1 when it is in the top-left corner, class 0 when it is
    in one of the other three. Brightness alone says nothing; only the top-left corner decides."""
    generator = torch.Generator().manual_seed(seed)
    images = (torch.randn(count, 3, SIZE, SIZE, generator=generator) * 0.3).clamp(-1, 1)
    labels = torch.arange(count) % 2
    for index in range(count):
        other = 1 + int(torch.randint(0, 3, (1,), generator=generator))
        top, left = CORNERS[0 if labels[index] == 1 else other]
        images[index, :, top : top + PATCH, left : left + PATCH] = 2.0
    return images, labels


@pytest.fixture(scope="module")
def corner_model() -> Classifier:
    """The tests' small 3-group CNN, random init, trained for 6 CPU epochs on 32 px images (its mean corner
    mass: 0.92)."""
    torch.manual_seed(0)
    model = tiny_classifier(num_classes=2)
    images, labels = corner_data(256, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(6):
        for batch in torch.randperm(len(images), generator=torch.Generator().manual_seed(1)).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


def test_the_map_of_a_model_trained_on_a_corner_patch_falls_in_that_corner(corner_model):
    images, labels = corner_data(64, seed=1)
    with torch.no_grad():
        accuracy = (corner_model(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95  # it learnt the task: only then is its map about the corner

    decided = images[labels == 1]  # images whose class the top-left patch decides
    result = grad_cam(corner_model, decided, classes=torch.ones(len(decided), dtype=torch.long))
    assert result.group == "block2"  # the backbone's last layer group
    assert result.maps.shape == (len(decided), SIZE, SIZE)
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1
    mass = result.maps.flatten(1).sum(1)
    corner = result.maps[:, : SIZE // 2, : SIZE // 2].flatten(1).sum(1) / mass
    assert float(corner.mean()) >= MIN_CORNER_MASS, corner
    assert float((corner >= MIN_CORNER_MASS).float().mean()) >= 0.9


def test_gradients_flow_to_the_map_when_every_parameter_is_frozen(corner_model):
    """A probe's backbone has no trainable parameter: the map must not depend on requires_grad."""
    images, _ = corner_data(8, seed=2)
    trainable = grad_cam(corner_model, images).maps
    for parameter in corner_model.parameters():
        parameter.requires_grad_(False)
    try:
        frozen = grad_cam(corner_model, images).maps
    finally:
        for parameter in corner_model.parameters():
            parameter.requires_grad_(True)
    assert torch.allclose(trainable, frozen)
    assert not corner_model.training


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_timm_cnn_and_vit_maps_have_the_input_shape_and_are_finite(name):
    """Random-init timm models: a CNN's map is its last group's; a ViT's drops the class token and lays the
    patch tokens on their 4x4 grid (64 px / 16), at the last block's input (class-token pooling)."""
    backbone = load_backbone(name, "none", 64).backbone
    model = Classifier(backbone, 3)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = grad_cam_batches(model, list(images), batch_size=1)
    assert result.maps.shape == (2, 64, 64)
    assert bool(torch.isfinite(result.maps).all()) and float(result.maps.max()) == pytest.approx(1.0)
    assert result.probabilities.shape == (2, 3)
    expected = {"resnet18": backbone.group_names[-1], "vit_tiny_patch16_224": backbone.group_names[-3]}[name]
    assert result.group == expected


def test_overlays_are_written_only_inside_the_folder_named(tmp_path):
    pixels = input_pixels(torch.zeros(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert pixels.shape == (16, 16, 3) and int(pixels[0, 0, 0]) == 128
    image = side_by_side(pixels, np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    assert image.size == (2 * 224, 224)

    out = tmp_path / "explained"
    name = overlay_name(3, "../../etc/pass wd.jpg")
    assert name == "0003_pass_wd.png"
    written = write_overlay(out, name, image)
    assert written.parent == out.resolve()
    assert Image.open(written).size == image.size

    outside = tmp_path / "outside.png"
    (out / "0004_link.png").symlink_to(outside)
    for bad in ("../escape.png", "sub/x.png", "0004_link.png"):
        with pytest.raises(ExplainError, match="not a file inside it"):
            write_overlay(out, bad, image)
    assert not outside.exists() and not (tmp_path / "escape.png").exists()


def test_correct_sample_takes_correct_predictions_per_class_reproducibly():
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    chosen = correct_sample(y_true, y_pred, 2)
    assert (y_true[chosen] == y_pred[chosen]).all()
    assert list(y_true[chosen]) == [0, 0, 1, 1]  # class 2 has no correct prediction
    assert (chosen == correct_sample(y_true, y_pred, 2)).all()


def test_the_run_report_shows_grad_cam_of_mistakes_and_correct_predictions(tmp_path, corner_model):
    """write_run_diagnostics, as the evaluate stage calls it: real image files, the trained corner model."""
    images, labels = corner_data(24, seed=3)
    with torch.no_grad():
        probs = corner_model(images).softmax(1).numpy()
    y_true = labels.numpy().copy()
    y_true[:3] = 1 - y_true[:3]  # three confident mistakes
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(input_pixels(image, (0.5,) * 3, (0.25,) * 3)).save(paths[-1])
    history = pd.DataFrame(
        {"epoch": [1, 2], "phase": ["probe"] * 2, "train_acc": [0.9, 1.0], "val_acc": [0.9, 1.0]}
        | {"train_loss": [0.3, 0.1], "val_loss": [0.3, 0.1]}
    )
    out = tmp_path / "diagnostics"
    _, files = write_run_diagnostics(
        out,
        class_names=["elsewhere", "top-left"],
        y_true=y_true,
        probs=probs,
        history=history,
        image_paths=paths,
        load_image=lambda path: Image.open(path).convert("RGB"),
        features=torch.randn(len(y_true), 16),
        model=corner_model,
        batch=images[:4],
        max_mistakes=4,
        model_input=lambda path: images[int(Path(path).stem)],
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        gradcam_per_class=2,
    )
    names = {path.name for path in files}
    assert {GRADCAM_MISTAKES_PNG, GRADCAM_CORRECT_PNG} <= names
    for name in (GRADCAM_MISTAKES_PNG, GRADCAM_CORRECT_PNG):
        assert Image.open(out / name).size[0] > 100
    page = (out / "report.html").read_text()
    assert "Where the model looked (Grad-CAM)" in page and html.escape("'block2'") in page

    _, files = write_run_diagnostics(
        tmp_path / "without",
        class_names=["elsewhere", "top-left"],
        y_true=y_true,
        probs=probs,
        history=history,
        image_paths=paths,
        load_image=lambda path: Image.open(path).convert("RGB"),
        features=torch.randn(len(y_true), 16),
        model=corner_model,
        batch=images[:4],
        model_input=lambda path: images[int(Path(path).stem)],
        gradcam_per_class=0,
    )
    assert not {GRADCAM_MISTAKES_PNG, GRADCAM_CORRECT_PNG} & {path.name for path in files}


def test_a_model_on_several_backbones_is_refused_with_a_reason():
    """Concatenated backbones (heads on cached features) have one grid each: no single map to draw."""
    from finetune_helpers import tiny_backbone

    from transfer.evaluate.explain import check_explainable
    from transfer.models.backbones import ConcatBackbone, DataConfig, LoadedBackbone

    config = DataConfig(16, 16, (0.5,) * 3, (0.25,) * 3, "bilinear")
    members = [LoadedBackbone(tiny_backbone(seed=seed), config, None) for seed in (0, 1)]
    model = Classifier(ConcatBackbone(members), 2)
    with pytest.raises(ExplainError, match="several"):
        check_explainable(model)
    with pytest.raises(ExplainError, match="several"):
        grad_cam(model, torch.zeros(1, 3, 16, 16))


def test_grad_cam_runs_on_a_model_the_evaluation_has_just_used(corner_model):
    """The evaluate stage predicts first (in inference mode, converting the model to channels_last), then draws
    the maps with the same model: the conversion must leave tensors autograd can use."""
    from transfer.evaluate.metrics import predict_logits_and_features

    images, labels = corner_data(8, seed=4)
    dataset = torch.utils.data.TensorDataset(images, labels)
    logits, _ = predict_logits_and_features(corner_model, dataset, 4, torch.device("cpu"))
    result = grad_cam(corner_model, images)
    assert torch.equal(result.classes, logits.argmax(1)) and bool(torch.isfinite(result.maps).all())


def test_a_scikit_learn_head_is_refused_with_a_reason_not_a_crash(tmp_path):
    """A head fitted on cached features (head.kind logreg, knn, ...) passes no gradient: ExplainError names why,
    and the run report shows that note instead of the evaluate stage failing."""
    from sklearn.linear_model import LogisticRegression

    from transfer.models.heads import FittedHead

    model = tiny_classifier(num_classes=2).eval()
    images = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        features = model.backbone(images).numpy()
    model.head = FittedHead(LogisticRegression().fit(features, [0, 1, 0, 1, 0, 1]), "logreg")
    with pytest.raises(ExplainError, match="not differentiable"):
        grad_cam(model, images)
    with pytest.raises(ExplainError, match="not differentiable"):
        grad_cam_batches(model, list(images))
