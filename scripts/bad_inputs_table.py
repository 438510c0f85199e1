"""Write docs/bad-inputs.md: every case of tests/test_bad_inputs.py run once, with the message the user gets.

    python scripts/bad_inputs_table.py      # about a minute on 2 cores (it trains three tiny runs first)
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_bad_inputs as bad  # noqa: E402  (the cases live with their test)

from labkit.cli import main  # noqa: E402


def message(case: bad.Case, ws: bad.Workspace) -> tuple[str, str, int | None]:
    """``(how it was tried, what the user got, exit status or None for an API call)``."""
    if case.cli is not None:
        argv = case.cli(ws)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        shown = " ".join(
            str(a) if not str(a).endswith(".json") or "configs" in str(a) else Path(a).name for a in argv
        )
        return f"`labkit {shown}`", err.getvalue().strip(), rc
    try:
        case.api(ws)
    except Exception as exc:  # noqa: BLE001 - the message is what we record
        return case.what, f"{type(exc).__name__}: {exc}", None
    return case.what, "(no error)", None


def main_table() -> None:
    with tempfile.TemporaryDirectory(prefix="labkit-bad-") as tmp:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ws = bad.ws.__wrapped__(type("F", (), {"mktemp": lambda self, name: Path(tmp)})())
        rows = []
        for case in bad.CASES:
            how, text, rc = message(case, ws)
            text = text.replace(tmp, "<tmp>").replace("|", "\\|")
            status = "API" if rc is None else f"exit {rc}" + (", early" if case.early else "")
            rows.append(f"| `{case.id}` | {case.what} | {how.replace(tmp, '<tmp>').replace('|', '/')} | "
                        f"{status} | {text} |")
    out = ROOT / "docs" / "bad-inputs.md"
    out.write_text(
        "# Bad inputs and faults: what the user gets\n\n"
        f"{len(rows)} cases, tried through the CLI (in-process `labkit.cli.main`) and the API, each with the "
        "message\nas printed (`<tmp>`: the scratch folder the cases run in). Every CLI case exits with "
        "status 2 and prints one\nline, no traceback (`labkit --debug ...` shows it). "
        "`tests/test_bad_inputs.py` runs the same cases and checks\nstatus, the single line and the key "
        "words; this file is written by `python scripts/bad_inputs_table.py`.\n\nFaults that are handled "
        "without an error: a run killed at any point (also during a checkpoint write) resumes\nexactly with "
        "`--resume` (temporary files of the interrupted write are removed and `best.ckpt` is repaired);\na "
        "second `labkit lab` or a notebook re-run on a finished run with the same config retrains "
        "nothing.\nA full disk, a read-only file system or a vanished folder during a write is one line "
        "(`cannot write '<file>' (No space left on device): the disk is full: free space, then continue with "
        "--resume`), and the files written before stay intact (tests/test_runs.py fails a checkpoint write "
        "as a full disk does, then resumes to the uninterrupted run's weights). An output folder is probed "
        "by creating a folder in it before any work (`/proc` passes a permission check but not the probe). "
        "Cases marked *early* answer before torch is imported (checked in a fresh process by "
        "tests/test_bad_inputs.py).\n\n| case | what | tried as | result | message |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    print(f"wrote {out} ({len(rows)} cases)")


if __name__ == "__main__":
    main_table()
