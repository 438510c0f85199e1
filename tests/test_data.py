import numpy as np
import pytest
import torch
from PIL import Image

from labkit.train.data import (
    EMBEDDED_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    EmbeddedDigits,
    build_datasets,
    check_num_classes,
)

from helpers import make_imagefolder


def test_embedded_split_is_fixed_stratified_and_normalised():
    train, valid = EmbeddedDigits("train"), EmbeddedDigits("valid")
    assert (len(train), len(valid)) == (1437, 360)
    assert train.images.shape == (1437, 3, EMBEDDED_SIZE, EMBEDDED_SIZE)
    assert torch.bincount(valid.targets).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert abs(float(train.images.mean())) < 1e-5 and abs(float(train.images.std()) - 1) < 1e-4
    assert torch.equal(EmbeddedDigits("valid").images, valid.images)  # the same every time


def test_embedded_images_are_the_real_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    valid = EmbeddedDigits("valid")
    img = valid.images[0, 0] * valid.std + valid.mean  # undo normalisation: [0, 1]
    # downsampling the 32x32 image back to 8x8 recovers a real sklearn digit of the same label
    small = torch.nn.functional.adaptive_avg_pool2d(img[None, None], 8)[0, 0].numpy() * 16
    errors = np.abs(digits.images - small).mean(axis=(1, 2))
    assert digits.target[errors.argmin()] == int(valid.targets[0]) and errors.min() < 1.0


def test_augmentation_shifts_but_keeps_content():
    train = EmbeddedDigits("train", augment=True)
    torch.manual_seed(0)
    shifted = [train[5][0] for _ in range(20)]
    assert any(not torch.equal(s, train.images[5]) for s in shifted)
    assert all(s.shape == (3, 32, 32) for s in shifted)


def test_imagenet_folder_with_reference_transforms(tmp_path):
    root = make_imagefolder(tmp_path / "inet")
    cfg = {"name": "imagenet", "root": str(root), "image_size": 32,
           "train": {"dataset": {"transform": {"kwargs": {"augment": True}}}}}
    train, valid = build_datasets(cfg)
    assert train.classes == valid.classes == ["cat", "dog", "eel"] and len(train) == 9
    x, y = valid[4]
    assert x.shape == (3, 32, 32) and y == 1
    # eval transform: Resize(32*256/224 = 37) + CenterCrop(32) + ToTensor + Normalize, computed by hand
    img = Image.open(root / "val" / "dog" / "1.jpg").convert("RGB")
    w, h = img.size
    img = img.resize((round(w * 37 / h), 37), Image.BILINEAR)
    left, top = (img.size[0] - 32) // 2, (img.size[1] - 32) // 2
    ref = torch.from_numpy(np.asarray(img.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255)
    ref = (ref.permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[
        :, None, None
    ]
    assert (x - ref).abs().max() < 0.05  # PIL vs tensor resize antialiasing differ slightly
    assert train[0][0].shape == (3, 32, 32)


def test_imagenet_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*data.root"):
        build_datasets({"name": "imagenet", "root": str(tmp_path / "nowhere")})
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="val.*is missing"):
        build_datasets({"name": "imagenet", "root": str(tmp_path / "only_train")})
    root = make_imagefolder(tmp_path / "inet")
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="empty_class.*no images"):
        build_datasets({"name": "imagenet", "root": str(root)})


def test_class_count_mismatch_is_reported():
    with pytest.raises(DatasetError, match="10 classes but the network outputs 1000.*num_classes to 10"):
        check_num_classes(EmbeddedDigits("valid"), 1000)


def test_limit_keeps_an_even_subset():
    train, valid = build_datasets({"name": "embedded", "train": {"dataset": {"limit": 100}}})
    assert len(train) == 100 and len(valid) == 360 and train.classes == valid.classes


def test_input_size_follows_the_data_section():
    from labkit.train.data import input_size

    assert input_size({"name": "embedded", "image_size": 224}) == 32  # the digits are 32 px whatever is asked
    assert input_size({"name": "imagenet", "image_size": 160}) == 160
    assert input_size({"name": "imagenet"}) == input_size({}) == 224
