"""FLOP counting for the manifests (export/flops.py), checked against counts done by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densepure_rt.export.classifiers import build_classifier
from densepure_rt.export.flops import count_gflop, count_gflop_meta
from densepure_rt.export.models import load_classifier
from densepure_rt.export.unet import create_model, set_attention
from densepure_rt.presets import PRESETS


def conv_flops(c_in: int, c_out: int, k: int, h_out: int, w_out: int) -> int:
    """2 FLOPs per multiply-accumulate; the bias is not counted."""
    return 2 * c_in * c_out * k * k * h_out * w_out


def test_single_conv2d_is_two_flops_per_multiply_accumulate():
    conv = nn.Conv2d(3, 8, 3, stride=2)  # 17 x 17 -> 8 x 8
    assert count_gflop(conv, torch.randn(1, 3, 17, 17)) * 1e9 == conv_flops(3, 8, 3, 8, 8)


def test_single_linear_is_two_flops_per_multiply_accumulate():
    assert count_gflop(nn.Linear(64, 10), torch.randn(1, 64)) * 1e9 == 2 * 64 * 10


def test_small_conv_net_matches_hand_count():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 16 -> 8 x 8
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(),  # 8 x 8 -> 6 x 6
        nn.Linear(8 * 6 * 6, 10),
    )
    by_hand = conv_flops(1, 4, 3, 16, 16) + conv_flops(4, 8, 3, 6, 6) + 2 * (8 * 6 * 6) * 10
    assert count_gflop(net, torch.randn(1, 1, 16, 16)) * 1e9 == by_hand


def test_fused_attention_is_counted_on_the_cpu():
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    heads, length, dim = 2, 64, 16
    q = torch.randn(1, heads, length, dim)
    # q k^T and (softmax) v: two products of length x length x dim multiply-accumulates per head.
    assert count_gflop(Attention(), (q, q, q)) * 1e9 == 2 * 2 * heads * length * length * dim


def test_more_than_one_sample_is_refused():
    with pytest.raises(ValueError, match="batch size 2"):
        count_gflop(nn.Linear(4, 4), torch.randn(2, 4))


@pytest.mark.slow
def test_cifar10_unet_matches_the_design_figure():
    p = PRESETS["cifar10"]
    unet = create_model(**p.unet_kwargs).eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10.0])
    gflop = count_gflop(unet, (x, t))
    print(f"cifar10 UNet: {gflop:.3f} GFLOP/sample")
    assert gflop == pytest.approx(p.unet_gflop, rel=0.02)
    # The fused-attention path does the same arithmetic.
    assert count_gflop(set_attention(unet, "sdpa"), (x, t)) == pytest.approx(gflop, rel=1e-12)


def test_meta_count_equals_real_count():
    p = PRESETS["tiny"]
    shapes = [(1, p.channels, p.image_size, p.image_size), (1,)]
    real = count_gflop(create_model(**p.unet_kwargs), tuple(torch.randn(s) for s in shapes))
    assert real > 0
    assert count_gflop_meta(lambda: create_model(**p.unet_kwargs), shapes) == real


@pytest.mark.parametrize("preset", ["imagenet", "cifar10"])
def test_full_size_models_on_meta_match_the_design_figures(preset):
    p = PRESETS[preset]
    image = (1, 3, p.image_size, p.image_size)
    unet = count_gflop_meta(lambda: create_model(**p.unet_kwargs), [image, (1,)])
    classifier = count_gflop_meta(lambda: build_classifier(preset, meta=True), [image])
    print(f"{preset}: UNet {unet:.2f}, classifier {classifier:.2f} GFLOP/sample")
    assert unet == pytest.approx(p.unet_gflop, rel=0.02)
    assert classifier == pytest.approx(p.classifier_gflop, rel=0.02)


def test_describe_records_real_channel_count():
    for preset, channels in (("digits", 1), ("tiny", 3)):
        p = PRESETS[preset]
        classifier = load_classifier(preset, random_weights=preset == "tiny")
        shape = classifier.describe()["input"]["shape"]
        assert shape == [channels, p.image_size, p.image_size]
        with torch.no_grad():
            assert classifier(torch.zeros(1, *shape)).shape == (1, p.num_classes)
