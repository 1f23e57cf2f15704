"""Performance of maskprune on this machine, as ratios measured in one run.

1. Step throughput: tokens/s of the mask-learning step on SmolLM2-135M against the bound set by its
   matmul FLOPs (teacher forward + student forward and backward, counted from the shapes) divided
   by this machine's bf16 matmul rate on the model's own GEMM shapes, both measured here.
2. Memory: peak RSS of mask learning vs the same loop without the teacher (fresh processes).
3. Payoff: exported models vs dense in stock transformers: prefill (1 x 512, 8 x 128) and decode
   (128 new tokens, KV cache) tokens/s, against the ideal given by per-token matmul FLOPs; and a
   non-uniform model with the same budget (FFN widths spread over layers) for comparison.
4. Evaluation: WikiText-2 perplexity time vs a bare batched forward loop over the same windows.

    python bench/perf.py --pruned runs/smollm2-135m-s20 runs/smollm2-135m-s50 [--steps 6]

Writes bench/results/<date>-perf.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SECTIONS = ("step", "memory", "payoff", "eval")


def _timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def linear_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every matmul a token goes through: all nn.Linear layers (LM head included)."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def matmul_flops_per_token(model, seq_len: int) -> float:
    """2 * (linear weights) + attention scores and values (4 * T * H * D per layer, causal half)."""
    lin = sum(2 * i * o for i, o in linear_shapes(model))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.num_hidden_layers * 4 * cfg.num_attention_heads * head_dim * seq_len / 2
    return lin + attn


def bf16_matmul_rate(model, tokens: int) -> float:
    """FLOP/s of bf16 matmuls on the model's own GEMM shapes with ``tokens`` rows."""
    shapes = sorted(set(linear_shapes(model)))
    total_flops, total_s = 0.0, 0.0
    for i, o in shapes:
        a = torch.randn(tokens, i, dtype=torch.bfloat16)
        w = torch.randn(o, i, dtype=torch.bfloat16)
        s = _timeit(lambda: torch.nn.functional.linear(a, w), repeat=5)
        count = sum(1 for x in linear_shapes(model) if x == (i, o))
        total_flops += 2 * tokens * i * o * count
        total_s += s * count
    return total_flops / total_s


def step_throughput(
    args, weight_dtype: str = "fp32", dtype: str = "bf16", compile_: bool = False, before: bool = False
) -> dict:
    """Median seconds of the learning step and its distance to the matmul bound. ``before``: the step as
    maskprune ran it until 2026-11-24 (fp32 weights; KL by autograd under checkpointing, see
    :func:`kl_blocked_vs_autograd`; peft casting each LoRA input to fp32), for before/after in one run."""
    from maskprune import load_config
    from maskprune.stages.learned import build_learner

    cfg = load_config(
        overrides=dict(
            steps=args.steps + 2,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            calib_samples=64,
            sparsity=0.5,
            dtype=dtype,
            weight_dtype=weight_dtype,
            compile=compile_,
            mask_init="ones",  # masks at 1, selection frozen at step 0: the default recipe's distillation step
        )
    )
    build = build_learner(cfg)
    model, learner = build.model, build.learner
    tokens = args.batch_size * args.seq_len
    rate = bf16_matmul_rate(model, tokens)
    flops_tok = matmul_flops_per_token(model, args.seq_len)
    restore = lambda: None  # noqa: E731
    if before:
        from peft.tuners.tuners_utils import BaseTunerLayer

        import maskprune.losses as losses_mod

        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = True
        blocked = losses_mod.kl_divergence
        losses_mod.kl_divergence = lambda s, t, direction, chunk_tokens=None: _autograd_kl(s, t, direction)
        restore = lambda: setattr(losses_mod, "kl_divergence", blocked)  # noqa: E731
    model.train()
    t_warm = time.perf_counter()
    learner.step()
    learner.step()  # warm-up (with compile: the teacher and student graphs are compiled here)
    warm_s = time.perf_counter() - t_warm
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        learner.step()
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    restore()
    # teacher forward (2F) + student forward (2F) + student backward to activations (2F); LoRA and
    # mask gradients are negligible next to the frozen weights' activation gradients.
    step_flops = 3 * flops_tok * tokens
    bound_s = step_flops / rate
    return {
        "weight_dtype": weight_dtype,
        "autocast": dtype,
        "compile": compile_,
        "before_2026_11_24": before,
        "first_two_steps_s": warm_s,
        "tokens_per_step": tokens,
        "step_seconds_median": step_s,
        "tokens_per_s": tokens / step_s,
        "bf16_matmul_tflops": rate / 1e12,
        "flops_per_step": step_flops,
        "bound_seconds": bound_s,
        "bound_tokens_per_s": tokens / bound_s,
        "fraction_of_bound": bound_s / step_s,
    }


