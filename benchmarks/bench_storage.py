"""What versioned storage costs: hashing time and bytes, on the quickstart's data and at CIFAR-10
scale.

    .venv/bin/python benchmarks/bench_storage.py [--images 3000 60000] [--repeats 5]

For each size: the data job's two values (cifar10_raw, cifar10_splits, synthetic data, seed 0) are
hashed (content_version, uncached), encoded (npz in memory) and stored (put, into a fresh local
store); the figures are medians over the repeats. Then the overhead: the bytes of the versioned
store after materializing the same data twice and new data once, against what the former
overwrite-in-place storage held (one file per asset, the last one).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cifar_assets import storage
from cifar_assets.data.imageset import RawData
from cifar_assets.data.splits import stratified_split
from cifar_assets.data.synthetic import generate_synthetic


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        storage._known.clear()  # no cached versions: every repeat hashes
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(images: int, repeats: int) -> None:
    raw = RawData(generate_synthetic(images, seed=0))
    splits = stratified_split(raw.pool, 0.1, 0.1, seed=0)
    other = RawData(generate_synthetic(images, seed=1))
    other_splits = stratified_split(other.pool, 0.1, 0.1, seed=0)
    print(f"\n{images} images")
    print(f"{'asset':16} {'MB':>8} {'hash s':>8} {'encode s':>9} {'put s':>8} {'hash/put':>9}")
    for name, value in (("cifar10_raw", raw), ("cifar10_splits", splits)):
        with tempfile.TemporaryDirectory() as folder:
            store = storage.AssetStore(folder)
            hashing = median_seconds(lambda v=value: storage.content_version(v), repeats)
            encoding = median_seconds(lambda v=value: storage.encode(v), repeats)
            putting = median_seconds(lambda v=value, s=store, n=name: s.put(n, v), repeats)
            size = len(storage.encode(value).data) / 1e6
        print(
            f"{name:16} {size:>8.1f} {hashing:>8.3f} {encoding:>9.3f} {putting:>8.3f} "
            f"{hashing / putting:>9.2f}"
        )
    with tempfile.TemporaryDirectory() as folder:
        store = storage.AssetStore(folder)
        for raw_value, split_value in ((raw, splits), (raw, splits), (other, other_splits)):
            store.put("cifar10_raw", raw_value)
            store.put("cifar10_splits", split_value)
        versioned = folder_bytes(Path(folder))
        refs = folder_bytes(Path(folder) / "refs")
        last = len(storage.encode(other).data) + len(storage.encode(other_splits).data)
    print(
        f"3 materializations (same data twice, then new data): versioned store "
        f"{versioned / 1e6:.1f} MB (of which {refs} bytes of records) against {last / 1e6:.1f} MB "
        f"overwritten in place; the repeat cost {refs // 3 // 2} bytes per asset, no object"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--images", type=int, nargs="+", default=[3000, 60000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for images in args.images:
        measure(images, args.repeats)


if __name__ == "__main__":
    main()
