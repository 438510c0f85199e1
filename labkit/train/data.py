"""Datasets: ILSVRC12 from an ImageFolder tree, and the embedded default (scikit-learn's digits, 32x32 RGB).

Nothing here downloads. ``build_datasets(data_cfg)`` returns ``(train, valid)``; both carry ``.classes``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from labkit.config.errors import LabkitError
from labkit.config.schema import Data

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels (AlexNet lighting noise): eigenvalues and eigenvectors (columns).
_IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
_IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))

EMBEDDED_SIZE = Data.EMBEDDED_SIZE
EMBEDDED_VAL_SIZE = Data.EMBEDDED_IMAGES["valid"]
EMBEDDED_SPLIT_SEED = 0


class DatasetError(LabkitError, ValueError):
    """A dataset that cannot be used as configured; the message names the path or value and the fix."""


def data_section(data: Data | dict) -> Data:
    """The typed ``data`` section (a dict is validated; defaults from :class:`labkit.config.schema.Data`)."""
    return data if isinstance(data, Data) else Data.model_validate(data)


def input_size(data: Data | dict) -> int:
    """Image side in pixels of the ``data`` section's dataset: embedded 32, ImageNet ``image_size``."""
    return data_section(data).size


def input_normalisation(data: Data | dict | str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(means, stds)`` per channel of the dataset's input normalisation (images in [0, 1]); ``data``:
    the ``data`` section or the dataset name."""
    name = data if isinstance(data, str) else data_section(data).name
    if name == "embedded":
        _, _, mean, std = _embedded_arrays()
        return (mean,), (std,)
    if name == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    raise DatasetError(f"unknown dataset {name!r} under data.name: use 'embedded' or 'imagenet'")


def build_datasets(data: Data | dict) -> tuple[Dataset, Dataset]:
    """``data`` config section -> ``(train, valid)`` datasets (``limit`` keeps that many, evenly spread)."""
    data = data_section(data)
    augment = data.train.dataset.transform.kwargs.augment
    if data.name == "embedded":
        train, valid = EmbeddedDigits("train", augment=augment), EmbeddedDigits("valid")
    else:
        for split in ("train", "val"):  # both before the (slow) listing of either
            _split_folder(data.root, split)
        train = imagenet_folder(data.root, "train", imagenet_transform(data.size, augment))
        valid = imagenet_folder(data.root, "val",
                                imagenet_transform(data.size, data.valid.dataset.transform.kwargs.augment))
        check_same_classes(train, valid, Path(data.root).expanduser())
    return _limit(train, data.train.dataset.limit), _limit(valid, data.valid.dataset.limit)


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    """``limit`` samples evenly spread over the set (quick runs, tests); None: all."""
    if not limit or limit >= len(dataset):
        return dataset
    subset = Subset(dataset, np.linspace(0, len(dataset) - 1, limit).round().astype(int).tolist())
    subset.classes = dataset.classes
    return subset


def check_same_classes(train: Dataset, valid: Dataset, root: Path) -> None:
    """Raise when ``train/`` and ``val/`` hold different class folders: labels are class indices in sorted
    order, so one missing or extra folder shifts every label after it."""
    if list(train.classes) == list(valid.classes):
        return
    only_train = sorted(set(train.classes) - set(valid.classes))
    only_val = sorted(set(valid.classes) - set(train.classes))
    parts = [f"{len(only_train)} only in train/ (e.g. {', '.join(only_train[:3])})" if only_train else "",
             f"{len(only_val)} only in val/ (e.g. {', '.join(only_val[:3])})" if only_val else ""]
    raise DatasetError(f"'{root}': train/ and val/ hold different class folders "
                       f"({'; '.join(p for p in parts if p)}): labels are class indices, so they would not "
                       "match; give both splits the same class folders")


def fingerprint(dataset: Dataset) -> str:
    """sha256 of what a dataset serves: embedded digits by their arrays, image folders by their file list and
    labels, subsets by their base and indices (cheap: no image is read)."""
    h = hashlib.sha256()
    base, indices = dataset, None
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, list(dataset.indices)
    if isinstance(base, EmbeddedDigits):
        h.update(base.images.numpy().tobytes())
        h.update(base.targets.numpy().tobytes())
    else:
        root = Path(getattr(base, "root", "."))
        for path, label in getattr(base, "samples", []):
            h.update(f"{Path(path).relative_to(root)}\t{label}\n".encode())
    if indices is not None:
        h.update(np.asarray(indices, dtype=np.int64).tobytes())
    return h.hexdigest()


def check_num_classes(dataset: Dataset, num_classes: int) -> None:
    """Raise when the dataset's class count differs from the network's output size."""
    found = len(dataset.classes)
    if found != num_classes:
        raise DatasetError(
            f"the dataset has {found} classes but the network outputs {num_classes}: set "
            f"network.kwargs.num_classes to {found} (or point data.root at the matching dataset)")


# ---------------------------------------------------------------------------------------------- ImageNet
class Lighting:
    """AlexNet PCA lighting noise: ``img += eigvec @ (alpha * eigval)``, ``alpha ~ N(0, std)``."""

    def __init__(self, std: float = 0.1):
        self.std = std
        self.eigval = torch.tensor(_IMAGENET_EIGVAL)
        self.eigvec = torch.tensor(_IMAGENET_EIGVEC)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return img
        alpha = torch.randn(3) * self.std
        return img + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)


def imagenet_transform(size: int = 224, augment: bool = False):
    """Train (augment): RandomResizedCrop, flip, colour jitter 0.4, lighting 0.1. Eval: Resize(size*8/7),
    CenterCrop."""
    from torchvision import transforms as T  # lazy: seconds to import, and only ImageNet needs it

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if augment:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4),
                          T.ToTensor(), Lighting(0.1), normalize])
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(), normalize])


def imagenet_folder(root: str | None, split: str, transform) -> Dataset:
    """``root/split/<class>/<image>`` as a torchvision ImageFolder, with errors that say what to fix."""
    from torchvision.datasets import ImageFolder  # lazy: see imagenet_transform

    folder = _split_folder(root, split)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"'{folder}' holds no class folders: expected {split}/<class>/<image files>")
    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:  # torchvision: a class folder without images
        empty = [c for c in classes if not any(p.is_file() for p in (folder / c).iterdir())]
        where = (
            f"class folder(s) {', '.join(repr(str(folder / c)) for c in empty[:3])}"
            if empty
            else f"'{folder}'"
        )
        raise DatasetError(f"{where} hold(s) no images: every class needs at least one image "
                           f"(.jpg, .jpeg, .png, ...); remove empty class folders or fill them") from err


def _split_folder(root: str | None, split: str) -> Path:
    if not root:
        raise DatasetError("data.root is not set: point it at the ILSVRC12 folder that holds train/ and val/")
    folder = Path(root).expanduser() / split
    if not Path(root).expanduser().is_dir():
        raise DatasetError(f"ImageNet root '{root}' does not exist: set data.root (or --data-root) to the "
                           "folder that holds train/ and val/ (one sub-folder of images per class)")
    if not folder.is_dir():
        raise DatasetError(f"'{folder}' is missing: the ImageNet root must hold train/ and val/, each with "
                           "one sub-folder per class (run torchvision's valprep or an equivalent script for "
                           "val/)")
    return folder


# -------------------------------------------------------------------------------------- embedded default
class EmbeddedDigits(Dataset):
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16), bilinearly resized to 32x32 RGB.

    Fixed stratified split (seed 0): 1,437 train / 360 valid. Normalised by the train split's mean/std.
    ``augment`` shifts each image by up to 2 pixels (background-filled).
    """

    def __init__(self, split: str = "train", augment: bool = False, max_shift: int = 2):
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        images, labels, mean, std = _embedded_arrays()
        index = _embedded_split()[split]
        self.images = ((images[index] - mean) / std).contiguous()
        self.targets = labels[index]
        self.background = float((0.0 - mean) / std)
        self.mean, self.std = mean, std
        self.classes = [str(d) for d in range(10)]
        self.augment, self.max_shift = augment, max_shift

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.augment and self.max_shift:
            s = self.max_shift
            dx, dy = torch.randint(-s, s + 1, (2,)).tolist()
            padded = F.pad(img, (s, s, s, s), value=self.background)
            img = padded[:, s + dy: s + dy + EMBEDDED_SIZE, s + dx: s + dx + EMBEDDED_SIZE]
        return img, int(self.targets[i])


_EMBEDDED_CACHE: dict = {}


def _embedded_arrays():
    """All 1,797 digits as float 3x32x32 in [0, 1], labels, and the train split's mean and std."""
    if "arrays" not in _EMBEDDED_CACHE:
        from sklearn.datasets import load_digits  # lazy: only the embedded default needs scikit-learn

        digits = load_digits()
        small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        big = F.interpolate(small, size=(EMBEDDED_SIZE, EMBEDDED_SIZE), mode="bilinear", align_corners=False)
        images = big.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
        labels = torch.tensor(digits.target, dtype=torch.long)
        train = images[_embedded_split(labels.numpy())["train"]]
        _EMBEDDED_CACHE["arrays"] = (images, labels, float(train.mean()), float(train.std()))
    return _EMBEDDED_CACHE["arrays"]


def _embedded_split(labels: np.ndarray | None = None) -> dict:
    """Stratified, seeded index split of the 1,797 digits: 360 valid, the rest train."""
    if "split" not in _EMBEDDED_CACHE:
        from sklearn.model_selection import train_test_split  # lazy: as load_digits

        idx = np.arange(len(labels))
        train, valid = train_test_split(idx, test_size=EMBEDDED_VAL_SIZE, random_state=EMBEDDED_SPLIT_SEED,
                                        stratify=labels)
        _EMBEDDED_CACHE["split"] = {"train": torch.from_numpy(np.sort(train)),
                                    "valid": torch.from_numpy(np.sort(valid))}
    return _EMBEDDED_CACHE["split"]
