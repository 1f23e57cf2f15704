"""Layer-skip KL on the first 1 and 2 ranking windows against the run's 4: do fewer windows drop the same layers at
every depth? (Issue 36 part 3: "fit on fewer windows where that costs nothing".)

    python bench/skip_windows.py RUN_DIR OUT.json     # RUN_DIR: a `maskprune prune ... --steps 0` with layers searched

For each drop count d (1 to L/2), whether the d layers of lowest skip-KL are the same set as with the run's 4
windows (the shape search's `_keep` also keeps a family's per-layer pattern; this compares the plain ranking).
"""

import json
import sys
import time

import torch

from maskprune.arch import adapter_for
from maskprune.axis_scores import layer_skip_kl, teacher_logits
from maskprune.config import PruneConfig
from maskprune.data import calibration_windows
from maskprune.models import load_model

report = json.load(open(sys.argv[1] + "/maskprune_report.json"))
cfg = PruneConfig.from_dict(report["config"])
loaded = load_model(cfg.model, gguf_file=cfg.gguf_file, dtype=torch.float32, device=torch.device("cpu"))
m = loaded.model
ad = adapter_for(m)
ad.unfuse_(m)
win = calibration_windows(cfg.calib, loaded.tokenizer, seq_len=cfg.seq_len, num_windows=4, config=cfg.calib_config)
full = torch.tensor(report["shape_search"]["layer_skip_kl"])
out = {"model": cfg.model, "full_4": full.tolist()}
for n in (1, 2):
    ref = teacher_logits(m, win[:n], 1, None)
    t = time.time()
    kl = layer_skip_kl(m, ad, win[:n], ref, 1)
    out[f"windows_{n}"] = {"kl": kl.tolist(), "seconds": time.time() - t}
    L = kl.numel()
    same = []
    for drop in range(1, L // 2 + 1):
        a = set(torch.sort(full, stable=True).indices[:drop].tolist())
        b = set(torch.sort(kl, stable=True).indices[:drop].tolist())
        same.append(a == b)
    out[f"windows_{n}"]["same_dropped_sets_for_drops_1_to_L/2"] = same
    print(n, time.time() - t, same, flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
