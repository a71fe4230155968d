"""Whole network against the peers: two CNNs of ResNet-18's shape (CIFAR-style, random init, two seeds, 32x32
inputs; 10 layers each from the stem to the fc), every layer recorded once with chunkcca.record, then all 10 x 10
layer pairs compared by chunkcca (linear CKA and mean CCA of average-pooled layers; exact linear CKA of whole
per-example maps, spatial="features"; minibatch CKA of whole maps) and, side by side on the same activations, by
torch-cka 0.21 and ckatorch 1.0.3 (minibatch CKA, each running the models itself) and by an in-memory numpy CKA
(avgpool, and whole maps from n x n Gram matrices when the activations fit in memory).

The peers are installed for this benchmark only (pip install torch-cka ckatorch); when they are missing their
rows say so. Their failures are results: a row names what failed and its error. Each case runs in a fresh
process, so its peak RSS is its own; the store is written once under /tmp/chunkcca-bench and reused.

Run: python tests/benchmarks/bench_network.py [--inputs 2000] [--batch 250]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_DIR, Timer, machine, peak_mib, report, run_case

from chunkcca.report import format_table

#: Store name → module name of the 10 layers of each model, stem to fc (block outputs are after their ReLU).
LAYERS = {"stem": "stem", "layer1_0": "layer1.0", "layer1_1": "layer1.1", "layer2_0": "layer2.0",
          "layer2_1": "layer2.1", "layer3_0": "layer3.0", "layer3_1": "layer3.1", "layer4_0": "layer4.0",
          "layer4_1": "layer4.1", "fc": "fc"}
SEEDS = (0, 1)
#: Floats per example of the 10 layers of one model: 3 x 64x32x32, 2 x 128x16x16, 2 x 256x8x8, 2 x 512x4x4, 10.
FLOATS_PER_EXAMPLE = 3 * 64 * 32 * 32 + 2 * 128 * 16 * 16 + 2 * 256 * 8 * 8 + 2 * 512 * 4 * 4 + 10
PEERS = {"torch-cka": "torch_cka", "ckatorch": "ckatorch"}
NOT_INSTALLED = "not installed (pip install torch-cka ckatorch)"


def make_model(seed: int) -> Any:
    """ResNet-18 for 32x32 inputs (3x3 stem conv, 4 stages of 2 BasicBlocks of 64/128/256/512 channels, global
    average pool, fc to 10 classes), PyTorch's default initialisation from ``seed``; no weights are downloaded."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, inputs: int, outputs: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(outputs)
            self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(outputs)
            self.shortcut = nn.Sequential()
            if stride != 1 or inputs != outputs:
                self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                              nn.BatchNorm2d(outputs))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
            stages, inputs = [], 64
            for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                stages.append(nn.Sequential(BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)))
                inputs = outputs
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the argument is named x: ckatorch calls forward(x=...)
            x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(seed)
    return ResNet18().eval()


def make_inputs(count: int) -> Any:
    """``count`` smooth random 3x32x32 images (8x8 noise upsampled, plus fine noise), the same in every case."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    coarse = torch.randn(count, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return images + 0.25 * torch.randn(count, 3, 32, 32, generator=generator)


def store_path(inputs: int) -> Path:
    return BENCH_DIR / f"resnet18x2_{inputs}x32x32.zarr"


def layer_sets(inputs: int) -> list[dict[str, Any]]:
    """The two models' layers, store name → lazy DataArray, in LAYERS order."""
    import chunkcca

    tree = chunkcca.open_activations(store_path(inputs))
    return [{name: tree[f"model{seed}/{name}"]["activations"] for name in LAYERS} for seed in SEEDS]


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:140]


def matrix(values: Any) -> list[list[float]]:
    import numpy as np

    return np.asarray(values, dtype=np.float64).tolist()


# ---------------------------------------------------------------------------------------------------- the cases


def case_record(inputs: int, batch: int) -> dict[str, Any]:
    """Both models over the inputs, every layer written to one store (model0/..., model1/...)."""
    import torch

    from chunkcca.record import record

    torch.set_grad_enabled(False)
    images = make_inputs(inputs)
    path = store_path(inputs)
    with Timer() as timer:
        for seed in SEEDS:
            record(make_model(seed), {f"model{seed}/{name}": module for name, module in LAYERS.items()},
                   images.split(batch), path, mode="w" if seed == 0 else "a", overwrite=seed == 0)
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"seconds": timer.seconds, "disk_gib": disk / 2**30}


