"""Headless Chromium for page tests: find it, install Debian's package when possible, run it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# New headless mode, no sandbox (root in a container), and nothing that phones home.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
INSTALL_TIMEOUT = 900


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome binary on PATH, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        env=env,
        check=False,
    )


def install_chromium() -> str | None:
    """Install Debian's chromium package (root on Debian only); return why not, or None."""
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "not a Debian system (no apt-get)"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install chromium"
    install = ("install", "-y", "--no-install-recommends", "chromium")
    try:
        result = _apt(*install)
        if result.returncode != 0:
            # An old or empty package list is the usual cause: refresh and retry once.
            _apt("update")
            result = _apt(*install)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"apt-get failed: {err}"
    if result.returncode != 0:
        return f"apt-get install chromium failed: {result.stderr.strip()[-500:]}"
    return None


def ensure_chromium() -> tuple[str | None, str]:
    """(binary, "") when Chromium is usable, else (None, the reason it is not)."""
    binary = find_chromium()
    if binary is None:
        problem = install_chromium()
        binary = find_chromium()
        if binary is None:
            return None, problem or "chromium installed but not found on PATH"
    return binary, ""


def run_chromium(
    binary: str, page: str | os.PathLike, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local file with a fresh profile; return the finished process."""
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [binary, *FLAGS, f"--user-data-dir={profile}", *args, url]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(binary: str, page: str | os.PathLike, timeout: float = 120) -> str:
    """The page's DOM as serialised after the load event (scripts have run)."""
    result = run_chromium(binary, page, "--dump-dom", timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"chromium --dump-dom failed: {result.stderr[-2000:]}")
    return result.stdout


def screenshot(
    binary: str,
    page: str | os.PathLike,
    png: str | os.PathLike,
    width: int = 1200,
    height: int = 4000,
    timeout: float = 120,
) -> Path:
    """Save a PNG screenshot of the page's first ``width`` x ``height`` pixels."""
    png = Path(png).resolve()
    result = run_chromium(
        binary, page, f"--screenshot={png}", f"--window-size={width},{height}", timeout=timeout
    )
    if result.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium --screenshot failed: {result.stderr[-2000:]}")
    return png
