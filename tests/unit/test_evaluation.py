"""The evaluate stage's prediction: plain and with flip test-time augmentation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from transfer.evaluate.metrics import predict_logits


def asymmetric_model() -> nn.Module:
    # A linear layer on the flattened pixels sees left and right differently, so a mirror changes its output.
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))


def test_flip_tta_averages_the_softmax_of_each_image_and_its_mirror():
    model = asymmetric_model()
    images = torch.rand(7, 3, 8, 8)
    dataset = TensorDataset(images, torch.zeros(7, dtype=torch.long))

    plain = predict_logits(model, dataset, batch_size=3, device=torch.device("cpu"))
    flipped = predict_logits(model, dataset, batch_size=3, device=torch.device("cpu"), tta="flip")

    with torch.no_grad():
        expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
        assert torch.allclose(plain, model(images), atol=1e-5)
    assert torch.allclose(flipped.softmax(1), expected, atol=1e-5)
    assert not torch.allclose(flipped.softmax(1), plain.softmax(1), atol=1e-3)


def test_a_symmetric_image_scores_the_same_with_and_without_flip_tta():
    model = asymmetric_model()
    half = torch.rand(4, 3, 8, 4)
    images = torch.cat([half, half.flip(-1)], dim=-1)  # mirror-symmetric
    dataset = TensorDataset(images, torch.zeros(4, dtype=torch.long))
    plain = predict_logits(model, dataset, batch_size=4, device=torch.device("cpu"))
    flipped = predict_logits(model, dataset, batch_size=4, device=torch.device("cpu"), tta="flip")
    assert torch.allclose(flipped.softmax(1), plain.softmax(1), atol=1e-5)


def test_an_unknown_tta_is_named():
    dataset = TensorDataset(torch.rand(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="evaluate.tta"):
        predict_logits(asymmetric_model(), dataset, batch_size=1, device=torch.device("cpu"), tta="five_crop")