def _autograd_kl(student: torch.Tensor, teacher: torch.Tensor, direction: str) -> torch.Tensor:
    """maskprune's KL until 2026-11-24: fp32 log-softmax of both sides by autograd, chunks of 512 rows
    under activation checkpointing (the chunk is recomputed in backward)."""
    import torch.nn.functional as Fn
    from torch.utils.checkpoint import checkpoint

    def chunk(s, t):
        log_s, log_t = Fn.log_softmax(s.float(), -1), Fn.log_softmax(t.float(), -1)
        if direction == "student_teacher":
            return (log_s.exp() * (log_s - log_t)).sum()
        return (log_t.exp() * (log_t - log_s)).sum()

    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1]).detach()
    return (
        sum(checkpoint(chunk, s[i : i + 512], t[i : i + 512], use_reentrant=False) for i in range(0, s.shape[0], 512))
        / s.shape[0]
    )


def kl_blocked_vs_autograd(tokens: int, vocab: int = 49152) -> dict:
    """Forward + backward seconds of the learner's KL (``losses.kl_divergence``: row blocks, gradient formed
    in the forward) against the plain autograd definition (fp32 log-softmax of both sides, chunks of 512
    rows under activation checkpointing, maskprune's KL until 2026-11-24), bf16 logits ``[tokens, vocab]``."""
    from maskprune.losses import kl_divergence

    g = torch.Generator().manual_seed(0)
    base = torch.randn(tokens, vocab, generator=g) * 3
    teacher = (base + torch.randn(tokens, vocab, generator=g)).bfloat16()
    out = {"tokens": tokens, "vocab": vocab}
    for name, fn in (
        ("autograd_checkpointed", lambda s, t: _autograd_kl(s, t, "teacher_student")),
        ("blocked", lambda s, t: kl_divergence(s, t, direction="teacher_student")),
    ):

        def run() -> None:
            s = base.bfloat16().requires_grad_(True)
            fn(s, teacher).backward()

        out[f"{name}_s"] = _timeit(run, repeat=5)
    out["speedup"] = out["autograd_checkpointed_s"] / out["blocked_s"]
    return out


_MEM_CHILD = r"""
import resource, sys, torch
def _reset_peak():
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS (Linux)
    return _status("VmRSS")
def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB

from maskprune import load_config
from maskprune.stages.learned import build_learner
cfg = load_config(overrides=dict(steps=10, seq_len=int(sys.argv[2]), batch_size=int(sys.argv[3]), sparsity=0.5,
                                 calib_samples=32, mask_init="ones", weight_dtype="bf16"))
build = build_learner(cfg); model, lrn = build.model, build.learner
model.train()
lrn.step()  # first step allocates the optimizer state; then measure the loop alone
before = _reset_peak()
for _ in range(3):
    lrn.step()
print(before, _status("VmHWM"))
"""


