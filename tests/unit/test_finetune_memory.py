"""Fine-tuning within a memory budget on the CPU: the training activations are measured, a batch runs in
parts that fit, and the summed step is the step of the whole batch (real torch, tiny real models)."""

from __future__ import annotations

import torch
from finetune_helpers import params, tiny_classifier, tiny_dataset

from transfer.models.groups import freeze_first_groups
from transfer.train.finetune import accumulate_gradients, fine_tune, runtime_for
from transfer.train.losses import classification_loss
from transfer.train.memory import fitting, step_batches, training_bytes_per_image

CPU = torch.device("cpu")


def test_training_activations_are_measured_per_image_and_grow_with_the_image_and_the_unfrozen_groups():
    model = tiny_classifier()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    small_images, large_images = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 128, 128)
    rng = torch.get_rng_state()
    small = training_bytes_per_image(model, small_images, batchnorm_frozen=True)
    large = training_bytes_per_image(model, large_images, batchnorm_frozen=True)
    assert 3.5 < large / small < 4.5  # activations scale with the pixels
    # the model measured is a copy: no gradient, no BatchNorm statistic and no RNG draw reaches the run
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    # frozen groups keep no activations for the backward pass
    freeze_first_groups(model, 2)
    assert training_bytes_per_image(model, large_images, batchnorm_frozen=True) < large


def test_the_micro_batch_is_the_largest_that_fits_and_cuda_keeps_the_batch():
    assert fitting(32, 100 * 2**20, 1500) == 15
    assert fitting(32, 10 * 2**20, 1500) == 32
    assert fitting(32, 4000 * 2**20, 1500) == 1  # one image is the floor
    model, example = tiny_classifier(), torch.rand(2, 3, 32, 32)
    per_image = training_bytes_per_image(model, example, batchnorm_frozen=True)
    budget_mb = max(1, 5 * per_image // 2**20)
    planned = step_batches(model, example, 32, 64, 0, True, CPU, budget_mb)
    assert planned.batch == 32 and planned.micro == fitting(32, per_image, budget_mb) < 32
    cuda = step_batches(model, example, 32, 64, 0, True, torch.device("cuda"), budget_mb)
    assert (cuda.micro, cuda.val) == (32, 64)


def test_a_batch_run_in_parts_gives_the_gradients_loss_and_accuracy_of_the_whole_batch():
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss_fn = classification_loss(label_smoothing=0.1, weights=torch.tensor([1.0, 2.0, 0.5]))
    runtime = runtime_for(CPU, amp=False, channels_last=False)
    results = []
    for micro in (None, 3):  # parts of 3, 3 and 2 images
        model = tiny_classifier()
        model.train()
        for module in model.modules():  # frozen BatchNorm: no layer mixes the images of a batch
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        loss, correct = accumulate_gradients(model, images, labels, labels, loss_fn, runtime, micro)
        results.append((loss, correct, [p.grad.clone() for p in model.parameters()]))
    (whole_loss, whole_correct, whole_grads), (parts_loss, parts_correct, parts_grads) = results
    assert torch.allclose(whole_loss, parts_loss, atol=1e-6) and torch.equal(whole_correct, parts_correct)
    for whole, parts in zip(whole_grads, parts_grads):
        assert torch.allclose(whole, parts, atol=1e-6)


def test_fine_tuning_under_a_tiny_budget_trains_like_the_whole_batch():
    train, val = tiny_dataset(), tiny_dataset(seed=1)
    whole = fine_tune(tiny_classifier(), 1, train, val, params(epochs=2, batchnorm="frozen"), 0, CPU)
    parts = fine_tune(tiny_classifier(), 1, train, val, params(epochs=2, batchnorm="frozen", max_memory_mb=1), 0, CPU)
    for row_whole, row_parts in zip(whole.history, parts.history, strict=True):
        assert row_whole.keys() == row_parts.keys()
        for key, value in row_whole.items():
            assert value == row_parts[key] if isinstance(value, str) else abs(value - row_parts[key]) < 1e-5, key
    for key, value in whole.model.state_dict().items():
        assert torch.allclose(value, parts.model.state_dict()[key], atol=1e-5), key
