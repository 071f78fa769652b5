"""Open an eval report in a real headless browser: every image loads, and a screenshot to look at.

The report marks on load how many images it has and how many failed (``data-images`` /
``data-broken`` on its body); Chromium's DOM after load tells them, and its screenshot shows the page.
Run: ``.venv/bin/python bench/report_check.py EVAL_FOLDER [--screenshot FILE]`` (needs Debian's
``chromium``: ``apt-get install chromium``). Exit 1 when an image is broken or there is none.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--allow-file-access-from-files", "--virtual-time-budget=10000"]


def chromium(*args: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("no chromium on this machine: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a pararl eval output folder (holds report.html)")
    parser.add_argument("--screenshot", default=None, help="where to write the PNG (default: FOLDER/report.png)")
    args = parser.parse_args()
    page = (Path(args.folder) / "report.html").resolve()
    if not page.is_file():
        raise SystemExit(f"{page} does not exist")
    dom = chromium("--dump-dom", page.as_uri())
    images = re.search(r'data-images="(\d+)"', dom)
    broken = re.search(r'data-broken="(\d+)"', dom)
    if not images or not broken:
        print("the report's load script did not run")
        return 1
    shot = Path(args.screenshot or Path(args.folder) / "report.png").resolve()
    chromium(f"--screenshot={shot}", "--window-size=1400,1100", page.as_uri())
    n, bad = int(images.group(1)), int(broken.group(1))
    print(f"{page}: {n - bad}/{n} images loaded; screenshot {shot}")
    return 0 if n and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