def peak_rss_mb(teacher: bool, seq_len: int, batch: int) -> dict:
    """Peak RSS of three learning steps (the high-water mark reset after loading and the first step, so
    the loading peak is not what is measured), and the RSS just before them, in MB; separate process."""
    code = _MEM_CHILD if teacher else _MEM_CHILD_NO_TEACHER
    out = subprocess.run(
        [sys.executable, "-c", code, "1" if teacher else "0", str(seq_len), str(batch)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    before, peak = (int(x) / 1024 for x in out.stdout.strip().splitlines()[-1].split())
    return {"rss_before_loop_mb": before, "peak_rss_in_loop_mb": peak, "loop_increment_mb": peak - before}


_MEM_CHILD_NO_TEACHER = r"""
import resource, sys, torch
def _reset_peak():
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS (Linux)
    return _status("VmRSS")
def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB

from maskprune import load_config
from maskprune.losses import distillation_loss
from maskprune.stages.learned import build_learner
seq, bs = int(sys.argv[2]), int(sys.argv[3])
cfg = load_config(overrides=dict(seq_len=seq, batch_size=bs, sparsity=0.5, calib_samples=32, mask_init="ones",
                                 weight_dtype="bf16"))
build = build_learner(cfg)  # the model with LoRA and masks; this loop steps it without a teacher
model, masks, w = build.model, build.masks, build.windows
params = list(masks.parameters()) + [p for n, p in model.named_parameters() if "lora_" in n]
opt = torch.optim.AdamW(params, lr=1e-3)
model.train()
before = None
for i in range(4):
    if i == 1:
        before = _reset_peak()
    batch = w[i * bs:(i + 1) * bs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=batch, use_cache=False)
        target = out.logits.detach()  # stands in for the teacher's logits: no teacher pass
        loss = distillation_loss(out.logits, target)["loss"]  # same loss code, no teacher pass
    opt.zero_grad(); loss.backward(); opt.step()
print(before, _status("VmHWM"))
"""


def throughput(model, batch: int, seq: int, new_tokens: int = 0, repeat: int = 1) -> float:
    """Tokens/s of a forward over ``batch x seq`` tokens, or of decoding ``new_tokens`` after it (KV cache;
    the prefill's time taken out); best of ``repeat`` after one warm-up call."""
    ids = torch.randint(100, min(40000, model.config.vocab_size), (batch, seq))
    with torch.no_grad():
        if new_tokens == 0:
            s = _timeit(lambda: model(input_ids=ids, use_cache=False), repeat=repeat)
            return batch * seq / s
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        prefill = _timeit(lambda: model(input_ids=ids, use_cache=False), repeat=repeat)
        s = _timeit(lambda: model.generate(ids, **gen), repeat=repeat)
        return batch * new_tokens / max(s - prefill, 1e-9)


def nonuniform_like(model, widths: list[int]):
    """A copy of ``model`` whose FFN widths per layer are ``widths`` (same total): in memory only,
    since stock configs cannot express it (the point of layer-uniform pruning)."""
    import copy

    m = copy.deepcopy(model)
    for layer, w in zip(m.model.layers, widths):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            setattr(mlp, name, torch.nn.Linear(old.in_features, w, bias=False, dtype=old.weight.dtype))
        old = mlp.down_proj
        mlp.down_proj = torch.nn.Linear(w, old.out_features, bias=False, dtype=old.weight.dtype)
    return m.eval()


def payoff(pruned: list[str]) -> dict:
    from transformers import AutoModelForCausalLM

    from maskprune.models import default_model_dir

    dense = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.bfloat16).eval()
    models = {"dense": dense}
    for p in pruned:
        models[Path(p).name] = AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16).eval()
    # same budget as the last pruned model, FFN widths spread linearly from 0.5x to 1.5x the mean
    last = models[Path(pruned[-1]).name]
    L, mean = last.config.num_hidden_layers, last.config.intermediate_size
    raw = [0.5 + i / (L - 1) for i in range(L)]
    widths = [max(1, round(mean * r)) for r in raw]
    widths[-1] += mean * L - sum(widths)
    models[f"{Path(pruned[-1]).name}-nonuniform"] = nonuniform_like(last, widths)
    # what `--ffn-multiple 64` buys: the same models with the FFN width rounded down to a multiple of 64
    for p in pruned:
        m = models[Path(p).name]
        w = m.config.intermediate_size
        if w % 64 and w > 64:
            models[f"{Path(p).name}-ffn{w // 64 * 64}"] = nonuniform_like(
                m, [w // 64 * 64] * m.config.num_hidden_layers
            )
    return _speedups(models)


def _speedups(models: dict, rounds: int = 3) -> dict:
    """Throughput of each model (prefill 1x512, 8x128, decode 128 tokens), speedup over ``models["dense"]``,
    the ideal speedup from per-token matmul FLOPs, and the fraction of it reached. The models are measured
    in ``rounds`` interleaved rounds and each keeps its best, so a slow spell of a shared machine does not
    land on one model alone."""
    keys = ("prefill_1x512", "prefill_8x128", "decode_1x128")
    rows = {
        name: {
            "params": sum(p.numel() for p in m.parameters()),
            "flops_per_token_512": matmul_flops_per_token(m, 512),
            "flops_per_token_128": matmul_flops_per_token(m, 128),
            **{k: 0.0 for k in keys},
        }
        for name, m in models.items()
    }
    for _ in range(rounds):
        for name, m in models.items():
            r = rows[name]
            r["prefill_1x512"] = max(r["prefill_1x512"], throughput(m, 1, 512, repeat=2))
            r["prefill_8x128"] = max(r["prefill_8x128"], throughput(m, 8, 128, repeat=2))
            r["decode_1x128"] = max(r["decode_1x128"], throughput(m, 1, 16, new_tokens=128))
    d = rows["dense"]
    for r in rows.values():
        r["speedup"] = {k: r[k] / d[k] for k in keys}
        r["ideal"] = {
            "prefill_1x512": d["flops_per_token_512"] / r["flops_per_token_512"],
            "prefill_8x128": d["flops_per_token_128"] / r["flops_per_token_128"],
            "decode_1x128": d["flops_per_token_128"] / r["flops_per_token_128"],
        }
        r["fraction_of_ideal"] = {k: r["speedup"][k] / r["ideal"][k] for k in r["ideal"]}
    return rows


WIDE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=64,
    num_hidden_layers=8,
    vocab_size=32000,
)
"""TinyLlama-1.1B's layer shapes (8 of its 22 layers): where the matmuls, not the per-layer fixed work, are
most of a token's time, as in the 7B-13B models users prune."""


