"""Peak resident memory of one down_proj re-fit (`reconstruct.refit_with_errors`) at a given size, for the code of a
given commit: what the 8B-shaped cut's re-fit peak (issue 35, 4a) is made of. Prints one JSON line.

    python bench/refit_memory.py --rev e485cd5          # the code of that commit (git show), 8B down_proj sizes
    python bench/refit_memory.py --rev HEAD --out 4096 --width 14336 --kept 14077 --threads 2

Random fp32 weights and a float64 Gram of 256 random tokens (its values do not change the memory); the process's
high-water mark (VmHWM) over its resident size before the call: what the fit adds beside the Gram it is handed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 2**20  # GiB
    raise KeyError(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="the commit whose src/maskprune/reconstruct.py is measured")
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--width", type=int, default=14336)
    ap.add_argument("--kept", type=int, default=14077)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    source = subprocess.run(["git", "show", f"{a.rev}:src/maskprune/reconstruct.py"], check=True, text=True,
                            capture_output=True).stdout  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("reconstruct_at_rev", f.name)
    rc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rc)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(a.out, a.width, generator=g) * 0.02
    acts = torch.randn(256, a.width, generator=g, dtype=torch.float64)
    grams = [acts.T @ acts]
    del acts
    kept = torch.sort(torch.randperm(a.width, generator=g)[: a.kept]).values
    base, start = _status("VmRSS"), time.time()
    _, before, after = rc.refit_with_errors(weight, grams, kept, 1e-3)
    print(json.dumps({"rev": a.rev, "out": a.out, "width": a.width, "kept": a.kept, "base_gib": round(base, 3),
                      "peak_gib": round(_status("VmHWM"), 3), "added_gib": round(_status("VmHWM") - base, 3),
                      "seconds": round(time.time() - start, 1), "error_before": before, "error_after": after}))  # fmt: skip
    Path(f.name).unlink()


if __name__ == "__main__":
    sys.exit(main())
