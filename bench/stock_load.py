"""An exported checkpoint loads stock: `AutoModelForCausalLM.from_pretrained` of the folder against the same folder
read a module at a time (`maskprune.offload`), logits on one random window (fp32, or bf16 where the model's fp32 copy
would not fit in memory: a 25-layer export of an 8B is 26 GB in fp32). Prints one JSON line.

    /usr/bin/time -v python bench/stock_load.py OUT_DIR [bf16]
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from maskprune.models import load_model


def main() -> None:
    out = sys.argv[1]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2] if len(sys.argv) > 2 else "fp32"]
    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    ids = torch.randint(0, int(model.config.vocab_size), (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    del model
    streamed = load_model(out, offload=True, dtype=dtype).model
    with torch.no_grad():
        read = streamed(input_ids=ids).logits
    print(json.dumps({"folder": out, "stock_from_pretrained": True, "max_abs_diff_vs_streamed":
                      float((stock - read).abs().max()), "max_abs_logit": float(stock.abs().max()),
                      "dtype": str(dtype).removeprefix("torch."),
                      "seconds": round(time.time() - start, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
