"""Drive JupyterLab in headless Chromium: a private JupyterLab server on localhost, a notebook opened and run
through the UI, and the bit-width editor's widgets read and edited like a user would.

Used by ``tests/test_browser.py`` and ``scripts/make_screenshots.py`` (one piece of code for both). Needs
Debian's ``chromium`` (``apt-get install -y chromium``, at ``/usr/bin/chromium``) and the ``playwright``
Python package (a dev dependency). ``playwright install`` is never needed: it downloads browsers, and this
module drives the system Chromium.

The server gets a free port, a random token, a temporary root folder holding a *copy* of the notebook (the
repository's notebook is never opened, so it is never modified) and its own temporary Jupyter config,
data, runtime, settings and IPython folders, so nothing reads or writes the user's home settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
INSTALL_HINT = ("install them with `apt-get install -y chromium` (Debian's package, /usr/bin/chromium) and "
                "`pip install playwright` (or `pip install -e \".[dev]\"`); do not run `playwright install`, "
                "the system Chromium is used")

# JupyterLab user settings for the private server: no news or update checks (no network, no pop-ups), every
# cell attached to the DOM (no windowing), and no autosave (the copy is never written back either).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}

TOTALS_PREFIX = "weights"  # the editor's totals line begins with this word


class BrowserError(RuntimeError):
    """A step in the browser did not happen in time; the message holds the page text and the server log."""


def missing_requirements() -> list[str]:
    """What is missing to run a browser check (empty when Chromium and Playwright are both there)."""
    missing = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium ({CHROMIUM} not found)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package")
    return missing


def require_browser() -> None:
    """Raise :class:`BrowserError` naming what is missing and how to install it."""
    missing = missing_requirements()
    if missing:
        raise BrowserError(f"missing {' and '.join(missing)}: {INSTALL_HINT}")


def normalize(text: str) -> str:
    """Rendered text or widget HTML -> plain text with single spaces (tags dropped, nbsp as space)."""
    text = re.sub(r"<[^>]+>", "", text).replace("\xa0", " ")
    return " ".join(text.split())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def copy_notebook(source: str | Path, root: Path, parameters: dict | None = None) -> Path:
    """Copy ``source`` into ``root``; ``parameters`` go into a cell after the ``parameters`` cell, as
    papermill injects them (values written with ``repr``)."""
    nb = json.loads(Path(source).read_text())
    if parameters:
        index = next((i for i, c in enumerate(nb["cells"])
                      if "parameters" in c.get("metadata", {}).get("tags", [])), -1)
        source_lines = [f"{k} = {v!r}\n" for k, v in parameters.items()]
        nb["cells"].insert(index + 1, {"cell_type": "code", "id": secrets.token_hex(4),
                                       "execution_count": None,
                                       "outputs": [], "metadata": {"tags": ["injected-parameters"]},
                                       "source": source_lines})
    target = root / Path(source).name
    target.write_text(json.dumps(nb, indent=1))
    return target


class LabServer:
    """``jupyter lab`` on 127.0.0.1 serving ``root_dir``, with its private Jupyter folders under ``home``."""

    def __init__(self, root_dir: Path, home: Path, start_timeout: float = 120):
        self.root_dir, self.home, self.start_timeout = Path(root_dir), Path(home), start_timeout
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.log_path = self.home / "jupyter-lab.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, notebook: str) -> str:
        return f"{self.base_url}/lab/tree/{notebook}?token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _env(self) -> dict:
        dirs = {name: self.home / sub for name, sub in (
            ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
            ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"), ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"),
            ("IPYTHONDIR", "ipython"))}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        for rel, values in LAB_SETTINGS.items():
            path = dirs["JUPYTERLAB_SETTINGS_DIR"] / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = dict(os.environ, **{k: str(v) for k, v in dirs.items()})
        env.pop("JUPYTER_PREFER_ENV_PATH", None)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def request(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(self.base_url + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def start(self) -> LabServer:
        env = self._env()
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
               "--ServerApp.allow_root=True",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        self._log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.root_dir, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise BrowserError(f"jupyter lab exited with code {self.proc.returncode} before serving:\n"
                                   f"{_tail(self.log())}")
            try:
                self.request("GET", "/api/status", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BrowserError(f"jupyter lab did not answer on port {self.port} within "
                                   f"{self.start_timeout:.0f} s:\n{_tail(self.log())}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Shut the kernels down, then the server (asked first, terminated, killed as a last resort)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                for kernel in self.request("GET", "/api/kernels") or []:
                    self.request("DELETE", f"/api/kernels/{kernel['id']}", timeout=30)
            with contextlib.suppress(Exception):
                self.request("POST", "/api/shutdown")
            for stop in (None, self.proc.terminate, self.proc.kill):
                if stop:
                    stop()
                try:
                    self.proc.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log_file.close()
        self.proc = None


class LabNotebook:
    """A notebook open in JupyterLab in a Playwright ``page``: run it, find the bit-width editor, edit it."""

    def __init__(self, page, server: LabServer, notebook: str, failure_screenshot: Path | None = None):
        self.page, self.server, self.notebook = page, server, notebook
        self.failure_screenshot = failure_screenshot

    # ------------------------------------------------------------------ diagnostics
    def text(self) -> str:
        try:
            return self.page.inner_text("body", timeout=5000)
        except Exception as err:  # the page itself may be what failed
            return f"(page text unavailable: {err})"

    def fail(self, message: str) -> BrowserError:
        """A :class:`BrowserError` with ``message``, the page text and the server log (and a screenshot)."""
        if self.failure_screenshot is not None:
            with contextlib.suppress(Exception):
                self.failure_screenshot.parent.mkdir(parents=True, exist_ok=True)
                self.page.screenshot(path=str(self.failure_screenshot), full_page=True)
                message += f"\n(screenshot of the page: {self.failure_screenshot})"
        return BrowserError(f"{message}\n--- page text ---\n{_tail(self.text(), 6000)}\n"
                            f"--- jupyter lab log ---\n{_tail(self.server.log(), 3000)}")

    def _errors(self) -> list[str]:
        """Error outputs (tracebacks) rendered in the notebook so far."""
        outputs = self.page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
        return [normalize(t) for t in outputs.all_inner_texts()]

    # ------------------------------------------------------------------ state
    def _dialog(self) -> str | None:
        """Deal with a modal dialog: the kernel chooser is answered with its preselected kernel (it shows when
        a command beats the kernel's start); any other dialog is a failure. Returns the dialog's text."""
        dialog = self.page.locator(".jp-Dialog")
        if not dialog.count():
            return None
        text = normalize(dialog.first.inner_text())
        if "Select Kernel" in text and "Python 3" in text:
            dialog.first.locator(".jp-Dialog-button.jp-mod-accept").click()
            dialog.first.wait_for(state="detached", timeout=30_000)
            return text
        raise self.fail(f"unexpected dialog in JupyterLab: {text}")

    def kernel_ready(self) -> bool:
        """The server has an idle kernel for the notebook and the page shows it connected and idle."""
        try:
            sessions = self.server.request("GET", "/api/sessions")
        except Exception:
            return False
        idle = any(s.get("path", "").endswith(self.notebook)
                   and (s.get("kernel") or {}).get("execution_state") == "idle" for s in sessions or [])
        status = self.page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"Python 3.*\|\s*Idle"))
        return idle and status.count() > 0 and not self.page.locator(".jp-Dialog").count()

    # ------------------------------------------------------------------ steps
    def open(self, timeout: float = 120) -> None:
        """Load JupyterLab with the notebook; wait for its cells and for its kernel to be started and idle."""
        try:
            self.page.goto(self.server.url(self.notebook), wait_until="domcontentloaded",
                           timeout=timeout * 1000)
            self.page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(state="visible",
                                                                           timeout=timeout * 1000)
        except Exception as err:
            raise self.fail(f"JupyterLab did not show {self.notebook} within {timeout:.0f} s "
                            f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
        deadline, ready_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            self._dialog()
            if self.kernel_ready():
                ready_since = ready_since or time.monotonic()
                if time.monotonic() - ready_since >= 1.0:  # settled: no late dialog
                    return
            else:
                ready_since = None
            self.page.wait_for_timeout(250)
        raise self.fail(f"the kernel of {self.notebook} was not started and idle within {timeout:.0f} s")

    def _executed_any(self) -> bool:
        """Some code cell shows [*] or [n] (the kernel took the Run All)."""
        prompts = self.page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
        return any(re.search(r"\[(\*|\d+)\]", t) for t in prompts)

    def run_all(self, timeout: float = 60) -> None:
        """Run > Run All Cells, through the menu bar; checks that the kernel started executing (once more if a
        kernel chooser got in the way)."""
        for _ in range(2):
            try:
                self.page.locator(".jp-NotebookPanel .jp-Cell").first.click()
                self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            except Exception as err:
                raise self.fail(f"could not choose Run > Run All Cells ({type(err).__name__}: "
                                f"{str(err).splitlines()[0]})") from None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._executed_any():
                    return
                if self._dialog():
                    break  # answered the kernel chooser: run all again
                self.page.wait_for_timeout(250)
            else:
                break
        raise self.fail(f"Run All Cells did not start executing any cell within {timeout:.0f} s")

    @property
    def totals_locator(self):
        return self.page.locator(".widget-html-content").filter(
            has_text=re.compile(rf"^\s*{TOTALS_PREFIX}\b")
        )

    @property
    def rows_locator(self):
        """The editor's layer rows (each an HBox ending in a per-channel checkbox)."""
        return self.page.locator(".widget-hbox:has(> .widget-checkbox)")

    def wait_for_editor(self, timeout: float = 300) -> str:
        """Wait until the editor's totals line has rendered; fail early on a traceback. Returns the totals."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.totals_locator.count() and self.rows_locator.count():
                return self.totals()
            if self.page.locator(".jp-Dialog").count():
                raise self.fail("a dialog opened while waiting for the bit-width editor")
            errors = self._errors()
            if errors:
                raise self.fail(f"a cell raised while waiting for the bit-width editor:\n{errors[0][:2000]}")
            self.page.wait_for_timeout(1000)
        raise self.fail(f"the bit-width editor (a totals line beginning with {TOTALS_PREFIX!r} and a row per "
                        f"layer) did not render within {timeout:.0f} s of Run All Cells")

    def totals(self) -> str:
        return normalize(self.totals_locator.first.inner_text())

    def layer_names(self) -> list[str]:
        """The layer name of every editor row, top to bottom."""
        return [normalize(t) for t in self.rows_locator.evaluate_all(
            "rows => rows.map(r => r.querySelector(':scope > .widget-label').innerText)")]

    def row(self, layer: str):
        row = self.rows_locator.filter(has=self.page.locator("> .widget-label", has_text=re.compile(
            rf"^{re.escape(layer)}$")))
        if row.count() != 1:
            raise self.fail(f"expected one editor row for layer {layer!r}, found {row.count()}")
        return row

    def collapsed_rows(self, min_height: float = 16) -> list[str]:
        """Editor rows drawn less than ``min_height`` px tall (squeezed by their container: unreadable)."""
        return [normalize(name) for name in self.rows_locator.evaluate_all(
            "(rows, h) => rows.filter(r => r.getBoundingClientRect().height < h)"
            ".map(r => r.querySelector(':scope > .widget-label').innerText)", min_height)]

    def set_bits(self, layer: str, w_bits: int | None = None, a_bits: int | None = None) -> None:
        """Type new bit-widths into a layer's W bits / A bits boxes (committed with Enter, as a user does)."""
        boxes = self.row(layer).locator("input[type=number]")
        for index, value in ((0, w_bits), (1, a_bits)):
            if value is not None:
                box = boxes.nth(index)
                box.fill(str(value))
                box.press("Enter")

    def apply_bulk(self, target: str, w_bits: int, a_bits: int) -> None:
        """The bulk bar: choose ``target`` in the dropdown, type W and A bits, click *apply*."""
        bar = self.page.locator(".widget-hbox").filter(has=self.page.locator("button", has_text="apply")).last
        bar.locator("select").select_option(label=target)
        for index, value in ((0, w_bits), (1, a_bits)):
            box = bar.locator("input[type=number]").nth(index)
            box.fill(str(value))
            box.press("Enter")
        bar.locator("button", has_text="apply").click()

    def propose(self, budget: str) -> None:
        """The propose bar: type ``budget`` into its box, click *propose*."""
        bar = self.page.locator(".widget-hbox").filter(has=self.page.locator("button",
                                                                             has_text="propose")).last
        box = bar.locator("input[type=text]").first
        box.fill(budget)
        box.press("Enter")
        bar.locator("button", has_text="propose").click()

    def wait_for_totals_change(self, before: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.totals()
            if now != before:
                return now
            self.page.wait_for_timeout(250)
        raise self.fail(f"the totals line did not change within {timeout:.0f} s after the edit; "
                        f"still:\n{before}")

    # ------------------------------------------------------------------ any notebook
    def stderr_outputs(self) -> list[str]:
        """Texts of the red stderr boxes rendered so far."""
        boxes = self.page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        return [normalize(t) for t in boxes.all_inner_texts()]

    def cell(self, code: str):
        """The code cell whose input contains ``code``."""
        cell = self.page.locator(".jp-CodeCell").filter(has=self.page.locator(".jp-InputArea-editor",
                                                                                has_text=code))
        if cell.count() != 1:
            raise self.fail(f"expected one code cell containing {code!r}, found {cell.count()}")
        return cell

    def running(self, cell) -> bool:
        return "[*]" in normalize(cell.locator(".jp-InputArea-prompt").inner_text())

    def wait_for_image(self, code: str, timeout: float = 600, while_running: bool = False):
        """Wait until the cell containing ``code`` shows an image; with ``while_running``, the cell must still
        be executing when it does. Returns the cell's output text at that moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cell = self.cell(code)
            if cell.locator(".jp-OutputArea-output img").count():
                text = normalize(cell.locator(".jp-Cell-outputWrapper").inner_text())
                if while_running and not self.running(cell):
                    raise self.fail(f"the cell with {code!r} showed its first image only after it finished")
                return text
            errors = self._errors()
            if errors:
                raise self.fail(f"a cell raised while waiting for the image of {code!r}:\n{errors[0][:2000]}")
            self.page.wait_for_timeout(500)
        raise self.fail(f"the cell with {code!r} showed no image within {timeout:.0f} s")

    def wait_until_idle(self, timeout: float = 1800) -> None:
        """Wait until no cell shows [*] any more (Run All finished); fail early on a traceback."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            prompts = self.page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
            if not any("[*]" in t for t in prompts) and self._executed_any():
                return
            errors = self._errors()
            if errors:
                raise self.fail(f"a cell raised:\n{errors[0][:2000]}")
            self.page.wait_for_timeout(1000)
        raise self.fail(f"the notebook was still running after {timeout:.0f} s")

    def cost_table(self) -> str:
        """The text of notebook 06's cost table (the widget below the editor)."""
        table = self.page.locator(".widget-html-content").filter(has_text="activation bytes").last
        return normalize(table.inner_text())

    def screenshot_cell(self, code: str, path: str | Path) -> Path:
        """A screenshot of the cell containing ``code`` (its input and outputs)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cell = self.cell(code)
        cell.scroll_into_view_if_needed()
        self.page.mouse.move(0, 0)
        cell.screenshot(path=str(path))
        return path

    def screenshot_editor(self, path: str | Path) -> Path:
        """A screenshot of the cell that displays the editor (its code and the widget)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cell = self.page.locator(".jp-Cell").filter(has=self.totals_locator).first
        cell.scroll_into_view_if_needed()
        self.page.mouse.move(0, 0)  # no hover highlight in the picture
        cell.screenshot(path=str(path))
        return path


@contextlib.contextmanager
def open_notebook(notebook: str | Path, parameters: dict | None = None, viewport=(1400, 1000),
                  failure_screenshot: Path | None = None, server_timeout: float = 120,
                  page_timeout: float = 120):
    """Start a private JupyterLab on a temporary copy of ``notebook``, open it in headless Chromium and yield
    a
    :class:`LabNotebook`; the browser, kernels and server are stopped and the temporary folders removed
    after."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="labkit-browser-") as tmp:
        tmp = Path(tmp)
        root = tmp / "root"
        root.mkdir()
        name = copy_notebook(notebook, root, parameters).name
        server = LabServer(root, tmp / "jupyter", start_timeout=server_timeout).start()
        try:
            with sync_playwright() as pw:
                context = pw.chromium.launch_persistent_context(
                    str(tmp / "chromium-profile"), executable_path=CHROMIUM, headless=True,
                    args=list(CHROMIUM_ARGS),
                    viewport={"width": viewport[0], "height": viewport[1]}, device_scale_factor=1,
                    timeout=server_timeout * 1000)
                try:
                    page = context.pages[0] if context.pages else context.new_page()
                    page.set_default_timeout(30_000)
                    lab = LabNotebook(page, server, name, failure_screenshot)
                    lab.open(page_timeout)
                    yield lab
                finally:
                    context.close()
        finally:
            server.stop()
            shutil.rmtree(root / ".ipynb_checkpoints", ignore_errors=True)
