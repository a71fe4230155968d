"""Shared pieces of the benchmark scripts: synthetic stores written once, one case per subprocess.

Each case runs in a fresh Python process so its peak resident memory (ru_maxrss) is its own.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from chunkcca.cli import size_decode_pool
from chunkcca.datasets import demo_layers

BENCH_DIR = Path("/tmp/chunkcca-bench")


size_decode_pool()  # zarr's decode pool sized as the chunkcca command sizes it (docs/performance.md)


def store_for(datapoints: int, *, channels: int = 64, chunk: int = 256, compression: str | None = "lz4",
              folder: Path = BENCH_DIR, checksum: bool = True) -> Path:
    """A two-model store (conv2 of (datapoints, 16, 16, channels) float32 per model), written once and reused;
    ``checksum=False`` writes it without the CRC32C of each chunk (for measuring what checksums cost)."""
    path = folder / f"conv_{datapoints}x16x16x{channels}_c{chunk}_{compression}{'' if checksum else '_nocrc'}.zarr"
    if not path.exists():
        layers = {k: v[..., :channels] if channels <= 64 else v for k, v in demo_layers(datapoints, chunk=chunk).items()
                  if k.endswith("conv2")}
        if channels > 64:  # widen by repeating with a twist: more channels, same structure
            import dask.array as da

            layers = {k: da.concatenate([v * (1 + 0.1 * i) + i for i in range(channels // 64)], axis=-1)
                      for k, v in layers.items()}
        import chunkcca.store

        codecs_for = chunkcca.store.codecs_for
        if not checksum:  # this benchmark's own store only: chunkcca always writes checksums
            chunkcca.store.codecs_for = lambda name: tuple(c for c in codecs_for(name)
                                                            if "Crc32c" not in type(c).__name__)
        try:
            chunkcca.write_activations(path, layers, chunks=chunk, compression=compression)
        finally:
            chunkcca.store.codecs_for = codecs_for
    return path


def evict_from_page_cache(path: Path) -> None:
    """Drop the files of the store at ``path`` from the OS page cache: the next read comes from disk,
    as it always does for a store larger than memory (posix_fadvise DONTNEED; no privileges needed)."""
    import os

    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("dropping files from the page cache needs posix_fadvise (Linux); use --cache warm")
    for file in path.rglob("*"):
        if file.is_file():
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def _reset_peak() -> None:
    """Start this process's peak RSS afresh (Linux): a case run by fork and exec can otherwise report the parent's
    peak (measured: a child streaming 370 MiB reported the 2.4 GB its parent had used writing stores)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


_reset_peak()


def peak_mib() -> float:
    """Peak resident memory of this process since it started (or since ``_reset_peak``), MiB."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(script: str, *args: str) -> dict[str, Any]:
    """Run ``script --case ARGS`` in a fresh interpreter; it prints one JSON line with its results."""
    done = subprocess.run([sys.executable, script, "--case", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"case {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"


