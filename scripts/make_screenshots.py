"""Make the README's pictures with the project's own code.

    python scripts/make_screenshots.py              # both
    python scripts/make_screenshots.py --only clip  # one of: widget, clip

``docs/img/widget-editor.png``: notebook 06 opened in JupyterLab in headless Chromium and run through the Run
menu (the same code as tests/test_browser.py: ``labkit.browser``; needs ``apt-get install -y chromium`` and
``pip install playwright``). ``docs/img/clip-bounds.png``: ``labkit.plots.plot_clip_trajectories`` of
``runs/embedded-pact``, trained first with ``labkit train configs/embedded/config.pact.json`` when missing
or written by an older labkit without quantizer kinds (after the FP32 run it starts from, when missing too).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"
PACT_RUN = ROOT / "runs" / "embedded-pact"
FP32_CKPT = ROOT / "runs" / "embedded-fp32" / "best.ckpt"


def train(config: str) -> None:
    print(f"labkit train {config}", flush=True)
    subprocess.run([sys.executable, "-m", "labkit.cli", "train", config, "--no-progress"], cwd=ROOT, check=True)


def clip_bounds(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from labkit.plots import plot_clip_trajectories
    from labkit.runs import read_history

    history = read_history(PACT_RUN)
    if not history or any("kind" not in s for s in history[-1].get("quant", {}).values()):
        print(f"{PACT_RUN.relative_to(ROOT)}: " + ("no history" if not history else
              "history written before quantizer kinds were recorded (weights and activations unseparated)"))
        if not FP32_CKPT.is_file():
            train("configs/embedded/config.fp32.json")
        train("configs/embedded/config.pact.json")
        history = read_history(PACT_RUN)
    fig = plot_clip_trajectories(history)
    fig.suptitle("PACT 8b/8b on the embedded default (runs/embedded-pact): clipping bounds per layer", y=1.04)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def widget_editor(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import browser  # the browser driver of tests/test_browser.py

    with tempfile.TemporaryDirectory(prefix="labkit-screenshot-") as tmp:
        parameters = {"output_config": str(Path(tmp) / "config.mixed.json")}  # the defaults otherwise
        with browser.open_notebook(ROOT / "notebooks" / "06_mixed_precision.ipynb", parameters=parameters,
                                   failure_screenshot=ROOT / "test-artifacts" / "screenshot-failure.png") as lab:
            lab.run_all()
            lab.wait_for_editor(timeout=300)
            collapsed = lab.collapsed_rows()
            if collapsed:
                raise browser.BrowserError(f"{len(collapsed)} editor rows are drawn squeezed (under 16 px tall): "
                                           "not writing a screenshot of a broken editor")
            return lab.screenshot_editor(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("widget", "clip"), help="make one picture only")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {"clip": (clip_bounds, "clip-bounds.png"), "widget": (widget_editor, "widget-editor.png")}
    for name, (make, filename) in jobs.items():
        if args.only in (None, name):
            path = make(args.out / filename)
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