def case_forward(inputs: int, batch: int) -> dict[str, Any]:
    """Both models' forward passes alone: the share of the peers' time that is not CKA."""
    import torch

    torch.set_grad_enabled(False)
    images = make_inputs(inputs)
    models = [make_model(seed) for seed in SEEDS]
    with Timer() as timer:
        for part in images.split(batch):
            for model in models:
                model(part)
    return {"seconds": timer.seconds}


def case_chunkcca_avgpool(inputs: int, batch: int) -> dict[str, Any]:
    import chunkcca

    a, b = layer_sets(inputs)
    with Timer() as timer:
        result = chunkcca.similarity(a, b, measures=["cka", "mean_cca"], spatial="avgpool")
    return {"seconds": timer.seconds, "cka": matrix(result["cka"]), "mean_cca": matrix(result["mean_cca"])}


def case_chunkcca_features(inputs: int, batch: int) -> dict[str, Any]:
    import chunkcca

    a, b = layer_sets(inputs)
    with Timer() as timer:
        result = chunkcca.similarity(a, b, measures=["cka"], spatial="features")
    return {"seconds": timer.seconds, "cka": matrix(result["cka"])}


def case_chunkcca_minibatch(inputs: int, batch: int) -> dict[str, Any]:
    """chunkcca's minibatch CKA of whole maps, every pair in one pass (similarity(minibatch=...)), under the
    default memory_limit: a task reads one layer's minibatch and makes its Gram matrix."""
    import chunkcca

    a, b = layer_sets(inputs)
    with Timer() as timer:
        result = chunkcca.similarity(a, b, measures=["cka"], spatial="features", minibatch=batch)
    return {"seconds": timer.seconds, "cka": matrix(result["cka"])}


def case_torch_cka(inputs: int, batch: int) -> dict[str, Any]:
    """torch-cka 0.21: CKA(model1, model2, ...).compare(dataloader), minibatch CKA over the same inputs in order."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    torch.set_grad_enabled(False)
    loader = DataLoader(TensorDataset(make_inputs(inputs)), batch_size=batch, shuffle=False)
    models = [make_model(seed) for seed in SEEDS]
    modules = list(LAYERS.values())
    cka = CKA(models[0], models[1], model1_name="resnet18_seed0", model2_name="resnet18_seed1",
              model1_layers=modules, model2_layers=modules, device="cpu")
    error = None
    with Timer() as timer:
        try:
            cka.compare(loader)
        except Exception as caught:  # a peer's failure is a result
            error = one_line(caught)
    values = getattr(cka, "hsic_matrix", None)  # set before the NaN check that raises
    shaped = values is not None and tuple(values.shape) == (len(LAYERS), len(LAYERS))
    return {"seconds": timer.seconds, "error": error, "cka": matrix(values) if shaped else None}


def case_ckatorch(inputs: int, batch: int) -> dict[str, Any]:
    """ckatorch 1.0.3's model-level CKA: CKA(first_model, second_model, layers)(dataloader, epochs=1)."""
    import torch
    from ckatorch import CKA
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_grad_enabled(False)
    loader = DataLoader(TensorDataset(make_inputs(inputs)), batch_size=batch, shuffle=False)
    models = [make_model(seed) for seed in SEEDS]
    cka = CKA(models[0], models[1], layers=list(LAYERS.values()), first_name="resnet18_seed0",
              second_name="resnet18_seed1")
    error, values = None, None
    with Timer() as timer:
        try:
            values = cka(loader, epochs=1)
        except Exception as caught:  # a peer's failure is a result
            error = one_line(caught)
    return {"seconds": timer.seconds, "error": error, "cka": None if values is None else matrix(values)}


