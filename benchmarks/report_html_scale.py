"""How ``report.html`` scales with the number of records: its size, the report command's time,
and how long headless Chromium takes to load the page and draw its table and Pareto view.

    python benchmarks/report_html_scale.py                 # 300 and 3,000 records
    python benchmarks/report_html_scale.py --records 10000

The records are copies of the committed ``results/llm`` records, each with its own seed, config
hash and run id (so that none is taken for a re-run of another); they go to a temporary folder.
For each size: the seconds of ``peftbench.report.build`` (one call), the size of ``report.html``
(MB, 10^6 bytes), and, where Debian's chromium is installed, the wall seconds of one
``chromium --headless --dump-dom`` of the page, with a check that the table shows every record
and that plotly drew the Pareto view.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peftbench import report  # noqa: E402

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def make_records(folder: Path, n: int) -> None:
    """``n`` records in ``folder``: the committed LLM records in turn, each given its own seed."""
    source = [json.loads(p.read_text()) for p in sorted((REPO / "results" / "llm").glob("*.json"))]
    folder.mkdir(parents=True)
    for i in range(n):
        rec = copy.deepcopy(source[i % len(source)])
        rec["config"]["seed"] = 1000 + i
        chash = hashlib.sha256(str(i).encode()).hexdigest()[:10]
        stamp = f"20261201T{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}{i:06d}"
        rec["config_hash"] = chash
        rec["run_id"] = f"{stamp}-{rec['method']}-{rec['model']}-{rec['task']}-{chash}"
        (folder / f"{rec['run_id']}.json").write_text(json.dumps(rec))


def browse(page: Path, profile: Path) -> tuple[float, str]:
    """Wall seconds of one headless load of ``page`` (scripts run), and the DOM it left."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium is not None
    t0 = time.perf_counter()
    done = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return time.perf_counter() - t0, done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, nargs="+", default=[300, 3000])
    a = p.parse_args()
    has_browser = (shutil.which("chromium") or shutil.which("chromium-browser")) is not None
    print(f"{'records':>8} {'build s':>8} {'html MB':>8} {'chromium s':>11}  drawn")
    for n in a.records:
        with tempfile.TemporaryDirectory() as tmp:
            runs, out = Path(tmp, "runs"), Path(tmp, "report")
            make_records(runs, n)
            t0 = time.perf_counter()
            report.build([str(runs)], out)
            build_s = time.perf_counter() - t0
            size = (out / "report.html").stat().st_size / 1e6
            if not has_browser:
                print(f"{n:>8} {build_s:>8.1f} {size:>8.1f} {'-':>11}  (no chromium)")
                continue
            load_s, dom = browse(out / "report.html", Path(tmp, "profile"))
            shown = re.search(r"(\d+) of (\d+) rows", dom)
            drawn = shown is not None and shown.group(1) == str(n) and 'class="main-svg"' in dom
            print(f"{n:>8} {build_s:>8.1f} {size:>8.1f} {load_s:>11.1f}  {'yes' if drawn else 'NO'}")


if __name__ == "__main__":
    main()
