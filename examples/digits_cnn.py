"""Two small CNNs trained from different seeds on scikit-learn's digits, every layer recorded and compared.

The architecture of google/svcca's tutorials (conv 3x3 32 -> maxpool -> conv 3x3 64 -> maxpool -> batchnorm
-> fc 200 -> fc 10) on the 8x8 digits images upsampled to 16x16. Both networks are recorded on held-out
images into one store (chunkcca.record, batch by batch) and compared: all layer pairs in one pass with average
pooling (heatmaps), then the conv layers as google/svcca's conv tutorial does (flatten where sizes agree,
interpolation and DFT where they differ).

Needs the optional extras: pip install ".[torch]" scikit-learn
Run: python examples/digits_cnn.py [--out digits-output] [--epochs 15]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import chunkcca
from chunkcca.plot import plot_frequency_means, plot_rho, plot_similarity
from chunkcca.record import record

LAYERS = {"conv1": "2", "pool1": "3", "conv2": "5", "pool2": "6", "fc1": "10", "logits": "11"}


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.Identity(), nn.ReLU(), nn.MaxPool2d(2),  # 0-3: conv1 16x16, pool1 8x8
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4-6: conv2 8x8, pool2 4x4
        nn.BatchNorm2d(64), nn.Flatten(), nn.Linear(4 * 4 * 64, 200), nn.ReLU(),  # 7-10: fc1 (after ReLU)
        nn.Linear(200, 10),  # 11: logits
    )


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1297], order[1297:]
    return images[train], labels[train], images[test], labels[test]


def train(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> None:
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(net(images[batch]), labels[batch]).backward()
            optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits-output")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = digits()
    for seed in (0, 1):
        net = make_net(seed)
        train(net, train_x, train_y, args.epochs, seed)
        net.eval()
        with torch.no_grad():
            accuracy = (net(test_x).argmax(1) == test_y).float().mean().item()
        print(f"model{seed}: held-out accuracy {accuracy:.3f}")
        record(net, {f"model{seed}/{name}": module for name, module in LAYERS.items()}, test_x.split(100),
               out / f"model{seed}.zarr", overwrite=True)
    stores = [chunkcca.open_activations(out / f"model{seed}.zarr") for seed in (0, 1)]
    layers = [{f"model{seed}/{name}": stores[seed][f"model{seed}/{name}"] for name in LAYERS} for seed in (0, 1)]
    sweep = chunkcca.similarity(layers[0], layers[1], measures=["svcca", "cka"], spatial="avgpool",
                                precision="float64")
    print(sweep["cka"].to_pandas().round(3).to_string())
    for measure in ("svcca", "cka"):
        figure = plot_similarity(sweep, measure, title=f"{measure}, average pooled, model0 x model1").figure
        figure.savefig(out / f"digits_{measure}_heatmap.png", dpi=100)
        plt.close(figure)

    model0, model1 = layers
    pairs = {
        "conv1 vs conv1, flatten": chunkcca.cca(model0["model0/conv1"], model1["model1/conv1"], epsilon=1e-10),
        "conv2 vs conv2, flatten": chunkcca.cca(model0["model0/conv2"], model1["model1/conv2"], epsilon=1e-10),
        "conv1 vs pool1, interp": chunkcca.cca(model0["model0/conv1"], model1["model1/pool1"], spatial="interp",
                                               stride=2, epsilon=1e-10),
    }
    for label, result in pairs.items():
        print(f"{label}: mean rho {float(result['rho_mean']):.3f} over {int(result['rows'])} rows")
    figure = plot_rho(pairs, title="digits CNNs, two seeds").figure
    figure.savefig(out / "digits_conv_rho.png", dpi=100)
    plt.close(figure)
    dft = chunkcca.cca(model0["model0/conv2"], model1["model1/pool2"], spatial="dft", epsilon=1e-6,
                       precision="float64")
    print(f"conv2 vs pool2, dft: mean rho {float(dft['rho_mean']):.3f}")
    figure = plot_frequency_means(dft, title="conv2 (model0) vs pool2 (model1), per frequency").figure
    figure.savefig(out / "digits_dft.png", dpi=100)
    plt.close(figure)
    # Per class: the digit of each held-out image as a coordinate on datapoint, then one Moments per digit in one
    # pass, and an error bar from 5 folds for the CKA of all digits together.
    digit = ("datapoint", test_y.numpy())
    per_class = {}
    for name in ("conv1", "conv2", "fc1"):
        a = model0[f"model0/{name}"]["activations"].assign_coords(digit=digit)
        b = model1[f"model1/{name}"]["activations"].assign_coords(digit=digit)
        per_class[name] = chunkcca.cka(a, b, spatial="avgpool", groupby="digit", precision="float64")["cka"]
        overall = chunkcca.compare(a, b, measures=["cka"], spatial="avgpool", folds=5, precision="float64")
        half = float(overall["cka_ci"][1] - overall["cka_ci"][0]) / 2
        print(f"{name}: CKA {float(overall['cka']):.3f} ± {half:.3f} (95%, 5 folds); "
              f"per digit {float(per_class[name].min()):.3f} to {float(per_class[name].max()):.3f}")
    figure, ax = plt.subplots(figsize=(6.0, 3.6), layout="constrained")
    for marker, (name, values) in zip("os^", per_class.items()):
        ax.plot(values["digit"], values, marker=marker, label=f"{name} vs {name}")
    ax.set_xticks(range(10))
    ax.set_xlabel("digit (held-out images of that class only)")
    ax.set_ylabel("linear CKA, average pooled")
    ax.set_title("model0 vs model1, per class")
    ax.legend()
    figure.savefig(out / "digits_per_class_cka.png", dpi=100)
    plt.close(figure)
    print(f"figures: {out}/digits_*.png")


if __name__ == "__main__":
    main()
