"""What `maskprune plan` predicts for the default recipe on public Llama shapes, as the guide's "Does it fit?" table:
the largest phase's peak memory on a 24 GB CPU host and on one 80 GB GPU, with `--streaming auto` (a one-shot cut
that does not fit whole keeps its weights on disk), for the cut alone (`--steps 0`) and for the default run (the
cut, then its distillation, which holds the whole student).

    python bench/plan_table.py [--sparsity 0.2] [--json OUT]

Configs only (written to a temporary folder from the public config.json values below): nothing is downloaded or
loaded; the matmul and read rates are fixed (the table compares memory, not minutes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "rms_norm_eps": 1e-5,
          "hidden_act": "silu", "max_position_embeddings": 131072, "rope_theta": 500000.0, "dtype": "bfloat16",
          "bos_token_id": 128000, "eos_token_id": 128001}  # fmt: skip
SHAPES = {
    "SmolLM2-135M": None,  # the embedded default
    "Llama-3.2-1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),  # fmt: skip
    "Llama-3.2-3B": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),  # fmt: skip
    "Llama-3.1-8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),  # fmt: skip
    "Llama-3.1-70B": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),  # fmt: skip
}


def main() -> None:
    from maskprune.config import load_config
    from maskprune.stages.plan import model_facts, plan_run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            spec = "smollm2-135m"
            if shape is not None:
                folder = Path(tmp) / name
                folder.mkdir()
                (folder / "config.json").write_text(json.dumps({**_LLAMA, **shape}))
                spec = str(folder)
            facts = model_facts(spec)
            row = {"model": name, "params": facts.params}
            for where, device, memory, host in (
                ("cpu_24gb", torch.device("cpu"), 24 * 10**9, None),
                ("gpu_80gb", torch.device("cuda"), 80 * 10**9, 256 * 2**30),
            ):
                for run, steps in (("cut", 0), ("default", None)):
                    values = {"model": spec, "sparsity": args.sparsity, "streaming": "auto"}
                    values.update({"steps": steps} if steps is not None else {})
                    cfg = load_config(None, values)
                    plan = plan_run(cfg, facts, device=device, max_memory=memory, rate=1e11, host_memory=host)
                    peak = max(plan.over(), key=lambda ph: ph.peak_bytes, default=plan.peak)
                    row[f"{where}_{run}"] = {
                        "fits": plan.fits,
                        "streamed": plan.streamed,
                        "largest_phase": peak.name,
                        "peak_gib": round(peak.peak_bytes / 2**30, 1),
                    }
            rows.append(row)
    print("| model | cut (`--steps 0`), 24 GB CPU | default (cut + distillation), 24 GB CPU | cut, one 80 GB GPU | "
          "default, one 80 GB GPU |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        cells = []
        for key in ("cpu_24gb_cut", "cpu_24gb_default", "gpu_80gb_cut", "gpu_80gb_default"):
            c = r[key]
            text = f"{c['peak_gib']} ({c['largest_phase']}{', streamed' if c['streamed'] else ''})"
            cells.append(text if c["fits"] else f"does not fit: {text}")
        print(f"| {r['model']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"sparsity": args.sparsity, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