def case_ckatorch_hsic1(inputs: int, batch: int) -> dict[str, Any]:
    """ckatorch's own unbiased minibatch HSIC (ckatorch.hsic1) on each minibatch's Gram matrices of whole maps,
    summed over the minibatches by hand: CKA = Σ HSIC(K, L) / sqrt(Σ HSIC(K, K) Σ HSIC(L, L))."""
    import torch
    from ckatorch import hsic1

    torch.set_grad_enabled(False)
    images = make_inputs(inputs)
    models = [make_model(seed) for seed in SEEDS]
    features: list[dict[str, torch.Tensor]] = [{}, {}]
    for model, caught in zip(models, features):
        for name, module in LAYERS.items():
            model.get_submodule(module).register_forward_hook(
                lambda _m, _i, out, name=name, caught=caught: caught.__setitem__(name, out))
    count = len(LAYERS)
    cross = torch.zeros(count, count, dtype=torch.float64)
    own = torch.zeros(2, count, dtype=torch.float64)
    with Timer() as timer:
        for part in images.split(batch):
            if len(part) < 4:  # hsic1 needs 4 rows: a last, short minibatch is left out, as chunkcca does
                continue
            grams = []
            for model, caught in zip(models, features):
                model(part)
                flat = [caught[name].flatten(1).to(torch.float64) for name in LAYERS]
                grams.append([(x @ x.T)[None] for x in flat])
            for side in (0, 1):
                for i, gram in enumerate(grams[side]):
                    own[side, i] += hsic1(gram, gram).sum()
            for i, gram_a in enumerate(grams[0]):
                for j, gram_b in enumerate(grams[1]):
                    cross[i, j] += hsic1(gram_a, gram_b).sum()
        values = cross / torch.sqrt(own[0][:, None] * own[1][None, :])
    return {"seconds": timer.seconds, "cka": matrix(values)}


def _loaded(inputs: int) -> tuple[list[dict[str, Any]], float]:
    """Every layer of both models loaded from the store into memory (as an in-memory tool holds them), seconds."""
    a, b = layer_sets(inputs)
    with Timer() as timer:
        arrays = [{name: layer.values for name, layer in side.items()} for side in (a, b)]
    return arrays, timer.seconds


def case_numpy_features(inputs: int, batch: int) -> dict[str, Any]:
    """Exact linear CKA of whole maps in memory: all activations loaded, then per layer its centred n x n Gram
    matrix (float32 GEMM on every core, kept in float64), then ⟨K̃, L̃⟩ / (‖K̃‖ ‖L̃‖) for every pair."""
    import numpy as np

    arrays, load = _loaded(inputs)
    with Timer() as timer:
        grams = []
        for side in arrays:
            side_grams = []
            for name in LAYERS:
                x = side[name].reshape(len(side[name]), -1)
                x -= x.mean(axis=0, dtype=np.float64).astype(x.dtype)
                side_grams.append((x @ x.T).astype(np.float64))
            grams.append(side_grams)
        norms = [[np.linalg.norm(gram) for gram in side] for side in grams]
        values = np.array([[np.vdot(ga, gb) / (na * nb) for gb, nb in zip(grams[1], norms[1])]
                           for ga, na in zip(grams[0], norms[0])])
    return {"seconds": load + timer.seconds, "load_seconds": load, "cka": matrix(values)}


def case_numpy_avgpool(inputs: int, batch: int) -> dict[str, Any]:
    """Linear CKA (Kornblith et al.'s feature-space form) and mean CCA (QR and SVD) of average-pooled layers in
    memory: each layer loaded from the store and pooled over its positions in float64, one at a time."""
    import numpy as np

    a, b = layer_sets(inputs)
    with Timer() as timer:
        pooled = []
        for side in (a, b):
            rows = {}
            for name, layer in side.items():
                values = layer.values
                values = values.mean(axis=tuple(range(1, values.ndim - 1)), dtype=np.float64)
                rows[name] = values - values.mean(axis=0)
            pooled.append(rows)
        bases = [{name: _basis(x) for name, x in side.items()} for side in pooled]
        cka = np.zeros((len(LAYERS), len(LAYERS)))
        cca = np.zeros_like(cka)
        for i, name_a in enumerate(LAYERS):
            for j, name_b in enumerate(LAYERS):
                x, y = pooled[0][name_a], pooled[1][name_b]
                cka[i, j] = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
                rho = np.linalg.svd(bases[0][name_a].T @ bases[1][name_b], compute_uv=False)
                cca[i, j] = np.clip(rho, 0, 1).mean()
    return {"seconds": timer.seconds, "cka": matrix(cka), "mean_cca": matrix(cca)}


def _basis(x: Any) -> Any:
    """An orthonormal basis of the centred rows' column space (left singular vectors above the rank cut-off)."""
    import numpy as np

    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, s > s[0] * max(x.shape) * np.finfo(np.float64).eps]


