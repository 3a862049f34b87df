"""The dataset catalogue: one name, its location on each platform.

Local folders for the `local` platform, an S3 URI for `sagemaker`, an FSx path for
`sagemaker-fsx` and `dlami`. The catalogue lives in `$MMP_HOME/datasets.json`; on
AWS the stack passes it as JSON in `MMP_DATASETS`. Stdlib only (Lambda imports it).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from mmp import config
from mmp.contract.names import NAME_PATTERN, is_safe_name

BUILTIN = ("digits", "fashion")


@dataclass(frozen=True)
class Dataset:
    name: str
    local: str | None = None
    s3: str | None = None
    fsx: str | None = None

    def local_path(self) -> Path:
        return Path(self.local) if self.local else config.datasets_root() / self.name


def _catalogue_file() -> Path:
    return config.mmp_home() / "datasets.json"


def load_catalogue() -> dict[str, Dataset]:
    """Built-in names, then `$MMP_HOME/datasets.json`, then `MMP_DATASETS` (JSON)."""
    entries: dict[str, Dataset] = {name: Dataset(name=name) for name in BUILTIN}
    sources: list[dict] = []
    if os.environ.get("MMP_DATASETS"):
        sources.append(json.loads(os.environ["MMP_DATASETS"]))
    elif (config.home_path() / "datasets.json").exists():
        sources.append(json.loads((config.home_path() / "datasets.json").read_text()))
    for source in sources:
        for name, fields in source.items():
            entries[name] = Dataset(name=name, **{k: v for k, v in fields.items() if k in ("local", "s3", "fsx")})
    return entries


def add_dataset(name: str, *, local: str | None = None, s3: str | None = None, fsx: str | None = None) -> Dataset:
    if not is_safe_name(name):
        raise ValueError(f"dataset name {name!r} must match {NAME_PATTERN}")
    if s3 is not None and not s3.startswith("s3://"):
        raise ValueError(f"--s3 must be an s3:// URI, got {s3!r}")
    if fsx is not None and not fsx.startswith("/"):
        raise ValueError(f"--fsx must be an absolute path on the file system, got {fsx!r}")
    path = _catalogue_file()
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = Dataset(name=name, local=str(Path(local).resolve()) if local else None, s3=s3, fsx=fsx)
    data[name] = {k: v for k, v in asdict(entry).items() if k != "name" and v is not None}
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return entry


# -- IDX, the file format of MNIST and Fashion-MNIST ---------------------------
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(path: Path, array) -> None:
    """Write a uint8 array as IDX (magic 0x0000080N, big-endian dims), gzipped if *.gz."""
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())


def prepare_digits(dest: Path | None = None, test_fraction: float = 0.2) -> Path:
    """scikit-learn's bundled 8×8 digits (offline) as Fashion-MNIST-style IDX files."""
    import numpy as np
    from sklearn.datasets import load_digits

    dest = Path(dest or config.datasets_root() / "digits")
    dest.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(len(order) * (1 - test_fraction))
    for split, idx in (("train", order[:cut]), ("test", order[cut:])):
        image_file, label_file = IDX_FILES[split]
        write_idx(dest / f"{image_file}.gz", images[idx])
        write_idx(dest / f"{label_file}.gz", labels[idx])
    return dest


def missing_files(folder: Path) -> list[str]:
    """IDX files a dataset folder lacks (plain or .gz both count)."""
    wanted: Iterable[str] = [name for pair in IDX_FILES.values() for name in pair]
    return [n for n in wanted if not (folder / n).exists() and not (folder / f"{n}.gz").exists()]
