"""Shared fixtures: small, fast configs on the embedded default (constants and helpers: helpers.py)."""

from __future__ import annotations

import pytest
import torch

from labkit.config.loading import load_config

from helpers import QUIET, EMBEDDED_FP32, EMBEDDED_QAT, ROOT, tiny_overrides


@pytest.fixture
def tiny_config():
    def make(path=EMBEDDED_FP32, **extra):
        return load_config(path, tiny_overrides(**extra))

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine (30 ms per
    conv)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def pact8():
    """``(qnet, inet)``: a started 8/8 PACT MobileNetV2 (test_integerize.started_net) and its integer twin,
    built once for the export and int32 tests."""
    from labkit.integer import integerize  # noqa: PLC0415

    from test_integerize import SHAPE, eps_in_for, started_net  # noqa: PLC0415 - test module helpers

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        qnet = started_net()
        inet = integerize(qnet, eps_in_for(), SHAPE)
    finally:
        # restored before the session goes on: later tests train with their own threads
        torch.set_num_threads(n)
    yield qnet, inet


@pytest.fixture(scope="session")
def qat_runs(tmp_path_factory):
    """The embedded default as a user trains it: configs/embedded/config.fp32.json, then the PACT and TQT
    configs at 8 and 4 bit fine-tuning its best checkpoint, all unchanged but for the output folders
    (~8-14 min; one session fixture for test_integerize and test_int32). Trained with one thread, as in the
    whole module's run (``one_thread``), so that a selected test sees the same networks: the thread count
    changes float32 sums, hence the trained weights."""
    root = tmp_path_factory.mktemp("qat")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from labkit.train.loop import train  # noqa: PLC0415 - slow tests only

        train(load_config(EMBEDDED_FP32), root / "fp32", **QUIET)
        runs = {}
        for name, config in EMBEDDED_QAT.items():
            cfg = load_config(ROOT / "configs" / "embedded" / f"config.{config}.json",
                              {"network.pretrained": str(root / "fp32" / "best.ckpt")})
            train(cfg, root / name, **QUIET)
            runs[name] = root / name
    finally:
        torch.set_num_threads(n)
    return runs