CASES = {"record": case_record, "forward": case_forward, "chunkcca-avgpool": case_chunkcca_avgpool,
         "chunkcca-features": case_chunkcca_features, "chunkcca-minibatch": case_chunkcca_minibatch,
         "torch-cka": case_torch_cka, "ckatorch": case_ckatorch, "ckatorch-hsic1": case_ckatorch_hsic1,
         "numpy-features": case_numpy_features, "numpy-avgpool": case_numpy_avgpool}


# ---------------------------------------------------------------------------------------------------- the table


def mem_available_gib() -> float:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) / 2**20


def largest_difference(values: Any, reference: Any) -> tuple[float, str, int]:
    """max |values − reference| over the pairs both give, the pair where it is, and how many pairs are NaN."""
    import numpy as np

    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    both = np.isfinite(values) & np.isfinite(reference)
    if not both.any():
        return float("nan"), "", int((~np.isfinite(values)).sum())
    gap = np.where(both, np.abs(values - reference), -1.0)
    i, j = np.unravel_index(int(np.argmax(gap)), gap.shape)
    names = list(LAYERS)
    return float(gap[i, j]), f"{names[i]} x {names[j]}", int((~np.isfinite(values)).sum())


def run(name: str, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """One case in its own process; a crash (e.g. killed for memory) becomes an error row, not a stop."""
    try:
        return run_case(__file__, name, "--inputs", str(args.inputs), "--batch", str(args.batch), *extra)
    except RuntimeError as error:
        lines = [x for x in str(error).splitlines() if x.strip()]
        return {"seconds": float("nan"), "peak_mib": float("nan"), "error": f"process failed: {lines[-1][:140]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2000, help="examples run through both models")
    parser.add_argument("--batch", type=int, default=250,
                        help="forward batch and minibatch size of every minibatch CKA (chunkcca's, the peers')")
    parser.add_argument("--numpy-max-gib", type=float, default=12.0,
                        help="run the in-memory numpy whole-map CKA only when what it holds fits in this many GiB "
                             "(and in 80%% of MemAvailable)")
    parser.add_argument("--case", choices=list(CASES))
    args = parser.parse_args()
    if args.case:
        result = CASES[args.case](args.inputs, args.batch)
        report({**result, "peak_mib": peak_mib()})
        return

    versions = {peer: importlib.metadata.version(peer) if importlib.util.find_spec(module) else None
                for peer, module in PEERS.items()}
    results: dict[str, dict[str, Any]] = {}
    results["record"] = (run("record", args) if not store_path(args.inputs).exists()
                         else {"seconds": float("nan"), "peak_mib": float("nan"), "reused": True})
    for name in ("forward", "numpy-avgpool", "chunkcca-avgpool", "chunkcca-features", "chunkcca-minibatch"):
        results[name] = run(name, args)
    held_gib = (2 * FLOATS_PER_EXAMPLE * 4 * args.inputs + 2 * len(LAYERS) * args.inputs**2 * 8) / 2**30
    fits = min(args.numpy_max_gib, 0.8 * mem_available_gib())
    results["numpy-features"] = (run("numpy-features", args) if held_gib <= fits else
                                 {"skipped": f"skipped: holds {held_gib:.1f} GiB, limit {fits:.1f} GiB"})
    for name, peer in (("torch-cka", "torch-cka"), ("ckatorch", "ckatorch"), ("ckatorch-hsic1", "ckatorch")):
        results[name] = run(name, args) if versions[peer] else {"skipped": NOT_INSTALLED}

    exact = results["chunkcca-features"].get("cka")
    pooled = results["numpy-avgpool"].get("cka")
    minibatch = results["chunkcca-minibatch"].get("cka")
    rows = [("case", "CKA of", "seconds", "time vs numpy", "peak MiB", "max |Δ CKA|", "Δ against", "notes")]

    def add(name: str, label: str, convention: str, base: str | None, reference: Any, against: str,
            notes: str = "") -> None:
        result = results[name]
        if "skipped" in result:
            rows.append((label, convention, "", "", "", "", "", result["skipped"]))
            return
        seconds, peak = result["seconds"], result["peak_mib"]
        base_seconds = results.get(base, {}).get("seconds") if base else None
        failed = result.get("error") is not None and result.get("cka") is None  # seconds until it stopped
        ratio = f"{seconds / base_seconds:.2f}" if base_seconds and seconds == seconds and not failed else ""
        gap, where = "", ""
        if result.get("cka") is not None and reference is not None:
            value, pair, nans = largest_difference(result["cka"], reference)
            gap = f"{value:.2g}" if value == value else "all NaN"
            where = f"{against} ({pair})" if pair else against
            if nans:
                notes = f"{nans} of {len(LAYERS) ** 2} pairs NaN; {notes}".rstrip("; ")
        if result.get("error"):
            stopped = f" (after {seconds:.1f} s)" if failed and seconds == seconds else ""
            notes = f"FAILED{stopped}: {result['error']}; {notes}".rstrip("; ")
        rows.append((label, convention, f"{seconds:.1f}" if seconds == seconds else "",
                     ratio, f"{peak:.0f}" if peak == peak else "", gap, where, notes))

    record = results["record"]
    add("record", "chunkcca.record, both models", "(writes the store)", None, None, "",
        "store reused from an earlier run" if record.get("reused") else
        f"forward passes + write; {record.get('disk_gib', float('nan')):.2f} GiB on disk "
        f"of {2 * FLOATS_PER_EXAMPLE * 4 * args.inputs / 2**30:.2f} GiB float32")
    add("forward", "forward passes alone", "", None, None, "", "both models; the peers' times include these")
    add("numpy-avgpool", "numpy in memory", "avgpool", "numpy-avgpool", None, "",
        "layer by layer from the store; CKA and mean CCA (QR/SVD), float64")
    cca_gap = ""
    ours, theirs = results["chunkcca-avgpool"].get("mean_cca"), results["numpy-avgpool"].get("mean_cca")
    if ours is not None and theirs is not None:
        value, pair, _ = largest_difference(ours, theirs)
        cca_gap = f"mean CCA max |Δ| vs numpy {value:.2g} ({pair})"
    add("chunkcca-avgpool", "chunkcca similarity cka+mean_cca", "avgpool", "numpy-avgpool", pooled, "numpy avgpool",
        cca_gap)
    features_notes = (f"load {results['numpy-features']['load_seconds']:.1f} s of it"
                      if "load_seconds" in results["numpy-features"] else "")
    add("numpy-features", "numpy in memory, n x n Grams", "whole maps, exact", "numpy-features", exact,
        "chunkcca exact", features_notes)
    add("chunkcca-features", "chunkcca similarity cka", "whole maps, exact", "numpy-features", None, "",
        "spatial='features'; the reference of the Δ below")
    add("chunkcca-minibatch", f"chunkcca similarity cka, minibatch={args.batch}", f"whole maps, minibatch {args.batch}",
        "numpy-features", exact, "chunkcca exact", "every pair in one pass")
    torch_notes = ""
    if results["torch-cka"].get("cka") is not None and minibatch is not None:
        value, pair, _ = largest_difference(results["torch-cka"]["cka"], minibatch)
        torch_notes = f"vs chunkcca minibatch max |Δ| {value:.2g}" if value == value else ""
    add("torch-cka", f"torch-cka {versions['torch-cka'] or ''}".strip(), f"whole maps, minibatch {args.batch}",
        "numpy-features", exact, "chunkcca exact", torch_notes)
    add("ckatorch", f"ckatorch {versions['ckatorch'] or ''} CKA(...)(loader)".strip(),
        f"whole maps, minibatch {args.batch}", "numpy-features", exact, "chunkcca exact")
    hsic_notes = "its hsic1 on each minibatch's Grams, summed by hand"
    if results["ckatorch-hsic1"].get("cka") is not None and minibatch is not None:
        value, _, _ = largest_difference(results["ckatorch-hsic1"]["cka"], minibatch)
        hsic_notes += f"; vs chunkcca minibatch max |Δ| {value:.2g}"
    add("ckatorch-hsic1", f"ckatorch {versions['ckatorch'] or ''} hsic1".strip(), f"whole maps, minibatch {args.batch}",
        "numpy-features", exact, "chunkcca exact", hsic_notes)

    print(f"{machine()}, torch {importlib.metadata.version('torch')}; two ResNet-18-shaped CNNs (random init, "
          f"seeds {SEEDS}), "
          f"{args.inputs} inputs of 3x32x32, {len(LAYERS)} layers each ({', '.join(LAYERS)}), all "
          f"{len(LAYERS) ** 2} pairs; forward batch and minibatch {args.batch}; each case in a fresh process; "
          f"'time vs numpy' is against the in-memory numpy case of the same convention")
    print(format_table(rows, left=(0, 1, 6, 7)))


if __name__ == "__main__":
    main()