def payoff_wide(sparsities: tuple[float, ...] = (0.2, 0.5)) -> dict:
    """The uniform cut's payoff on a wider shape (random bf16 weights; speed does not depend on the values):
    dense vs the same architecture with the FFN width cut to remove ``sparsity`` of all parameters, the split
    maskprune's learned budget chose on SmolLM2 at 20 and 50 % (FFN channels only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from maskprune.models import default_model_dir

    base = AutoConfig.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    fields = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures")}
    dense = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(base.model_type, **{**fields, **WIDE}), dtype=torch.bfloat16
    ).eval()
    total = sum(p.numel() for p in dense.parameters())
    models = {"dense": dense}
    for sp in sparsities:
        width = WIDE["intermediate_size"] - round(sp * total / (3 * WIDE["hidden_size"] * WIDE["num_hidden_layers"]))
        models[f"ffn{width} (-{sp:.0%})"] = nonuniform_like(dense, [width] * WIDE["num_hidden_layers"])
    return _speedups(models)


def eval_overhead(limit: int) -> dict:
    from maskprune.data import wikitext2_test_text
    from maskprune.evaluate import perplexity, tokenize_windows
    from maskprune.models import load_model

    loaded = load_model("smollm2-135m")
    model = loaded.model
    windows, bos = tokenize_windows(wikitext2_test_text(), loaded.tokenizer, 2048)
    windows = windows[:limit]

    def bare() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(0, windows.shape[0], 2):
                model(input_ids=windows[i : i + 2], use_cache=False)

    def ppl() -> None:
        perplexity(model, windows, batch_size=2, autocast_dtype=torch.bfloat16, progress=False)

    bare(), ppl()  # warm both (allocator, thread pools)
    t_bare, t_ppl = float("inf"), float("inf")
    for _ in range(2):  # interleaved, best of two each: drift on a noisy machine hits both alike
        t_bare = min(t_bare, _timeit(bare, repeat=1, warmup=0))
        t_ppl = min(t_ppl, _timeit(ppl, repeat=1, warmup=0))
    return {
        "windows": int(windows.shape[0]),
        "seq_len": 2048,
        "bare_forward_s": t_bare,
        "perplexity_s": t_ppl,
        "ratio": t_ppl / t_bare,
    }


def _common_bound(res: dict) -> None:
    """Give every step row the same bound: the best bf16 matmul rate measured in this run (each row measures
    it before its own steps; the first measurement of a process often comes out low, and one machine has one
    limit). Each row keeps its own measurement as ``bf16_matmul_tflops_measured``."""
    rows = [r for r in [res.get("step"), *res.get("step_variants", [])] if r]
    if not rows:
        return
    for r in rows:
        r.setdefault("bf16_matmul_tflops_measured", r["bf16_matmul_tflops"])
    rate = max(r["bf16_matmul_tflops_measured"] for r in rows) * 1e12
    for r in rows:
        r["bf16_matmul_tflops"] = rate / 1e12
        r["bound_seconds"] = r["flops_per_step"] / rate
        r["bound_tokens_per_s"] = r["tokens_per_step"] / r["bound_seconds"]
        r["fraction_of_bound"] = r["bound_seconds"] / r["step_seconds_median"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pruned", nargs="*", default=[])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    a = ap.parse_args()
    res: dict = {
        "command": "python bench/perf.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    if "step" not in a.skip:
        res["step"] = step_throughput(a, "bf16", "bf16")  # the default: learning weights in the autocast dtype
        print(json.dumps(res["step"]), flush=True)
        res["step_variants"] = [
            step_throughput(a, "fp32", "bf16", before=True),
            step_throughput(a, "fp32", "bf16"),
            step_throughput(a, "fp32", "fp32"),
            step_throughput(a, "bf16", "bf16", compile_=True),
        ]
        res["kl"] = kl_blocked_vs_autograd(a.batch_size * a.seq_len)
        print(json.dumps(res["kl"]), flush=True)
        print(json.dumps(res["step_variants"]), flush=True)
    if "memory" not in a.skip:
        from maskprune.memory import LLAMA2_7B, estimate_learning_memory, shape_of
        from maskprune.models import load_model

        shape = shape_of(load_model("smollm2-135m").model)
        res["memory"] = []
        for seq, bs in ((a.seq_len, a.batch_size), (512, 8)):  # the default step, and one where activations weigh
            with_t, without = peak_rss_mb(True, seq, bs), peak_rss_mb(False, seq, bs)
            est = estimate_learning_memory(shape, batch_tokens=seq * bs, weight_bytes=2, kl_rows=16)
            res["memory"].append(
                {
                    "seq_len": seq,
                    "batch_size": bs,
                    "with_teacher": with_t,
                    "without_teacher": without,
                    "ratio": with_t["peak_rss_in_loop_mb"] / without["peak_rss_in_loop_mb"],
                    "increment_ratio": with_t["loop_increment_mb"] / max(1e-9, without["loop_increment_mb"]),
                    "accounting_mb": {k: v / 2**20 for k, v in est.items() if k != "teacher_share"},
                    "accounting_teacher_share": est["teacher_share"],
                }
            )
            print(json.dumps(res["memory"][-1]), flush=True)
        est7 = estimate_learning_memory(LLAMA2_7B, batch_tokens=16 * 512, weight_bytes=2)
        res["memory_projection_llama2_7b_one_gpu_gib"] = {
            k: (v / 2**30 if k != "teacher_share" else v) for k, v in est7.items()
        }
    if "payoff" not in a.skip and a.pruned:
        res["payoff"] = payoff(a.pruned)
        print(json.dumps(res["payoff"]), flush=True)
        res["payoff_wide"] = payoff_wide()
        print(json.dumps(res["payoff_wide"]), flush=True)
    if "eval" not in a.skip:
        res["eval"] = eval_overhead(a.eval_windows)
        print(json.dumps(res["eval"]), flush=True)
    date = datetime.date.today().isoformat()
    out = ROOT / "results" / f"{date}-perf.json"
    if a.skip and out.exists():  # a partial rerun updates the day's file instead of replacing it
        old = json.loads(out.read_text())
        if set(a.skip) != set(SECTIONS):  # all skipped: only the md is rewritten
            old.setdefault("partial_reruns", []).append({"command": res["command"], "date": res["date"]})
        res = {**old, **{k: v for k, v in res.items() if k not in ("command", "date")}}
    _common_bound(res)
    out.write_text(json.dumps(res, indent=1))
    lines = [f"# Performance ({res['date']})", "", f"`{res['command']}`", ""]
    lines += [
        f"Partial rerun {r['date']}, its sections replacing the first run's: `{r['command']}`"
        for r in res.get("partial_reruns", [])
    ]
    lines += ["", f"Machine: {res['machine']}", ""]
    if "step" in res:
        s = res["step"]
        lines += [
            "## Mask-learning step",
            "",
            "| tokens/step | step s | tokens/s | bf16 matmul TFLOP/s (best in this run) | bound tokens/s | fraction of bound |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {s['tokens_per_step']} | {s['step_seconds_median']:.2f} | {s['tokens_per_s']:.0f} | "
            f"{s['bf16_matmul_tflops']:.3f} | {s['bound_tokens_per_s']:.0f} | {s['fraction_of_bound']:.2f} |",
            "",
            "| code | weights | autocast | compile | tokens/s | vs default | fraction of bound | first two steps s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for v in [s] + res.get("step_variants", []):
            warm = f"{v['first_two_steps_s']:.0f}" if "first_two_steps_s" in v else "-"
            code = "before 2026-11-24" if v.get("before_2026_11_24") else "now"
            lines.append(
                f"| {code} | {v['weight_dtype']} | {v['autocast']} | {'yes' if v.get('compile') else 'no'} | "
                f"{v['tokens_per_s']:.0f} | {v['tokens_per_s'] / s['tokens_per_s']:.2f}x | "
                f"{v['fraction_of_bound']:.2f} | {warm} |"
            )
        lines.append("")
        if "kl" in res:
            k = res["kl"]
            lines += [
                f"KL forward + backward on bf16 logits {k['tokens']} x {k['vocab']}: blocked with the gradient "
                f"formed in the forward {k['blocked_s']:.3f} s, autograd definition under checkpointing "
                f"{k['autograd_checkpointed_s']:.3f} s ({k['speedup']:.1f}x).",
                "",
            ]
    if "memory" in res:
        lines += [
            "## Memory",
            "",
            "Peak RSS during three learning steps (bf16 learning weights, the default; high-water mark reset after loading and the "
            "first step; separate processes), with the teacher pass vs the same loop without it:",
            "",
            "| tokens/step | RSS before loop MB | peak with teacher MB | peak without MB | ratio | loop increment with / without MB | accounting MB (teacher share) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m in res["memory"]:
            w, wo = m["with_teacher"], m["without_teacher"]
            lines.append(
                f"| {m['seq_len']}x{m['batch_size']} | {w['rss_before_loop_mb']:.0f} | {w['peak_rss_in_loop_mb']:.0f} | "
                f"{wo['peak_rss_in_loop_mb']:.0f} | {m['ratio']:.3f} | {w['loop_increment_mb']:.0f} / "
                f"{wo['loop_increment_mb']:.0f} | {m['accounting_mb']['total']:.0f} "
                f"({100 * m['accounting_teacher_share']:.1f}%) |"
            )
        p7 = res["memory_projection_llama2_7b_one_gpu_gib"]
        lines += [
            "",
            f"Projected for Llama-2-7B on one GPU (bf16 weights, 16 x 512 tokens, same accounting): "
            f"{p7['total']:.1f} GiB, teacher share {100 * p7['teacher_share']:.1f}%.",
            "",
        ]
    if "payoff" in res:
        lines += [
            "## Exported models vs dense (bf16, stock transformers)",
            "",
            "| model | params | prefill 1x512 speedup (ideal) | prefill 8x128 speedup (ideal) | decode speedup (ideal) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for n, r in res["payoff"].items():
            cells = [
                f"{r['speedup'][k]:.2f} ({r['ideal'][k]:.2f})"
                for k in ("prefill_1x512", "prefill_8x128", "decode_1x128")
            ]
            lines.append(f"| {n} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
        lines.append("")
        if "payoff_wide" in res:
            lines += [
                "The same uniform FFN cut on a wider shape (random bf16 weights, TinyLlama-1.1B layer shapes: "
                f"{WIDE}):",
                "",
                "| model | params | prefill 1x512 speedup (ideal) | prefill 8x128 speedup (ideal) | decode speedup (ideal) |",
                "| --- | --- | --- | --- | --- |",
            ]
            for n, r in res["payoff_wide"].items():
                cells = [
                    f"{r['speedup'][k]:.2f} ({r['ideal'][k]:.2f})"
                    for k in ("prefill_1x512", "prefill_8x128", "decode_1x128")
                ]
                lines.append(f"| {n} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
            lines.append("")
    if "eval" in res:
        e = res["eval"]
        lines += [
            "## Evaluation",
            "",
            f"Perplexity over {e['windows']} windows of {e['seq_len']}: {e['perplexity_s']:.1f} s; "
            f"bare forward loop {e['bare_forward_s']:.1f} s; ratio {e['ratio']:.3f}.",
            "",
        ]
    reading = out.with_name(f"{date}-perf-reading.md")  # the hand-written reading, kept across reruns
    if reading.exists():
        lines += [reading.read_text().rstrip(), ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
