"""Shared fixtures: small, fast configs on the embedded default (constants and helpers: helpers.py)."""

from __future__ import annotations

import pytest

from labkit.config.loading import load_config

from helpers import QUIET, EMBEDDED_FP32, EMBEDDED_QAT, ROOT, TRAIN_THREADS, intra_op_threads, tiny_overrides


@pytest.fixture
def tiny_config():
    def make(path=EMBEDDED_FP32, **extra):
        return load_config(path, tiny_overrides(**extra))

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine (30 ms per
    conv)."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="session")
def pact8():
    """``(qnet, inet)``: a started 8/8 PACT MobileNetV2 (test_integerize.started_net) and its integer twin,
    built once for the export and int32 tests."""
    from labkit.integer import integerize  # noqa: PLC0415

    from test_integerize import SHAPE, eps_in_for, started_net  # noqa: PLC0415 - test module helpers

    with intra_op_threads(1):  # restored before the session goes on: later tests train with their own threads
        qnet = started_net()
        inet = integerize(qnet, eps_in_for(), SHAPE)
    yield qnet, inet


@pytest.fixture(scope="session")
def fp32_run():
    """The project's ``runs/embedded-fp32`` as a user makes it (configs/embedded/config.fp32.json), trained
    or resumed to its last epoch here unless complete: one FP32 run for the session fixtures, the browser
    test and the notebooks, which fine-tune from it too."""
    from labkit.train.loop import train  # noqa: PLC0415 - slow tests only

    folder = ROOT / "runs" / "embedded-fp32"
    with intra_op_threads(TRAIN_THREADS):
        train(load_config(EMBEDDED_FP32), folder, resume=True, progress=False, log=None)
    return folder


@pytest.fixture(scope="session")
def qat_runs(fp32_run, tmp_path_factory):
    """The embedded default as a user trains it: the PACT and TQT configs at 8 and 4 bit fine-tuning the FP32
    run's best checkpoint, all unchanged but for the output folders (~3 min; one session fixture for
    test_integerize, test_int32 and test_deeploy_trained)."""
    from labkit.train.loop import train  # noqa: PLC0415 - slow tests only

    root = tmp_path_factory.mktemp("qat")
    runs = {}
    with intra_op_threads(TRAIN_THREADS):
        for name, config in EMBEDDED_QAT.items():
            cfg = load_config(ROOT / "configs" / "embedded" / f"config.{config}.json",
                              {"network.pretrained": str(fp32_run / "best.ckpt")})
            train(cfg, root / name, **QUIET)
            runs[name] = root / name
    return runs
