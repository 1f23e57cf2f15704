"""Pruned SmolLM2 as GGUF in llama.cpp: round trip, perplexity and speed against the dense GGUF.

Every model goes out through ``maskprune export-gguf`` (llama.cpp's converter, and its quantizer for the
k-quants) and is run by llama.cpp itself (llama-cpp-python, :mod:`maskprune.llamacpp`): WikiText-2 ppl@2048
on llama.cpp's logits over the same token windows as maskprune's own evaluation of the HF checkpoint (first
16k tokens), greedy generation, and prefill / decode speed, all models measured one after another in this one
run with the same threads.

    python bench/llamacpp.py --models dense=smollm2-135m s20=runs/quality/q-maskprune-seed0-s20 \
        s50=runs/quality/q-maskprune-seed0-s50 --types f16,q8_0,q4_k_m --threads 2 \
        --out bench/results/2026-11-30-llamacpp
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

TOLERANCE_F16 = 0.01  # |ppl(llama.cpp, f16) / ppl(HF checkpoint) - 1| allowed: f16 rounding moves ppl by far less


def _hf_folder(spec: str) -> Path:
    """An HF checkpoint folder for ``spec`` (the embedded alias resolves to its dequantized cache folder)."""
    from maskprune.models import load_model

    if Path(spec).is_dir():
        return Path(spec)
    loaded = load_model(spec)
    return Path(loaded.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="label=model (a folder or smollm2-135m)")
    ap.add_argument("--types", default="f16,q8_0,q4_k_m")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--work", default="runs/llamacpp")
    ap.add_argument("--out", required=True, help="results prefix: <out>.json and <out>.md")
    ap.add_argument("--no-speed", action="store_true", help="conversions and perplexity only; speed in a later run")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maskprune import llamacpp
    from maskprune.data import wikitext2_test_text
    from maskprune.evaluate import perplexity, tokenize_windows
    from maskprune.gguf_export import LLAMA_CPP_PYTHON, check_logits, export_gguf

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    types = a.types.split(",")
    rows, text = [], wikitext2_test_text("default")
    cache_path = work / "rows.json"  # finished measurements: a later run (the speed, on a quiet machine) adds to them
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    prompt = "The capital of France is"
    for item in a.models:
        label, spec = item.split("=", 1)
        folder = _hf_folder(spec)
        tok = AutoTokenizer.from_pretrained(folder)
        windows, _ = tokenize_windows(text, tok, a.seq_len)
        windows = windows[: max(1, a.ppl_tokens // a.seq_len)]
        hf_ppl = params = None
        for t in types:
            path = work / f"{label}-{t}.gguf"
            if not path.exists():
                t0 = time.perf_counter()
                export_gguf(folder, path, gguf_type=t)
                print(f"{label} {t}: written in {time.perf_counter() - t0:.0f} s", flush=True)
            row = cache.get(f"{label}-{t}")
            if row is None:
                if hf_ppl is None:
                    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                    hf_ppl = perplexity(hf, windows, batch_size=1, progress=False).ppl
                    params = sum(p.numel() for p in hf.parameters())
                    del hf
                row = {"model": label, "source": str(spec), "type": t, "params": params}
                row.update(bytes=path.stat().st_size, hf_ppl=hf_ppl)
                if t == "f16":  # transformers' own GGUF reader against the checkpoint
                    diff, ref = check_logits(folder, path, windows[:1, :128])
                    row["transformers_logits_max_abs_diff"], row["max_abs_logit"] = diff, ref
                ppl = llamacpp.perplexity(path, windows, threads=a.threads)
                row["llamacpp_ppl"], row["ppl_seconds"] = ppl["ppl"], ppl["seconds"]
                row["ppl_ratio"] = ppl["ppl"] / hf_ppl
                row["generation"] = llamacpp.generate(path, prompt, max_tokens=24, threads=a.threads)
            if not a.no_speed and "decode_tokens_per_s" not in row:
                row.update(llamacpp.speed(path, threads=a.threads).to_dict())
            cache[f"{label}-{t}"] = row
            cache_path.write_text(json.dumps(cache, indent=1))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "generation"}), flush=True)
    if a.no_speed:
        print("conversions and perplexity done; run again without --no-speed for the speed (a quiet machine)")
        return
    dense = {r["type"]: r for r in rows if r["model"] == rows[0]["model"]}
    for r in rows:
        d = dense.get(r["type"])
        if d:
            r["prefill_speedup"] = r["prefill_tokens_per_s"] / d["prefill_tokens_per_s"]
            r["decode_speedup"] = r["decode_tokens_per_s"] / d["decode_tokens_per_s"]
    f16_ok = all(abs(r["ppl_ratio"] - 1) <= TOLERANCE_F16 for r in rows if r["type"] == "f16")
    import llama_cpp

    out = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor(),
        },
        "llama_cpp_python": llama_cpp.__version__,
        "pinned": LLAMA_CPP_PYTHON,
        "threads": a.threads,
        "protocol": f"WikiText-2 raw test, first {len(windows)} windows of {a.seq_len} tokens, every token after the "
        "first of a window scored, the same token ids for the HF checkpoint (maskprune eval) and llama.cpp's logits",
        "f16_tolerance": TOLERANCE_F16,
        "f16_within_tolerance": f16_ok,
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"# Pruned SmolLM2 in llama.cpp ({out['date']})",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {out['machine']}; llama-cpp-python {out['llama_cpp_python']}, {a.threads} threads.  ",
        f"Perplexity protocol: {out['protocol']}. f16 within {TOLERANCE_F16:.0%} of the HF checkpoint: {f16_ok}.",
        "",
        "| model | type | params | GGUF MB | ppl HF | ppl llama.cpp | ratio | prefill tok/s | decode tok/s | prefill x dense | decode x dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['type']} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e6:.1f} | {r['hf_ppl']:.2f} | "
            f"{r['llamacpp_ppl']:.2f} | {r['ppl_ratio']:.4f} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r.get('prefill_speedup', float('nan')):.2f} | "
            f"{r.get('decode_speedup', float('nan')):.2f} |"
        )
    lines += ["", f"Greedy continuations of {prompt!r} by llama.cpp:", ""]
    lines += [f"- {r['model']} {r['type']}: {r['generation']!r}" for r in rows]
    Path(f"{a.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
