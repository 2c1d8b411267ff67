"""Look at a run report the way a person would: `zk0 report` on a run folder, then a headless Chromium
screenshot of the page (Chromium from Debian's packages: ``apt-get install chromium``).

Run: ``python bench/report_screenshot.py RUN_DIR [--out report.png]``. It prints the page and the
screenshot paths and their sizes; open the PNG to see the charts and tables.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("report.png"))
    parser.add_argument("--height", type=int, default=2400, help="window height in pixels (the page is long)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    page = args.run_dir.resolve() / "report.html"
    subprocess.run([str(Path(sys.executable).parent / "zk0"), "report", str(args.run_dir), "--out", str(page)],
                   check=True)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1280,{args.height}", f"--screenshot={args.out.resolve()}", page.as_uri()],
                   check=True, capture_output=True, timeout=300)
    print(f"page={page} page_bytes={page.stat().st_size} screenshot={args.out.resolve()} "
          f"screenshot_bytes={args.out.stat().st_size}")


if __name__ == "__main__":
    main()
