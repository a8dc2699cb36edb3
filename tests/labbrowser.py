"""JupyterLab in headless Chromium for the browser tests.

A JupyterLab server of its own (127.0.0.1, a random port, a token, every
Jupyter/IPython directory in a temporary folder, so nothing of the user's is
read or written), a Chromium of its own (a fresh profile, no network beyond
127.0.0.1), and a notebook page read the way a person reads it: prompts,
outputs, widgets.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from waiting import wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver (as root), and pip install -e '.[test]' (selenium, jupyterlab)"
# as root on a closed network: no sandbox, no GPU, and none of the background connections
# (component updates, sync, QUIC) that the network would refuse
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
    "--force-device-scale-factor=1",
)
# settings a new user would otherwise answer popups for
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


def missing_parts() -> list[str]:
    """What the browser tests need and this machine lacks."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    for module in ("selenium", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module}")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server serving ``root``, with its config, data and runtime dirs under ``home``."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.log = home / "jupyterlab.log"

    def env(self) -> dict[str, str]:
        dirs = {
            "JUPYTER_CONFIG_DIR": "config",
            "JUPYTER_DATA_DIR": "data",
            "JUPYTER_RUNTIME_DIR": "runtime",
            "JUPYTERLAB_SETTINGS_DIR": "settings",
            "JUPYTERLAB_WORKSPACES_DIR": "workspaces",
            "IPYTHONDIR": "ipython",
            "MPLCONFIGDIR": "matplotlib",
        }
        env = {**os.environ, **{k: str(self.home / v) for k, v in dirs.items()}}
        env.pop("JUPYTER_PATH", None)
        return env

    def start(self) -> None:
        """Start the server (``wait_ready`` waits for it)."""
        for name, values in LAB_SETTINGS.items():
            path = self.home / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
        ] + (["--allow-root"] if os.geteuid() == 0 else [])
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root)

    def wait_ready(self, timeout: float = 90) -> None:
        """Wait until the server's API answers with the token."""
        wait_for(self._answers, timeout, f"JupyterLab to answer on port {self.port} (log: {self.log})", every=0.25)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url("api/status"), timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def stop(self) -> None:
        """Shut the server down with its kernels; kill whatever of its process tree is left."""
        if self.proc is None:
            return
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        try:
            urllib.request.urlopen(urllib.request.Request(self.url("api/shutdown"), method="POST"), timeout=10).close()
            self.proc.wait(30)
        except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)
        self.proc = None


def chromium(profile: Path):
    """Headless Chromium driven by Debian's chromedriver, with a fresh profile in ``profile``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# One cell as a person sees it: its prompt ([ ]:, [*]:, [3]:), the text of its outputs,
# the error and stderr outputs, and its images (the src of each loaded one).
_CELL_JS = """
const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[arguments[0]];
const outputs = [...cell.querySelectorAll('.jp-OutputArea-output')];
return {
  prompt: cell.querySelector('.jp-InputPrompt').textContent.trim(),
  text: outputs.map(o => o.innerText).join('\\n'),
  errors: outputs.filter(o => o.matches('[data-mime-type="application/vnd.jupyter.stderr"]')).map(o => o.innerText),
  images: [...cell.querySelectorAll('.jp-OutputArea-output img')].filter(i => i.complete && i.naturalWidth > 0).map(i => i.src),
};
"""


class NotebookPage:
    """The notebook open in JupyterLab; cells are found by the start of their source."""

    def __init__(self, driver, sources: list[str], artifacts: Path):
        self.driver, self.sources, self.artifacts = driver, sources, artifacts

    def open(self, url: str, timeout: float = 90) -> None:
        """Load JupyterLab at ``url`` and wait for every cell and an idle kernel."""
        self.driver.get(url)
        count = len(self.sources)
        wait_for(
            lambda: (
                self.driver.execute_script("return document.querySelectorAll('.jp-Notebook .jp-Cell').length") == count
            ),
            timeout,
            f"the notebook's {count} cells",
        )
        wait_for(
            lambda: self.driver.execute_script(
                "const s = document.querySelector('.jp-Notebook-ExecutionIndicator');"
                "return s && s.getAttribute('data-status') === 'idle';"
            ),
            timeout,
            "an idle kernel",
        )

    def index(self, start: str) -> int:
        """The index of the cell whose source starts with ``start``."""
        return next(i for i, s in enumerate(self.sources) if s.startswith(start))

    def cell(self, i: int):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[i]

    def read(self, i: int) -> dict:
        """Cell ``i`` now: prompt, output text, errors (error and stderr outputs), loaded images."""
        return self.driver.execute_script(_CELL_JS, i)

    def run(self, i: int) -> None:
        """Select cell ``i`` (a click on its prompt) and press Ctrl+Enter, as a person runs one cell."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.cell(i).find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()
        ActionChains(self.driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()

    def ran(self, i: int) -> dict | None:
        """Cell ``i``'s state once its prompt shows an execution count, else None."""
        state = self.read(i)
        return state if state["prompt"].strip("[]:").isdigit() else None

    def run_and_wait(self, i: int, timeout: float) -> dict:
        self.run(i)
        return wait_for(lambda: self.ran(i), timeout, f"cell {i} ({self.sources[i].splitlines()[0]!r}) to finish")

    def save(self, name: str) -> list[Path]:
        """A screenshot and the HTML of the page, for a failure; returns their paths."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        png, page = self.artifacts / f"{name}.png", self.artifacts / f"{name}.html"
        self.driver.save_screenshot(str(png))
        page.write_text(self.driver.page_source)
        return [png, page]

    def screenshot(self, element, name: str, docs: Path | None = None) -> Path:
        """A PNG of one element (a widget) in the artifacts dir, and copied into ``docs`` if given."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        element.screenshot(str(path))
        _trim_right(path)
        if docs is not None:
            docs.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, docs / path.name)
        return path


def _trim_right(png: Path, margin: int = 8) -> None:
    """Cut the empty page background right of an element's content (widgets span the whole output width)."""
    from PIL import Image, ImageChops

    image = Image.open(png).convert("RGB")
    background = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    box = ImageChops.difference(image, background).getbbox()
    if box is not None and box[2] + margin < image.width:
        image.crop((0, 0, box[2] + margin, image.height)).save(png, optimize=True)
