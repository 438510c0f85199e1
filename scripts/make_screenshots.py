"""Make the README's pictures from the browser test (tests/test_browser.py): it runs notebooks 03 and 06 in
JupyterLab in headless Chromium and leaves screenshots in ``test-artifacts/``; this copies them to
``docs/img``.

    python scripts/make_screenshots.py                 # both notebooks
    python scripts/make_screenshots.py --only widget   # one of: widget (notebook 06), training (notebook 03)

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright install``). Notebook
03 trains two epochs of PACT into a temporary folder (from ``runs/embedded-fp32/best.ckpt``, trained first
when missing): minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"
ARTIFACTS = ROOT / "test-artifacts"
#: test name -> the screenshots it leaves in test-artifacts/
JOBS = {"widget": ("test_widget_editor_in_jupyterlab", ("widget-editor.png", "widget-costs.png")),
        "training": ("test_training_notebook_in_jupyterlab", ("live-clip-plot.png", "clip-bounds.png"))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=tuple(JOBS), help="one notebook's pictures only")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default "
                                                              f"{OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (test, pictures) in JOBS.items():
        if args.only not in (None, name):
            continue
        for picture in pictures:
            (ARTIFACTS / picture).unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "pytest", "-q", "--full", f"tests/test_browser.py::{test}"],
                       cwd=ROOT,
                       check=True)
        for picture in pictures:
            path = shutil.copy(ARTIFACTS / picture, args.out / picture)
            print(f"wrote {path} ({Path(path).stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
