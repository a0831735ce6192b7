"""Train a small digits classifier for a few seconds and export it to ONNX: a stand-in for the
classifier your own training code ships (docs/models.md, "Your own classifier").

Its preprocessing is its own, as a production model's would be: it takes 24 x 24 images, resized
bilinearly from the 16 x 16 digits in [0, 1] and normalised with mean 0.5 and std 0.25. `densepure-rt
build` is told exactly that (--input-size 24 --resize bilinear --mean 0.5 --std 0.25).

    python examples/own_classifier.py my_classifier.onnx   # about 10 s on 2 CPU cores

Needs the torch extra (torch, onnx, scikit-learn).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from densepure_rt.export.digits import load_split

INPUT_SIZE, MEAN, STD = 24, 0.5, 0.25


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """[N x 1 x 16 x 16] in [0, 1] -> the network's input [N x 1 x 24 x 24]."""
    images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return (images - MEAN) / STD


def network() -> nn.Module:
    """[N x 1 x 24 x 24] -> [N x 10] logits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(seconds: float, seed: int) -> tuple[nn.Module, float]:
    """Adam on the digits training split with light Gaussian noise, for ``seconds``; returns the
    network and its accuracy on the clean test split."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in load_split())
    net = network()
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    start = time.time()
    while time.time() - start < seconds:
        for batch in torch.randperm(len(x_train)).split(64):
            noisy = (x_train[batch] + 0.1 * torch.randn_like(x_train[batch])).clamp(0, 1)
            loss = F.cross_entropy(net(preprocess(noisy)), y_train[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(preprocess(x_test)).argmax(1) == y_test).float().mean().item()
    return net, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="ONNX file to write")
    parser.add_argument("--seconds", type=float, default=8.0, help="training time (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    net, accuracy = train(args.seconds, args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The network alone, as your training code would export it: the batch axis is dynamic.
        torch.onnx.export(net, (torch.zeros(2, 1, INPUT_SIZE, INPUT_SIZE),), args.out, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    print(f"{args.out}: clean test accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
