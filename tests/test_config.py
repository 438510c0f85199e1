import json
from pathlib import Path

import pytest

from labkit.config.loading import ConfigError, config_name, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, cfg):
    path = tmp_path / "config.x.json"
    path.write_text(json.dumps(cfg))
    return path


def base():
    return json.loads((ROOT / "configs" / "embedded" / "config.fp32.json").read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/config.fp32.json")))
def test_shipped_fp32_configs_load(path):
    raw = json.loads(path.read_text())
    cfg = load_config(path)
    assert cfg["training"]["n_epochs"] == raw["training"]["n_epochs"]
    assert cfg["network"]["kwargs"]["num_classes"] == (10 if raw["data"]["name"] == "embedded" else 1000)


QUANTIZED_CONFIGS = sorted(
    p for p in (ROOT / "configs").glob("*/config.*.json") if p.name != "config.fp32.json"
)


@pytest.mark.parametrize("path", QUANTIZED_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_quantized_configs_build_their_network(path):
    """Every key of ``network.quantize`` names real layers (the recipe refuses unknown ones), every quantizer
    starts on the config's grid, and the controllers and optimizer build (pretrained weights left out)."""
    from labkit.quant import quantizers
    from labkit.train.build import build_controllers, build_network
    from labkit.train.gd import build_optimizer

    cfg = load_config(path, {"network.pretrained": None}, check_files=False)
    net, report = build_network(cfg)
    levels = {q.n_levels for _, q in quantizers(net)}
    assert report and levels
    if ".4b." in path.name:
        assert levels == {16}
    elif "mixed" not in path.name:
        assert levels == {256}
    tqt = {q.tqt for _, q in quantizers(net)}
    assert tqt == {"tqt" in path.name}
    assert build_controllers(cfg, net)
    build_optimizer(cfg["training"]["gd"], net)


def test_imagenet_fp32_config_has_the_reference_values():
    cfg = load_config(ROOT / "configs" / "imagenet" / "config.fp32.json")
    opt = cfg["training"]["gd"]["opt"]
    assert (opt["class"], opt["kwargs"]) == ("SGD", {"lr": 0.045, "momentum": 0.9, "weight_decay": 4e-05})
    assert cfg["training"]["gd"]["lr_sched"] == {"class": "StepLR", "kwargs": {"step_size": 1, "gamma": 0.98}}
    assert cfg["training"]["n_epochs"] == 100 and cfg["data"]["train"]["dataloader"]["bs"] == 256
    assert cfg["data"]["train"]["dataset"]["transform"]["kwargs"]["augment"] is True


@pytest.mark.parametrize("key,value,path,message", [
    ("training.gd.opt.class", "Adagrad", "training.gd.opt.class", "unknown value 'Adagrad'"),
    ("training.gd.lr_sched.class", "Warmup", "training.gd.lr_sched.class", "unknown value"),
    ("training.n_epochs", "ten", "training.n_epochs", "expected an integer, got a string"),
    ("training.gd.opt.kwargs.lr", True, "training.gd.opt.kwargs.lr", "got a boolean"),
    ("data.train.dataloader.bs", 0, "data.train.dataloader.bs", "must be >= 1"),
    ("network.kwargs.config", "tiny", "network.kwargs.config", "Choose one of: standard, small"),
    ("network.kwargs.widht", 1.0, "network.kwargs.widht", "unknown key"),
    ("network.pretrained", "missing.ckpt", "network.pretrained", "'missing.ckpt' not found"),
    ("data.name", "cifar", "data.name", "unknown value"),
])
def test_errors_name_the_key_path(tmp_path, key, value, path, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, base()), {key: value})
    assert err.value.key_path == path and f"'{path}'" in str(err.value)


def test_missing_sections_and_files(tmp_path):
    cfg = base()
    del cfg["training"]["gd"]["opt"]
    with pytest.raises(ConfigError, match="'training.gd.opt': is missing"):
        load_config(write(tmp_path, cfg))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "broken.json")


def test_reference_layout_pretrained_key_and_extra_keys(tmp_path):
    ckpt = tmp_path / "fp32.ckpt"
    ckpt.write_bytes(b"")
    cfg = base()
    cfg["network"]["kwargs"]["pretrained"] = str(ckpt)  # the reference framework's place for it
    cfg["meters"] = {"train": {"compute_task_statistic": True}}
    loaded = load_config(write(tmp_path, cfg))
    assert loaded["network"]["pretrained"] == str(ckpt) and "pretrained" not in loaded["network"]["kwargs"]
    assert loaded["meters"] == cfg["meters"]
    cfg["trainig"] = {}  # any other key is a typo: refused with the nearest valid one
    with pytest.raises(ConfigError, match="'trainig': unknown key \\(did you mean 'training'\\?\\)"):
        load_config(write(tmp_path, cfg))


def test_hand_schedule_is_validated(tmp_path):
    sched = {"class": "HandScheduler", "kwargs": {"schedule": {"0": 1, "x": 0.1}}}
    with pytest.raises(ConfigError, match="lr_sched.kwargs.schedule.x"):
        load_config(write(tmp_path, base()), {"training.gd.lr_sched": sched})


def test_overrides_and_names():
    assert parse_override("training.n_epochs=3") == ("training.n_epochs", 3)
    assert parse_override("data.root=/data/x") == ("data.root", "/data/x")
    assert parse_override("network.pretrained=null") == ("network.pretrained", None)
    assert config_name("configs/embedded/config.pact.4b.json") == "embedded-pact.4b"
    cfg = load_config(ROOT / "configs" / "embedded" / "config.fp32.json", {"training.n_epochs": 3})
    assert cfg["training"]["n_epochs"] == 3 and cfg["name"] == "embedded-fp32"
