"""The digits preset: training reduces its losses, and the shipped weights and test split are sound."""

from pathlib import Path

import numpy as np
import pytest
import torch

import densepure_rt
from densepure_rt.export.checkpoints import load_state_dict, load_strict
from densepure_rt.export.digits import (
    CLASSIFIER_FILE,
    DIGITS_UNET_KWARGS,
    TEST_FILE,
    TRAINING_FILE,
    UNET_FILE,
    DigitsNet,
    classifier_accuracy,
    digits_schedule,
    load_split,
    train_classifier,
    train_unet,
)
from densepure_rt.export.reference import reverse_run, to_diffusion_input
from densepure_rt.export.step import DenoiseStep
from densepure_rt.export.unet import create_model
from densepure_rt.schedule import ONE_SHOT, reverse_schedule

ASSETS = Path(densepure_rt.__file__).resolve().parent / "assets"
SHIPPED = (UNET_FILE, CLASSIFIER_FILE, TEST_FILE)

TINY_UNET = dict(DIGITS_UNET_KWARGS, num_channels=32, num_res_blocks=1, attention_resolutions="")


@pytest.fixture(scope="module")
def split():
    return load_split()


@pytest.fixture(scope="module")
def shipped_unet():
    model = create_model(**DIGITS_UNET_KWARGS).eval()
    load_strict(model, load_state_dict(ASSETS / UNET_FILE, "digits UNet"), "digits UNet")
    return model


@pytest.fixture(scope="module")
def shipped_classifier():
    model = DigitsNet().eval()
    load_strict(model, load_state_dict(ASSETS / CLASSIFIER_FILE, "digits classifier"), "digits classifier")
    return model


@pytest.fixture(scope="module")
def shipped_test():
    with np.load(ASSETS / TEST_FILE) as npz:
        return npz["images"], npz["labels"]


def test_load_split_is_the_fixed_stratified_split(split):
    x_train, y_train, x_test, y_test = split
    assert x_train.shape == (1437, 1, 16, 16) and x_test.shape == (360, 1, 16, 16)
    assert x_train.dtype == np.float32 and y_test.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert np.bincount(y_test, minlength=10).min() >= 35  # stratified: 35 or 36 of each digit


@pytest.mark.slow
def test_unet_training_reduces_the_hybrid_loss(split):
    run = train_unet(30, seed=0, batch_size=16, unet_kwargs=TINY_UNET, x_train=split[0][:256], threads=1)
    simple, vlb, total = run.history["l_simple"], run.history["l_vlb"], run.history["loss"]
    assert len(simple) == 30 and np.isfinite(total).all() and min(vlb) >= 0.0
    assert np.mean(simple[-5:]) < 0.5 * np.mean(simple[:5])
    # L_vlb (one random t per sample) is too noisy over 30 steps to compare on its own.
    assert np.mean(total[-5:]) < 0.5 * np.mean(total[:5])
    assert not run.model.training and not any(p.requires_grad for p in run.model.parameters())


def test_unet_training_is_deterministic_for_a_seed(split):
    runs = [train_unet(3, seed=1, batch_size=8, unet_kwargs=TINY_UNET, x_train=split[0][:64], threads=1) for _ in range(2)]
    assert runs[0].history == runs[1].history
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b)


def test_classifier_training_reduces_cross_entropy(split):
    x_train, y_train = split[:2]
    run = train_classifier(3, seed=0, lr=3e-3, x_train=x_train, y_train=y_train, max_batches=8, threads=1)
    losses = run.history["batch_loss"]
    assert len(losses) == 24 and len(run.history["loss"]) == 3
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])


def test_shipped_files_total_at_most_10_mb():
    sizes = {name: (ASSETS / name).stat().st_size for name in (*SHIPPED, TRAINING_FILE)}
    assert sum(sizes.values()) <= 10 * 1024 * 1024, sizes


def test_shipped_test_set_is_the_split_from_sklearn(split, shipped_test):
    images, labels = shipped_test
    assert images.dtype == np.float32 and images.shape == (360, 1, 16, 16)
    assert labels.dtype == np.int64
    # Recomputed independently of load_split: the same call on sklearn's own arrays.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    _, test_labels = train_test_split(target, test_size=0.2, random_state=0, stratify=target)
    np.testing.assert_array_equal(labels, test_labels)
    np.testing.assert_array_equal(labels, split[3])
    np.testing.assert_array_equal(images, split[2])


def test_shipped_classifier_is_at_least_97_percent_accurate_on_clean_test_images(shipped_classifier, shipped_test):
    accuracy = classifier_accuracy(shipped_classifier, *shipped_test)
    assert accuracy >= 0.97, accuracy


def test_shipped_unet_predicts_the_noise_of_a_diffused_test_image(shipped_unet, shipped_test):
    x0 = 2 * torch.from_numpy(shipped_test[0][:64]) - 1
    gen = torch.Generator().manual_seed(0)
    t = torch.full((64,), 144.0)
    ab = float(digits_schedule().alphas_cumprod[144])
    eps = torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        out = shipped_unet(ab**0.5 * x0 + (1 - ab) ** 0.5 * eps, t)
    assert out.shape == (64, 2, 16, 16)
    assert (out[:, :1] - eps).square().mean() < 0.15  # a trained denoiser (0.07 shipped; ~1 untrained)
    assert -1.0 < out[:, 1:].mean() < 1.0  # the learned-range variance interpolates on average


@pytest.mark.slow
@pytest.mark.parametrize("sigma, steps", [(0.5, ONE_SHOT), (0.5, 4), (1.0, ONE_SHOT)])
def test_densepure_purification_beats_the_raw_classifier_under_noise(
    sigma, steps, shipped_unet, shipped_classifier, shipped_test
):
    # Shipped model, 120 test images, one draw: raw 0.76 / 0.38 at sigma 0.5 / 1.0; purified
    # 0.87 / 0.57 one-shot, 0.87 at sigma 0.5 with b = 4.
    images, labels = (torch.from_numpy(a[:120]) for a in shipped_test)
    gen = torch.Generator().manual_seed(0)
    x_noisy = images + sigma * torch.randn(images.shape, generator=gen)
    rs = reverse_schedule(digits_schedule(), sigma, steps)
    noise = [torch.randn(images.shape, generator=gen) for _ in range(rs.num_calls)]
    with torch.no_grad():
        purified = reverse_run(DenoiseStep(shipped_unet), to_diffusion_input(x_noisy, rs), rs, noise)
        raw = (shipped_classifier(2 * x_noisy - 1).argmax(1) == labels).float().mean().item()
        pure = (shipped_classifier(purified).argmax(1) == labels).float().mean().item()
    assert pure >= raw + 0.05, (raw, pure)
