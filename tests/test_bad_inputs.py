"""Bad inputs and faults, tried through the CLI and the API: each gets one clear line (CLI: exit status 2, no
traceback) that names the problem and the fix, or the correct behaviour. ``docs/bad-inputs.md`` lists the same
cases with the messages (``python scripts/bad_inputs_table.py`` writes it from :data:`CASES`)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from labkit.cli import main
from labkit.config.errors import LabkitError
from labkit.config.loading import set_key
from labkit.train.checkpoint import save_atomic
from labkit.train.runs import RunFolder

from helpers import QUIET, ROOT, make_imagefolder, tiny_overrides

FP32 = json.loads((ROOT / "configs" / "embedded" / "config.fp32.json").read_text())
PACT = json.loads((ROOT / "configs" / "embedded" / "config.pact.json").read_text())
TINY = {**tiny_overrides(), "training.n_epochs": 1, "data.train.dataset.limit": 128,
        "data.valid.dataset.limit": 60}


def config(base: dict, **changes) -> dict:
    cfg = copy.deepcopy(base)
    for key, value in {**TINY, **changes}.items():
        set_key(cfg, key, value)
    return cfg


class Workspace:
    """Files the cases point at: configs, runs, dataset folders, broken checkpoints."""

    def __init__(self, root: Path):
        self.root = root

    def write(self, name: str, cfg) -> str:
        path = self.root / name
        path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        return str(path)

    def p(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    w = Workspace(tmp_path_factory.mktemp("bad"))
    fp32 = w.write("fp32.json", config(FP32))
    assert main(["train", fp32, "-o", w.p("run-fp32"), "--no-progress", "--no-tensorboard"]) == 0
    pact = config(PACT, **{"network.pretrained": w.p("run-fp32/best.ckpt")})
    assert main(["train", w.write("pact.json", pact), "-o", w.p("run-pact"), "--no-progress",
                 "--no-tensorboard"]) == 0
    onecycle = config(FP32, **{"training.gd.lr_sched": {"class": "OneCycleLR", "kwargs": {"max_lr": 0.02}}})
    assert main(["train", w.write("onecycle.json", onecycle), "-o", w.p("run-onecycle"),
                 "--no-progress", "--no-tensorboard"]) == 0
    make_imagefolder(w.root / "inet-mismatch", classes=("a", "b"), per_class=1, val_classes=("b", "c"))
    make_imagefolder(w.root / "inet-noval", classes=("a",), per_class=1)
    os.rename(w.root / "inet-noval" / "val", w.root / "inet-noval" / "elsewhere")
    (w.root / "corrupt.ckpt").write_bytes(b"PK\x03\x04 truncated")
    state = torch.load(w.root / "run-fp32" / "best.ckpt", weights_only=True)
    state["state_dict"]["pilot.1.weight"][0] = float("nan")
    save_atomic(state, w.root / "nan.ckpt")
    (w.root / "a-file").write_text("")
    (w.root / "a-folder").mkdir()
    damaged = w.root / "run-damaged"
    damaged.mkdir()
    for name in ("config.json", "last.ckpt", "best.ckpt"):
        (damaged / name).write_bytes((w.root / "run-fp32" / name).read_bytes())
    (damaged / "history.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "valid"\n')
    (w.root / "tv.pth").write_bytes(b"")
    torch.save({"conv.weight": torch.zeros(1)}, w.root / "foreign.pth")
    return w


@dataclass
class Case:
    """``cli``: argv for ``labkit`` (a function of the workspace); ``api``: a call that must raise
    ``error``."""

    id: str
    what: str
    pattern: str
    cli: Callable[[Workspace], list] | None = None
    api: Callable[[Workspace], object] | None = None
    error: type = LabkitError
    early: bool = False  # answered before torch is imported (checked in a fresh process)


def train_with(name: str, base: dict = FP32, extra_args=(), **changes):
    def argv(w: Workspace) -> list:
        return ["train", w.write(f"{name}.json", config(base, **changes)), "-o", w.p(f"new-{name}"),
                *extra_args]
    return argv


def train_args(*args):
    return lambda w: ["train", w.write("plain.json", config(FP32)),
                      *[a(w) if callable(a) else a for a in args]]


def sweep_args(*args):
    """``labkit sweep ARGS -o <tmp>/sweep-bad``."""
    return lambda w: ["sweep", *[a(w) if callable(a) else a for a in args], "-o", w.p("sweep-bad")]


def _run_config(w: Workspace, **kwargs):
    from labkit.lab.steps import run_config

    return run_config(w.write("plain-pact.json", config(PACT, **{"network.pretrained": None})), **kwargs)


def _train_locked(w: Workspace):
    from labkit.config.loading import load_config
    from labkit.train.loop import train

    with RunFolder(w.p("run-locked")).writing():
        train(load_config(w.write("plain.json", config(FP32))), w.p("run-locked"), **QUIET)


CASES = [
    # ---------------------------------------------------------------- config files and overrides
    Case(
        "config-missing",
        "config file does not exist",
        r"config file '.*nope\.json' not found",
        cli=lambda w: ["train", w.p("nope.json")],
    ),
    Case(
        "config-not-json",
        "config file is not JSON",
        r"is not valid JSON \(line 1, column 3",
        cli=lambda w: ["train", w.write("broken.json", "{ not json")],
    ),
    Case(
        "config-array",
        "config file holds a list",
        r"must hold a JSON object",
        cli=lambda w: ["train", w.write("array.json", "[1, 2]")],
    ),
    Case(
        "config-unknown-section",
        "a misspelt section (trainig)",
        r"'trainig': unknown key \(did you mean " r"'training'\?\)",
        cli=lambda w: ["train", w.write("typo.json", {**config(FP32), "trainig": {}})],
    ),
    Case(
        "set-unknown-key",
        "--set of a misspelt key",
        r"'training.n_epoch': unknown key \(did you mean " r"'n_epochs'\?\)",
        cli=train_args("--set", "training.n_epoch=3"),
    ),
    Case(
        "set-no-equals",
        "--set without '='",
        r"override 'training.n_epochs' is not of the form " r"key.path=value",
        cli=train_args("--set", "training.n_epochs"),
    ),
    Case(
        "epochs-zero",
        "--epochs 0",
        r"'training.n_epochs': must be >= 1, got 0",
        cli=train_args("--epochs", "0"),
    ),
    Case(
        "lr-nan",
        "learning rate NaN",
        r"'training.gd.opt.kwargs.lr': must be a finite number, got nan",
        cli=train_args("--set", "training.gd.opt.kwargs.lr=NaN"),
    ),
    Case(
        "lr-negative",
        "negative learning rate",
        r"'training.gd.opt.kwargs.lr': must be > 0, got -0.1",
        cli=train_args("--set", "training.gd.opt.kwargs.lr=-0.1"),
    ),
    Case(
        "momentum-negative",
        "negative momentum",
        r"'training.gd.opt.kwargs.momentum': must be >= 0",
        cli=train_args("--set", "training.gd.opt.kwargs.momentum=-0.9"),
    ),
    Case(
        "momentum-one",
        "momentum 1",
        r"'training.gd.opt.kwargs.momentum': must be < 1, got 1",
        cli=train_args("--set", "training.gd.opt.kwargs.momentum=1"),
    ),
    Case(
        "weight-decay-negative",
        "negative weight decay",
        r"'training.gd.opt.kwargs.weight_decay': must be " r">= 0",
        cli=train_args("--set", "training.gd.opt.kwargs.weight_decay=-1e-4"),
    ),
    Case(
        "batch-zero",
        "batch size 0",
        r"'data.train.dataloader.bs': must be >= 1, got 0",
        cli=train_args("--set", "data.train.dataloader.bs=0"),
    ),
    Case(
        "optimizer-unknown",
        "unknown optimizer",
        r"'training.gd.opt.class': unknown value 'SDG' \(did you " r"mean 'SGD'\?\)",
        cli=train_args("--set", "training.gd.opt.class=SDG"),
    ),
    Case(
        "scheduler-kwarg-unknown",
        "a scheduler argument it does not take",
        r"'training.gd.lr_sched.kwargs.max_learning_rate': unknown key",
        cli=train_args("--set", 'training.gd.lr_sched.kwargs={"max_learning_rate": 0.1}'),
    ),
    Case(
        "schedule-epoch-key",
        "HandScheduler epoch that is not a number",
        r"'training.gd.lr_sched.kwargs.schedule.x': epoch keys are non-negative integers",
        cli=train_args(
            "--set",
            'training.gd.lr_sched={"class": "HandScheduler", "kwargs": {"schedule": {"0": 1, "x": 0.1}}}',
        ),
    ),
    Case(
        "config-folder",
        "a folder where the config file goes",
        r"'.*configs' is a folder\. Pass a JSON " r"config file",
        cli=lambda w: ["train", str(ROOT / "configs")],
        early=True,
    ),
    Case(
        "seed-huge",
        "a seed of 1e20",
        r"'training.seed': expected an integer, got a number \(1e\+20\)",
        cli=train_args("--set", "training.seed=1e20"),
        early=True,
    ),
    Case(
        "sgd-betas",
        "SGD with Adam's betas",
        r"'training.gd.opt.kwargs.betas': unknown key\. Known here: " r"lr, momentum",
        cli=train_args("--set", "training.gd.opt.kwargs.betas=[0.9, 0.99]"),
        early=True,
    ),
    Case(
        "batch-above-dataset",
        "a batch larger than the training set",
        r"'data.train.dataloader.bs': 200 is more than the 128 training images",
        cli=train_args("--set", "data.train.dataloader.bs=200"),
        early=True,
    ),
    Case(
        "output-empty",
        "an empty output folder (-o '')",
        r"run folder: the path is empty",
        cli=train_args("-o", ""),
        early=True,
    ),
    Case(
        "dataset-unknown",
        "unknown dataset",
        r"'data.name': unknown value 'cifar'",
        cli=train_args("--set", "data.name=cifar"),
    ),
    Case(
        "capacity-zero",
        "width multiplier 0",
        r"'network.kwargs.capacity': must be > 0",
        cli=train_args("--set", "network.kwargs.capacity=0"),
    ),
    Case(
        "classes-mismatch",
        "10 digit classes, 1000 network outputs",
        r"10 classes but the network outputs 1000",
        cli=train_args("--set", "network.kwargs.num_classes=1000"),
    ),
    # ---------------------------------------------------------------- datasets
    Case(
        "imagenet-root-missing",
        "ImageNet root does not exist",
        r"ImageNet root '.*nowhere' does not exist",
        cli=train_args("--set", "data.name=imagenet", "--data-root", lambda w: w.p("nowhere")),
    ),
    Case(
        "imagenet-no-val",
        "ImageNet root without val/",
        r"val' is missing",
        cli=train_args("--set", "data.name=imagenet", "--data-root", lambda w: w.p("inet-noval")),
    ),
    Case(
        "imagenet-class-mismatch",
        "train/ and val/ hold different classes",
        r"train/ and val/ hold different class folders \(1 only in train/ \(e.g. a\); 1 only in val/ \(e.g. "
        r"c\)\)",
        cli=train_args(
            "--set",
            "data.name=imagenet",
            "--set",
            "network.kwargs.num_classes=2",
            "--data-root",
            lambda w: w.p("inet-mismatch"),
        ),
    ),
    # ---------------------------------------------------------------- pretrained weights
    Case(
        "pretrained-missing",
        "network.pretrained does not exist",
        r"'network.pretrained': checkpoint file " r"'.*gone\.ckpt' not found",
        cli=train_args("--pretrained", lambda w: w.p("gone.ckpt")),
    ),
    Case(
        "pretrained-corrupt",
        "network.pretrained is not a checkpoint",
        r"'.*corrupt\.ckpt' is corrupt",
        cli=train_args("--pretrained", lambda w: w.p("corrupt.ckpt")),
    ),
    Case(
        "pretrained-nan",
        "network.pretrained holds NaN (a diverged run)",
        r"holds non-finite values \(inf/NaN\) in 'pilot.1.weight'",
        cli=train_args("--pretrained", lambda w: w.p("nan.ckpt")),
    ),
    Case(
        "pretrained-other-width",
        "network.pretrained of another width",
        r"'pilot.0.weight' has shape \(16, 3, 3, 3\), the network's is \(24, 3, 3, 3\)",
        cli=train_args(
            "--pretrained", lambda w: w.p("run-fp32/best.ckpt"), "--set", "network.kwargs.capacity=0.75"
        ),
    ),
    # ---------------------------------------------------------------- per-layer quantization config
    Case(
        "quantize-regex-nothing",
        "a layer regex that names no module",
        r"matches no module of MobileNetV2 \(did you mean 'features.3.residual_branch.1.0'",
        cli=train_with(
            "regex",
            PACT,
            **{
                "network.pretrained": None,
                "network.quantize.PACTConv2d": {"feature.3.residual_branch.1.0$": {}},
            },
        ),
    ),
    Case(
        "quantize-regex-wrong-type",
        "a conv regex that names a ReLU6",
        r"Move the entry under 'PACTUnsignedAct'",
        cli=train_with(
            "wrongtype", PACT, **{"network.pretrained": None, "network.quantize.PACTConv2d": {"pilot.2$": {}}}
        ),
    ),
    Case(
        "quantize-regex-invalid",
        "an invalid regex",
        r"not a valid regular expression",
        cli=train_with("badregex", PACT, **{"network.quantize.PACTConv2d": {"pilot.(0$": {}}}),
    ),
    Case(
        "bits-1",
        "a 1-bit layer (n_levels 2)",
        r"n_levels=2 \(1 bits\) is outside 3..65536: use 2 to 16 " r"bits",
        cli=train_with("bits1", PACT, **{"network.quantize.PACTConv2d.kwargs.n_levels": 2}),
    ),
    Case(
        "bits-0",
        "n_levels 0",
        r"n_levels=0 is outside 3..65536",
        cli=train_with("bits0", PACT, **{"network.quantize.PACTConv2d.kwargs.n_levels": 0}),
        early=True,
    ),
    Case(
        "bits-33",
        "a 33-bit layer",
        r"n_levels=8589934592 \(33 bits\) is outside",
        cli=train_with(
            "bits33",
            PACT,
            **{
                "network.quantize.PACTLinear": {
                    **PACT["network"]["quantize"]["PACTLinear"],
                    "classifier.1$": {"n_levels": 2**33},
                }
            },
        ),
    ),
    Case(
        "init-clip-unknown",
        "unknown init_clip",
        r"init_clip='maximum' is not valid \(did you mean " r"'max'\?\); allowed: max, std",
        cli=train_with("initclip", PACT, **{"network.quantize.PACTUnsignedAct.kwargs.init_clip": "maximum"}),
    ),
    Case(
        "quantizer-setting-unknown",
        "a misspelt quantizer setting",
        r"'network.quantize.PACTConv2d\['pilot.0\$'\].n_level': unknown quantizer setting \(did you mean "
        r"'n_levels'\?\)",
        cli=train_with(
            "nlevel",
            PACT,
            **{
                "network.quantize.PACTConv2d": {
                    **PACT["network"]["quantize"]["PACTConv2d"],
                    "pilot.0$": {"n_level": 16},
                }
            },
        ),
    ),
    Case(
        "harmonize-option-unknown",
        "a misspelt harmonize option",
        r"'network.quantize.harmonize.requant_pol': unknown quantizer setting \(did you mean "
        r"'requant_pool'\?\)",
        cli=train_with("harm", PACT, **{"network.quantize.harmonize.requant_pol": False}),
    ),
    Case(
        "schedule-command-unknown",
        "unknown controller command",
        r"unknown command 'strat' \(did you mean 'start'\?\)",
        cli=train_with("cmd", PACT, **{"training.quantize.kwargs.schedules.linear": {"0": "strat"}}),
    ),
    Case(
        "controllers-missing",
        "network.quantize without training.quantize (it would train in float)",
        r"'training.quantize': is missing",
        cli=train_with("noctl", PACT, **{"training.quantize": None}),
    ),
    Case(
        "loss-nan",
        "the loss diverges (learning rate 1e12)",
        r"training loss became nan at epoch 1, batch \d+: the first non-finite output is module '[\w.]+' "
        r"\(\w+\); lower "
        r"training.gd.opt.kwargs.lr \(now 1e\+12\)",
        cli=train_args(
            "-o", lambda w: w.p("new-nan"), "--no-progress", "--set", "training.gd.opt.kwargs.lr=1e12"
        ),
    ),
    # ---------------------------------------------------------------- run folders and devices
    Case(
        "device-cuda",
        "--device cuda without a GPU",
        r"device 'cuda' was asked for but no CUDA GPU is " r"visible",
        cli=train_args("--device", "cuda", "-o", lambda w: w.p("new-cuda")),
    ),
    Case(
        "output-is-file",
        "output folder is a file",
        r"run folder '.*a-file' is a file",
        cli=train_args("-o", lambda w: w.p("a-file")),
    ),
    Case(
        "run-exists",
        "a finished run in the output folder, no --resume",
        r"run folder '.*run-fp32' already holds a run \(1 of 1 epochs.*--resume.*--overwrite",
        cli=train_args("-o", lambda w: w.p("run-fp32")),
    ),
    Case(
        "resume-other-config",
        "--resume with another learning rate",
        r"--resume: the config differs from the run's in 'training.gd.opt.kwargs.lr': the run has 0.02, the "
        r"request 0.5",
        cli=train_args("-o", lambda w: w.p("run-fp32"), "--resume", "--set", "training.gd.opt.kwargs.lr=0.5"),
    ),
    Case(
        "resume-other-bits",
        "--resume of an 8-bit run with 4-bit layers",
        r"config differs from the run's in 'network.quantize.PACTConv2d.kwargs.n_levels': the run has 256, "
        r"the request 16",
        cli=lambda w: [
            "train",
            w.write(
                "pact4.json",
                config(
                    PACT,
                    **{
                        "network.pretrained": w.p("run-fp32/best.ckpt"),
                        "network.quantize.PACTConv2d.kwargs.n_levels": 16,
                    },
                ),
            ),
            "-o",
            w.p("run-pact"),
            "--resume",
        ],
    ),
    Case(
        "resume-onecycle-longer",
        "--resume --epochs 5 of a finished OneCycleLR run",
        r"n_epochs 1 -> 5: OneCycleLR's schedule is fixed by its total steps",
        cli=lambda w: ["train", w.p("onecycle.json"), "-o", w.p("run-onecycle"), "--resume", "--epochs", "5"],
    ),
    Case(
        "resume-and-overwrite",
        "--resume and --overwrite together",
        r"--resume and --overwrite exclude " r"each other",
        cli=train_args("-o", lambda w: w.p("run-fp32"), "--resume", "--overwrite"),
    ),
    Case(
        "history-damaged",
        "--resume of a run whose history.jsonl is damaged at line 3",
        r"history\.jsonl' is damaged at line 3",
        cli=train_args("-o", lambda w: w.p("run-damaged"), "--resume"),
    ),
    Case(
        "run-locked",
        "a second writer while a run folder is locked",
        r"run folder '.*run-locked' is in use by pid \d+",
        api=_train_locked,
    ),
    # ---------------------------------------------------------------- eval, integerize, export, convert
    Case(
        "eval-missing",
        "labkit eval of a missing checkpoint",
        r"checkpoint '.*nope\.ckpt' not found",
        cli=lambda w: ["eval", w.p("nope.ckpt")],
    ),
    Case(
        "eval-corrupt",
        "labkit eval of a corrupt checkpoint",
        r"is corrupt or not a PyTorch weights file",
        cli=lambda w: ["eval", w.p("corrupt.ckpt")],
    ),
    Case(
        "eval-other-width",
        "labkit eval with a config of another width",
        r"does not fit the network of its config",
        cli=lambda w: [
            "eval",
            w.p("run-fp32"),
            "--config",
            w.write("wide.json", config(FP32, **{"network.kwargs.capacity": 0.75})),
        ],
    ),
    Case(
        "eval-fp32-config-on-pact",
        "labkit eval of a PACT checkpoint with an FP32 config",
        r"does not fit the network of its config \(Unexpected key",
        cli=lambda w: ["eval", w.p("run-pact"), "--config", w.p("fp32.json")],
    ),
    Case(
        "integerize-float-run",
        "labkit integerize of an FP32 run",
        r"holds a float network \(no " r"network.quantize",
        cli=lambda w: ["integerize", w.p("run-fp32")],
    ),
    Case(
        "integerize-not-a-run",
        "labkit integerize of a folder without a run",
        r"holds no best.ckpt",
        cli=lambda w: ["integerize", w.p("inet-noval")],
    ),
    Case(
        "export-unwritable",
        "labkit export into a file path (checked before integerizing)",
        r"export folder '.*a-file' is a file",
        cli=lambda w: ["export", w.p("run-pact"), "-o", w.p("a-file")],
    ),
    Case(
        "export-input-bits-zero",
        "labkit export --input-bits 0 (an input grid of no bits)",
        r"--input-bits 0: give an integer from 2 to 16",
        cli=lambda w: ["export", w.p("run-pact"), "--input-bits", "0"],
        early=True,
    ),
    Case(
        "export-d-range",
        "labkit export --d 99",
        r"--d 99: give an integer from 1 to 48",
        cli=lambda w: ["export", w.p("run-pact"), "--d", "99"],
        early=True,
    ),
    Case(
        "export-n-inputs-zero",
        "labkit export --n-inputs 0",
        r"--n-inputs 0: give an integer >= 1",
        cli=lambda w: ["export", w.p("run-pact"), "--n-inputs", "0"],
        early=True,
    ),
    Case(
        "export-margin-alone",
        "labkit export --margin without --calibrate (it would be ignored)",
        r"--margin is the factor of --calibrate",
        cli=lambda w: ["export", w.p("run-pact"), "--margin", "1.5"],
        early=True,
    ),
    Case(
        "export-margin-below-one",
        "labkit export --calibrate with --margin 0.5",
        r"--margin 0.5: give a finite number >= 1 .*overflow",
        cli=lambda w: [
            "export",
            w.p("run-pact"),
            "--target",
            "deeploy",
            "--calibrate",
            "8",
            "--margin",
            "0.5",
        ],
        early=True,
    ),
    Case(
        "export-calibrate-onnx",
        "labkit export --calibrate for a target without int32 shifts",
        r"--calibrate sets the int32 shifts of --target deeploy only",
        early=True,
        cli=lambda w: ["export", w.p("run-pact"), "--calibrate", "8"],
    ),
    Case(
        "export-int32-forms-onnx",
        "labkit export --no-preclip for a target without an int32 twin",
        r"--max-groups and --no-preclip set the int32 twin of --target deeploy only",
        early=True,
        cli=lambda w: ["export", w.p("run-pact"), "--no-preclip"],
    ),
    Case(
        "export-int32-forms-cmsis",
        "labkit export --target deeploy-cmsis --max-groups 1 (the CMSIS twin has one form per layer)",
        r"--max-groups and --no-preclip set the int32 twin of --target deeploy only",
        early=True,
        cli=lambda w: ["export", w.p("run-pact"), "--target", "deeploy-cmsis", "--max-groups", "1"],
    ),
    Case(
        "export-calibrate-cmsis",
        "labkit export --target deeploy-cmsis --calibrate 8 (its bounds are proven)",
        r"--calibrate sets the int32 shifts of --target deeploy only: deeploy-cmsis multiplies in 64 bits",
        early=True,
        cli=lambda w: ["export", w.p("run-pact"), "--target", "deeploy-cmsis", "--calibrate", "8"],
    ),
    Case(
        "export-max-groups-zero",
        "labkit export --target deeploy --max-groups 0",
        r"--max-groups 0: give an integer >= 1",
        early=True,
        cli=lambda w: ["export", w.p("run-pact"), "--target", "deeploy", "--max-groups", "0"],
    ),
    Case(
        "export-batch-not-dividing",
        "labkit export --n-inputs 8 --batch 3 (the golden data holds whole batches)",
        r"--batch 3 does not divide --n-inputs 8",
        early=True,
        cli=lambda w: ["export", w.p("run-pact"), "--target", "qonnx", "--batch", "3"],
    ),
    Case(
        "export-only-looks-writable",
        "labkit export into /proc (writable by its permission bits, not in fact)",
        r"export folder '/proc/labkit-export' cannot be written",
        early=True,
        cli=lambda w: ["export", w.p("run-pact"), "-o", "/proc/labkit-export"],
    ),
    Case(
        "integerize-limit-negative",
        "labkit integerize --limit -1",
        r"--limit -1: give an integer >= 1",
        cli=lambda w: ["integerize", w.p("run-pact"), "--limit", "-1"],
        early=True,
    ),
    Case(
        "integerize-limit-zero",
        "labkit integerize --limit 0 (not: every image)",
        r"--limit 0: give an integer >= 1",
        cli=lambda w: ["integerize", w.p("run-pact"), "--limit", "0"],
        early=True,
    ),
    Case(
        "plan-output-folder",
        "labkit plan -o an existing folder",
        r"output config '.*a-folder' is a folder",
        cli=lambda w: ["plan", w.p("pact.json"), "-b", "BOPs=uniform:4", "-o", w.p("a-folder")],
        early=True,
    ),
    Case(
        "plan-plot-unwritable",
        "labkit plan --plot where nothing can be written",
        r"the folder of plot '/proc/labkit' cannot be written",
        early=True,
        cli=lambda w: [
            "plan",
            w.p("pact.json"),
            "-b",
            "BOPs=uniform:4",
            "-o",
            w.p("plan.json"),
            "--plot",
            "/proc/labkit/s.png",
        ],
    ),
    Case(
        "plan-sensitivity-unknown",
        "labkit plan --sensitivity of a measure labkit does not have",
        r"--sensitivity hessian: use loss or fisher \(loss: one layer quantized at a time",
        early=True,
        cli=lambda w: ["plan", w.p("pact.json"), "-b", "BOPs=uniform:4", "-o", w.p("plan.json"),
                       "--sensitivity", "hessian"],
    ),
    Case(
        "convert-missing",
        "labkit convert --from a missing file",
        r"weights file '.*nope\.pth' not found",
        cli=lambda w: ["convert", "--from", w.p("nope.pth"), "-o", w.p("conv.ckpt")],
    ),
    Case(
        "convert-foreign",
        "labkit convert --from a state dict that is not mobilenet_v2",
        r"not a torchvision mobilenet_v2 state dict",
        cli=lambda w: ["convert", "--from", w.p("foreign.pth"), "-o", w.p("conv.ckpt")],
    ),
    Case(
        "sweep-grid-unknown-key",
        "labkit sweep with a grid file holding an unknown key",
        r"unknown sweep key\(s\) \['lr'\]: a grid has algorithm, bits, budget, seed",
        cli=lambda w: [
            "sweep",
            w.write("grid-lr.json", {"algorithm": ["pact"], "bits": [8], "lr": [0.1]}),
            "-o",
            w.p("sweep-lr"),
        ],
    ),
    Case(
        "sweep-grid-no-bits",
        "labkit sweep with a grid without bits or budget",
        r"the sweep grid needs at least one 'bits' \(or 'budget'\)",
        cli=lambda w: ["sweep", w.write("grid-nobits.json", {"algorithm": ["pact"]}), "-o", w.p("sweep-nb")],
    ),
    Case(
        "sweep-algorithm-unknown",
        "labkit sweep of an algorithm without a config",
        r"no config .*config\.pakt\.json for sweep algorithm 'pakt': choose one of .*pact",
        cli=lambda w: ["sweep", "--algorithms", "pakt", "--bits", "4", "-o", w.p("sweep-pakt")],
    ),
    Case(
        "sweep-budget-impossible",
        "labkit sweep with a budget no plan meets (checked before any point)",
        r"sweep point pact\.4b-weight_bytes-1000-s0: budget weight_bytes <= 1,000 cannot be met: even every "
        r"layer at 2 bits costs [\d,]+; raise the budget or allow fewer bits \(--plan-bits\)",
        cli=sweep_args("--algorithms", "pact.4b", "--budgets", "weight_bytes=1000"),
    ),
    Case(
        "sweep-epochs-zero",
        "labkit sweep --epochs 0",
        r"--epochs 0: every point trains at least one epoch",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--epochs", "0"),
    ),
    Case(
        "sweep-plan-bits-range",
        "labkit sweep --plan-bits 1 9",
        r"--plan-bits 1 9: give distinct bit-widths from 2 to 16",
        cli=sweep_args(
            "--algorithms", "pact.4b", "--budgets", "weight_bytes=uniform:3", "--plan-bits", "1", "9"
        ),
    ),
    Case(
        "sweep-plan-bits-sawb",
        "labkit sweep --plan-bits 16 for a config whose weights start by SAWB",
        r"sweep point pact\.4b-weight_bytes-u3-s0: --plan-bits 16: the weights of 'pilot.0' \(and 52 more\) "
        r"start by SAWB, whose coefficients stop at 8 bits",
        cli=sweep_args(
            "--algorithms", "pact.4b", "--budgets", "weight_bytes=uniform:3", "--plan-bits", "2", "4", "16"
        ),
    ),
    Case(
        "sweep-bits-sawb",
        "labkit sweep --bits 16 of a SAWB config (it would fail when quantizers start)",
        r"sweep point pact\.4b-w16a16-s0: bits 16: the weights of 'pilot.0' \(and 52 more\) start by SAWB",
        cli=sweep_args("--algorithms", "pact.4b", "--bits", "4", "16"),
    ),
    Case(
        "sweep-seed-not-int",
        "labkit sweep with a grid seed \"zero\"",
        r"sweep seed 'zero': use integers from 0 to 4294967295",
        cli=lambda w: [
            "sweep",
            w.write("grid-seed.json", {"algorithm": ["pact"], "bits": [8], "seed": ["zero"]}),
            "-o",
            w.p("sweep-seed"),
        ],
    ),
    Case(
        "sweep-calib-zero",
        "labkit sweep --calib 0",
        r"--calib 0: budget plans measure on at least one image",
        cli=sweep_args("--algorithms", "pact.4b", "--budgets", "weight_bytes=uniform:3", "--calib", "0"),
    ),
    Case(
        "sweep-calib-without-budgets",
        "labkit sweep --calib without a budget point (it would be ignored)",
        r"--calib sets how budget points are planned, and this grid has none",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--calib", "64"),
    ),
    Case(
        "sweep-sensitivity-unknown",
        "labkit sweep --sensitivity of a measure labkit does not have",
        r"sensitivity 'hessian' is unknown: use loss or fisher",
        cli=sweep_args("--algorithms", "pact.4b", "--budgets", "BOPs=uniform:3", "--sensitivity", "hessian"),
    ),
    Case(
        "sweep-sensitivity-without-budgets",
        "labkit sweep --sensitivity without a budget point (it would be ignored)",
        r"--sensitivity sets how budget points are planned, and this grid has none",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--sensitivity", "fisher"),
    ),
    Case(
        "sweep-no-probe-without-budgets",
        "labkit sweep --no-probe without a budget point (it would be ignored)",
        r"--no-probe sets how budget points are planned, and this grid has none",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--no-probe"),
    ),
    Case(
        "sweep-imagenet-no-checkpoint",
        "labkit sweep of ImageNet points without the FP32 checkpoint",
        r"sweep point pact-w8a8-s0: network.pretrained '.*/pretrained/mnv2_1.0.ckpt' not found: convert "
        r"torchvision weights",
        cli=sweep_args(
            "--algorithms",
            "pact",
            "--bits",
            "8",
            "--data",
            "imagenet",
            "--data-root",
            lambda w: w.p("nowhere"),
        ),
    ),
    Case(
        "sweep-imagenet-no-root",
        "labkit sweep of ImageNet points with a missing --data-root",
        r"sweep point pact-w8a8-s0: ImageNet root '.*nowhere' does not exist",
        cli=sweep_args(
            "--algorithms",
            "pact",
            "--bits",
            "8",
            "--data",
            "imagenet",
            "--data-root",
            lambda w: w.p("nowhere"),
            "--pretrained",
            lambda w: w.p("run-fp32/best.ckpt"),
        ),
    ),
    Case(
        "sweep-slurm-option-local",
        "labkit sweep --partition with the local launcher (it would be ignored)",
        r"--partition applies to --launcher slurm only",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--partition", "gpu"),
    ),
    Case(
        "sweep-gpus-notebook",
        "labkit sweep --launcher slurm --gpus 2 with the notebook runner",
        r"--gpus 2 with the notebook runner would train on one GPU: use --runner train",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--launcher", "slurm", "--gpus", "2"),
    ),
    Case(
        "sweep-parallel-zero",
        "labkit sweep --parallel 0 (was read as 1 and ran)",
        r"--parallel 0: give the number of local jobs at once \(1 or more\)",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--parallel", "0"),
    ),
    Case(
        "sweep-slurm-cpus-zero",
        "labkit sweep --launcher slurm --cpus 0 (was dropped: Slurm's default)",
        r"slurm cpus 0: give an integer >= 1",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--launcher", "slurm", "--cpus", "0",
                       "--dry-run"),
    ),
    Case(
        "sweep-slurm-time",
        "labkit sweep --launcher slurm --time 12h",
        r"slurm time '12h' is not a time limit",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--launcher", "slurm", "--time", "12h"),
    ),
    Case(
        "sweep-sbatch-reserved",
        "labkit sweep --sbatch time=60 (an option the sweep sets)",
        r"sbatch option 'time' is set by the sweep: use --partition, --gpus or --time",
        cli=sweep_args("--algorithms", "pact", "--bits", "8", "--launcher", "slurm", "--sbatch", "time=60"),
    ),
    Case(
        "sweep-slurm-section-typo",
        "labkit sweep with a misspelt key in the grid file's slurm section",
        r"slurm option 'partitoin' is unknown \(did you mean 'partition'\?\)",
        cli=lambda w: [
            "sweep",
            w.write("grid-slurm.json", {"algorithm": ["pact"], "bits": [8], "slurm": {"partitoin": "gpu"}}),
            "--launcher",
            "slurm",
            "-o",
            w.p("sweep-slurm"),
        ],
    ),
    Case(
        "sweep-status-not-a-sweep",
        "labkit sweep --status of a folder without a sweep",
        r"holds no sweep \(no sweep.json\): pass the folder a sweep wrote",
        cli=lambda w: ["sweep", "--status", w.p("run-fp32")],
    ),
    # ---------------------------------------------------------------- API
    Case(
        "api-bits-zero",
        "lab.run_config(w_bits=0)",
        r"weight bits: 0 is not a bit-width from 2 to 16",
        api=lambda w: _run_config(w, w_bits=0),
        error=ValueError,
    ),
    Case(
        "api-spec-bits",
        "PACTConv2d(..., n_levels=2**33)",
        r"outside 3..65536",
        api=lambda w: __import__("labkit.quant", fromlist=["x"]).PACTConv2d(3, 4, 3, n_levels=2**33),
        error=ValueError,
    ),
]


def run_cli(argv: list, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(argv)
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gets_one_clear_line(case: Case, ws: Workspace, capsys):
    if case.cli is not None:
        argv = case.cli(ws)
        rc, err = run_cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert len(err) == 1, err
        assert err[0].startswith(f"labkit {argv[0]}: error: "), err
        assert re.search(case.pattern, err[0]), (case.pattern, err[0])
    else:
        with pytest.raises(case.error) as info:
            case.api(ws)
        assert re.search(case.pattern, str(info.value)), (case.pattern, str(info.value))
        assert "\n" not in str(info.value)


def test_argument_errors_come_before_torch_is_imported(ws: Workspace):
    """The cases marked early answer in a fresh process without importing torch (so before any heavy work)."""
    cases = [c for c in CASES if c.early]
    code = ("import json, sys\nfrom labkit.cli import main\nout = []\n"
            "for argv in json.loads(sys.argv[1]):\n    out.append([main(argv), 'torch' in sys.modules])\n"
            "print(json.dumps(out))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps([c.cli(ws) for c in cases])],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(c.id, rc, torch_loaded) for c, (rc, torch_loaded) in zip(cases, answers)] == \
        [(c.id, 2, False) for c in cases]


def test_refused_runs_are_left_as_they_were(ws: Workspace, capsys):
    """Items 2 and 3 of the issue: a refused train changes nothing in the run folder."""
    folder = Path(ws.p("run-fp32"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for case_id in ("run-exists", "resume-other-config", "resume-and-overwrite"):
        case = next(c for c in CASES if c.id == case_id)
        assert run_cli(case.cli(ws), capsys)[0] == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    onecycle = Path(ws.p("run-onecycle"))
    cfg = (onecycle / "config.json").read_text()
    assert run_cli(next(c for c in CASES if c.id == "resume-onecycle-longer").cli(ws), capsys)[0] == 2
    assert (onecycle / "config.json").read_text() == cfg


def test_refused_sweeps_start_nothing(ws: Workspace, capsys):
    """Issue 20: a sweep with any invalid point exits 2 before its first point runs: no sweep folder."""
    for case in (c for c in CASES if c.id.startswith("sweep-")):
        assert run_cli(case.cli(ws), capsys)[0] == 2, case.id
        assert not list(ws.root.glob("sweep-*")), case.id


def test_the_docs_table_lists_every_case():
    table = (ROOT / "docs" / "bad-inputs.md").read_text()
    listed = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert listed == [c.id for c in CASES]
    assert len(CASES) >= 40
