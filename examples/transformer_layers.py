"""Two small transformer encoders compared layer by layer, on padded sequences of different lengths.

scikit-learn's digits, read as sequences: each 8 x 8 image is 8 tokens (its rows) of 8 features, and each
sequence keeps only its first 4 to 8 rows, the rest padding. Two torch.nn.TransformerEncoder models (a CLS
token first, then the rows) are trained from two seeds to tell the digit; every layer of both is recorded into
one store with its attention mask (the second model added to the first one's store), and the layers are compared
with linear CKA and mean CCA under four ways of making rows of tokens: flatten (every real token, where both
layers are real), avgpool (the mean of the real tokens), first (the CLS token) and last (the last real token).

Run: python examples/transformer_layers.py [--out transformer-output] [--epochs 30]  (needs torch, scikit-learn)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import chunkcca
from chunkcca.plot import plot_similarity
from chunkcca.record import record

matplotlib.use("Agg")
import matplotlib.pyplot as plt

WIDTH, LAYERS = 32, 3


class Encoder(nn.Module):
    """Embedding, a CLS token, LAYERS transformer layers and a classifier on the CLS token."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(8, WIDTH)
        self.cls = nn.Parameter(torch.randn(1, 1, WIDTH) * 0.1)
        self.position = nn.Parameter(torch.randn(1, 9, WIDTH) * 0.1)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([self.cls.expand(len(tokens), -1, -1), self.embed(tokens)], dim=1) + self.position
        hidden = self.encoder(hidden, src_key_padding_mask=~attention_mask)
        return self.head(hidden[:, 0])


def sequences(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as 8 row tokens, each sequence cut to 4..8 rows; with the CLS slot, masks of 9 positions."""
    digits = load_digits()
    tokens = torch.tensor(digits.images / 16.0, dtype=torch.float32)
    lengths = torch.from_numpy(np.random.default_rng(seed).integers(4, 9, len(tokens)))
    rows = torch.arange(8)[None, :] < lengths[:, None]
    tokens = tokens * rows[..., None]  # padding holds zeros
    mask = torch.cat([torch.ones(len(tokens), 1, dtype=torch.bool), rows], dim=1)  # the CLS token is real
    return tokens, mask, torch.tensor(digits.target)


def train(net: Encoder, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, epochs: int) -> None:
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(tokens), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(net(tokens[batch], mask[batch]), labels[batch]).backward()
            optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="transformer-output")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens, mask, labels = sequences()
    train_part, test_part = slice(0, 1300), slice(1300, None)
    store = out / "transformers.zarr"
    for seed in (0, 1):
        net = Encoder(seed)
        train(net, tokens[train_part], mask[train_part], labels[train_part], args.epochs)
        net.eval()
        with torch.no_grad():
            accuracy = (net(tokens[test_part], mask[test_part]).argmax(1) == labels[test_part]).float().mean()
        print(f"model{seed}: held-out accuracy {float(accuracy):.3f}")
        layers = {f"model{seed}/embed": "embed", **{f"model{seed}/layer{i}": f"encoder.layers.{i}"
                                                    for i in range(LAYERS)}}
        batches = [{"tokens": tokens[test_part][i : i + 100], "attention_mask": mask[test_part][i : i + 100]}
                   for i in range(0, len(tokens[test_part]), 100)]
        # embed sees the 8 row tokens; the layers see 9 (CLS first): each gets the mask of its own length
        record(net, {f"model{seed}/embed": "embed"}, batches, store, mode="a" if seed else "w", overwrite=not seed,
               mask=lambda batch: batch["attention_mask"][:, 1:])
        record(net, {path: name for path, name in layers.items() if not path.endswith("embed")}, batches, store,
               mode="a")
    tree = chunkcca.open_activations(store)
    print(f"store: {', '.join(chunkcca.layer_paths(tree))}")
    model0 = [tree[f"model0/layer{i}"] for i in range(LAYERS)]
    model1 = [tree[f"model1/layer{i}"] for i in range(LAYERS)]
    figure, axes = plt.subplots(2, 4, figsize=(16, 7.5), layout="constrained")
    sweeps = {spatial: chunkcca.similarity(model0, model1, measures=["cka", "mean_cca"], spatial=spatial)
              for spatial in ("flatten", "avgpool", "first", "last")}
    for column, (spatial, sweep) in enumerate(sweeps.items()):
        print(f"{spatial}: CKA on the diagonal {np.round(np.diag(sweep['cka'].values), 3).tolist()}, "
              f"mean CCA {np.round(np.diag(sweep['mean_cca'].values), 3).tolist()}")
        for row, measure in enumerate(("cka", "mean_cca")):
            # one colour range per measure across the four modes, so that their panels compare by colour too
            values = np.concatenate([other[measure].values.ravel() for other in sweeps.values()])
            plot_similarity(sweep, measure, ax=axes[row, column], title=f"{measure}, {spatial}",
                            vmin=float(np.nanmin(values)), vmax=float(np.nanmax(values)))
    figure.suptitle("two transformer encoders (seeds 0 and 1), layer by layer, on padded digit sequences")
    figure.savefig(out / "transformer_layers.png", dpi=90)
    plt.close(figure)
    embed = chunkcca.cka(tree["model0/embed"], tree["model1/embed"])
    print(f"embed vs embed (real row tokens only): CKA {float(embed['cka']):.3f} over {int(embed['rows'])} rows")
    print(f"figure: {out / 'transformer_layers.png'}")


if __name__ == "__main__":
    main()
