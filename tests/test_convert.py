import pytest
import torch

from labkit.cli import main
from labkit.models.torchvision import from_torchvision, key_table, torchvision_hub_file
from labkit.train.pretrained import convert_file
from labkit.train.checkpoint import CheckpointError, read_state_dict

from fixtures import random_torchvision_model


@pytest.mark.parametrize("width,num_classes", [(1.0, 1000), (0.35, 10)])
def test_conversion_gives_identical_logits(width, num_classes):
    tv = random_torchvision_model(width, num_classes)
    net = from_torchvision(tv).eval()
    assert net.capacity == width and net.num_classes == num_classes
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (tv(x) - net(x)).abs().max() <= 1e-5


def test_conversion_from_state_dict_maps_all_314_keys():
    state = random_torchvision_model().state_dict()
    assert len(state) == 314
    net = from_torchvision(state)
    assert len(net.state_dict()) == 314
    assert torch.equal(net.state_dict()["features.0.residual_branch.1.1.running_var"],
                       state["features.1.conv.2.running_var"])
    assert torch.equal(net.state_dict()["features.5.residual_branch.2.0.weight"],
                       state["features.6.conv.2.weight"])
    table = key_table(state)
    assert len(table) == 314 and set(r["labkit"] for r in table.rows) == set(net.state_dict())


def test_cli_convert_writes_loadable_checkpoint(tmp_path, capsys):
    tv = random_torchvision_model(0.5, 1000)
    src = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), src)
    out = tmp_path / "mnv2.ckpt"
    assert main(["convert", "--from", str(src), "--output", str(out)]) == 0
    assert "capacity 0.5" in capsys.readouterr().out
    state, network = read_state_dict(out)
    assert network["kwargs"] == {"capacity": 0.5, "num_classes": 1000, "config": "standard"}
    assert torch.equal(state["pilot.0.weight"], tv.state_dict()["features.0.0.weight"])


def test_hub_cache_is_used_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(CheckpointError, match="not in the local cache.*mobilenet_v2-b0353104.pth"):
        convert_file(tmp_path / "x.ckpt")
    cached = torchvision_hub_file()
    assert cached.is_relative_to(tmp_path)
    cached.parent.mkdir(parents=True)
    torch.save(random_torchvision_model().state_dict(), cached)
    path, net = convert_file(tmp_path / "x.ckpt")
    assert path.is_file() and net.capacity == 1.0


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        convert_file(tmp_path / "x.ckpt", bad)
    foreign = tmp_path / "foreign.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(CheckpointError, match="not a torchvision mobilenet_v2"):
        convert_file(tmp_path / "x.ckpt", foreign)
