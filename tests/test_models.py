import pytest
import torch
from torch import nn

from labkit.models import MobileNetV2, make_divisible

SKIP_BLOCKS = {2, 4, 5, 7, 8, 9, 11, 12, 14, 15}


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_parameter_count_matches_reference():
    assert n_params(MobileNetV2(capacity=1.0, num_classes=1000)) == 3_504_872


@pytest.mark.parametrize("width", [0.35, 0.5, 0.75, 1.0, 1.4])
def test_parameter_count_matches_torchvision_at_every_width(width):
    import torchvision

    assert n_params(MobileNetV2(capacity=width)) == n_params(
        torchvision.models.mobilenet_v2(width_mult=width)
    )


def test_module_names_follow_the_reference_layout():
    names = dict(MobileNetV2().named_modules())
    for name, kind in [("pilot.0", nn.Conv2d), ("pilot.1", nn.BatchNorm2d), ("pilot.2", nn.ReLU6),
                       ("features.0.residual_branch.0.0", nn.Conv2d),
                       ("features.0.residual_branch.1.1", nn.BatchNorm2d),
                       ("features.1.residual_branch.0.2", nn.ReLU6),
                       ("features.16.residual_branch.2.1", nn.BatchNorm2d),
                       ("features.17.0", nn.Conv2d), ("features.17.2", nn.ReLU6),
                       ("avgpool", nn.AdaptiveAvgPool2d),
                       ("flatten", nn.Flatten), ("classifier.0", nn.Dropout), ("classifier.1", nn.Linear)]:
        assert isinstance(names[name], kind), name
    assert "features.0.residual_branch.2" not in names  # block 0 has no expansion conv
    assert names["features.0.residual_branch.0.0"].groups == 32  # ... so its first conv is the depthwise one
    convs = [m for m in names.values() if isinstance(m, nn.Conv2d)]
    relus = [m for m in names.values() if isinstance(m, nn.ReLU6)]
    assert (len(convs), len(relus)) == (52, 35)
    skips = {int(n.split(".")[1]) for n, m in names.items() if n.count(".") == 1 and n.startswith("features.")
             and getattr(m, "use_skip", False)}
    assert skips == SKIP_BLOCKS


@pytest.mark.parametrize("config,size,final", [("standard", 224, 7), ("standard", 32, 1), ("small", 32, 4)])
def test_any_input_size_down_to_32(config, size, final):
    net = MobileNetV2(capacity=0.35, num_classes=10, config=config).eval()
    feats = net.features(net.pilot(torch.randn(2, 3, size, size)))
    assert feats.shape[-1] == final
    assert net(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_channel_rounding_rule():
    assert [make_divisible(v) for v in (11.2, 16, 3, 44.8, 1792)] == [16, 16, 8, 48, 1792]
    assert make_divisible(36) == 40  # 32 would lose 11% -> add 8


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown MobileNetV2 config"):
        MobileNetV2(config="tiny")
    with pytest.raises(ValueError, match="capacity"):
        MobileNetV2(capacity=0)
