"""Perplexity as docs/method.md ("Evaluation") defines it.

The text is tokenized once (the tokenizer's own special-token handling, recorded as ``bos``), cut
into non-overlapping windows of ``seq_len`` tokens with the remainder dropped, and
``ppl = exp(mean NLL)`` over every predicted token (``seq_len - 1`` per window).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .losses import summed_nll
from .offload import home_device

__all__ = ["PerplexityResult", "tokenize_windows", "perplexity", "evaluate_model", "evaluate_models", "format_table"]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    seq_len: int
    windows: int
    total_windows: int
    tokens_scored: int
    bos: str
    dtype: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_windows(text: str, tokenizer, seq_len: int) -> tuple[torch.Tensor, str]:
    """``([n, seq_len] long, bos description)``; remainder tokens are dropped."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]  # [N]
    bos_id = tokenizer.bos_token_id
    bos = (
        "prepended once at the start of the text"
        if (bos_id is not None and len(ids) and int(ids[0]) == bos_id)
        else "none added"
    )
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len), bos  # [n, seq_len]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    max_windows: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    bos: str = "",
    progress: bool = True,
    desc: str = "ppl",
    chunk_tokens: int = 1024,
    execution=None,
) -> PerplexityResult:
    """exp(mean token NLL) of ``model`` over ``windows`` ``[n, seq_len]`` (first ``max_windows``).

    The output head and the cross-entropy run ``chunk_tokens`` positions at a time on the decoder's
    hidden states (:func:`_window_nll`), so no full ``[b, T, V]`` logits tensor, let alone an fp32
    copy of it, is ever built. ``execution``: a streamed :class:`maskprune.passes.Execution` runs the
    decoder one layer at a time over every window (default: the model's own forward, batch by batch).
    """
    total = windows.shape[0]
    if total == 0:
        raise ValueError("no evaluation window: the text is shorter than seq_len")
    use = windows[:max_windows] if max_windows else windows
    device = home_device(model)
    nll_sum, count = 0.0, 0
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if execution is not None and execution.streamed:  # the decoder layer by layer over every window
            nll_sum = _streamed_nll(model, use, batch_size, execution, autocast_dtype, chunk_tokens)
            count = use[:, 1:].numel()
        else:
            for i in tqdm(range(0, use.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
                batch = use[i : i + batch_size].to(device)  # [b, T]
                on = autocast_dtype is not None
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=on):
                    nll_sum += float(_window_nll(model, batch, chunk_tokens))
                count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    nll = nll_sum / count
    dtype = str(autocast_dtype or next(model.parameters()).dtype).replace("torch.", "")
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        seq_len=int(use.shape[1]),
        windows=int(use.shape[0]),
        total_windows=int(total),
        tokens_scored=count,
        bos=bos,
        dtype=dtype,
        seconds=time.perf_counter() - start,
    )


def _split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, output head)`` of a plain causal LM whose logits are ``head(decoder(x))``, or None
    when the model post-processes its logits (soft-capping, scaling) or does not expose the parts."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_dec is None or get_head is None:
        return None
    try:
        decoder, head = get_dec(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def _window_nll(model: torch.nn.Module, batch: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Summed next-token NLL of ``batch`` ``[b, T]``: decoder once, then head + cross-entropy in chunks
    of ``chunk_tokens`` positions (fp32 only per chunk). Falls back to full logits when the model's
    head cannot be separated."""
    parts = _split_head(model)
    targets = batch[:, 1:]  # [b, T-1]
    if parts is None:
        logits = model(input_ids=batch, use_cache=False).logits  # [b, T, V]
        return summed_nll(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    decoder, head = parts
    return _chunked_nll(head, decoder(input_ids=batch, use_cache=False).last_hidden_state, targets, chunk_tokens)


def _chunked_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int):
    """Summed NLL of ``targets`` ``[b, T-1]`` from the final hidden states ``[b, T, H]``, the head applied
    ``chunk_tokens`` positions at a time."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [b*(T-1), H]
    flat = targets.reshape(-1).to(hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[start : start + chunk_tokens])  # [n, V]
        total = total + summed_nll(logits, flat[start : start + chunk_tokens])
    return total


def _streamed_nll(model, windows, batch_size: int, execution, autocast, chunk_tokens: int) -> float:
    """Summed next-token NLL of ``windows`` with the decoder run layer by layer (``execution``, streamed)."""
    from .arch import adapter_for

    adapter = adapter_for(model)
    parts = _split_head(model)
    total = 0.0
    ctx = torch.autocast(execution.device.type, dtype=autocast or torch.float32, enabled=autocast is not None)
    if parts is None:  # the model post-processes its logits: its own head on the streamed hidden states
        for j, logits in execution.logits(model, adapter, windows, batch_size, autocast=autocast):
            targets = windows[j * batch_size : (j + 1) * batch_size, 1:].to(logits.device)
            total += float(summed_nll(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1)))
        return total
    _, head = parts
    for j, hidden in execution.hidden_states(model, adapter, windows, batch_size, autocast=autocast):
        with ctx:
            total += float(_chunked_nll(head, hidden, windows[j * batch_size : (j + 1) * batch_size, 1:], chunk_tokens))
    return total


# ---- the full protocol: perplexity at several window lengths + zero-shot tasks --------------------
def _paper_columns() -> tuple[tuple[str, str], ...]:
    from .zeroshot import PAPER_TASKS, TASK_NAMES

    return tuple((t, TASK_NAMES[t]) for t in PAPER_TASKS)


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    *,
    seq_lens: list[int],
    ppl_data: str = "default",
    tasks: list[str] | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    ppl_tokens: int | None = None,
) -> dict:
    """Perplexity (WikiText-2 raw test) at every ``seq_len`` and zero-shot ``tasks`` via lm-eval (one protocol
    record per length, hence the length).

    ``limit`` caps both the perplexity windows and the examples per task (quick looks only).
    ``ppl_tokens`` instead scores the first ``ppl_tokens`` tokens of the text at every window length
    (``ppl_tokens // seq_len`` windows), so every length sees the same text.
    """
    from .data import wikitext2_test_text

    out: dict = {
        "params": sum(p.numel() for p in model.parameters()),
        "shape": {
            k: getattr(model.config, k, None)
            for k in (
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "intermediate_size",
                "hidden_size",
            )
        },
        "perplexity": {},
        "zeroshot": None,
    }
    if seq_lens:
        text = wikitext2_test_text(ppl_data)
        out["perplexity_protocol"] = {
            "data": f"WikiText-2 raw test ({ppl_data})",
            "join": "rows joined with \\n\\n",
            "windows": "non-overlapping, remainder dropped",
            "metric": "exp(mean token NLL)",
        }
        for n in seq_lens:
            windows, bos = tokenize_windows(text, tokenizer, n)
            cap = max(1, ppl_tokens // n) if ppl_tokens else limit
            out["perplexity"][str(n)] = perplexity(
                model,
                windows,
                batch_size=max(1, batch_size * 512 // n),
                max_windows=cap,
                autocast_dtype=autocast_dtype,
                bos=bos,
                progress=progress,
                desc=f"wikitext2@{n}",
            ).to_dict()
    if tasks:
        from .zeroshot import run_zeroshot

        out["zeroshot"] = run_zeroshot(
            model, tokenizer, tasks, data_dir=data_dir, limit=limit, batch_size=batch_size, progress=progress
        )
    return out


def format_table(results: dict[str, dict], dense_key: str | None = None) -> str:
    """The paper's table layout (markdown) for one or more evaluated models; with ``dense_key``,
    a row of the share of the dense model's score that each other model retains."""
    ppl_lens = sorted({int(k) for r in results.values() for k in r.get("perplexity", {})}, reverse=True)
    tasks = [
        (t, name)
        for t, name in _paper_columns()
        if any((r.get("zeroshot") or {}).get("tasks", {}).get(t) for r in results.values())
    ]
    head = ["model", "params"] + [f"WikiText2@{n}" for n in ppl_lens] + [name for _, name in tasks]
    if tasks:
        head.append("Avg")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cells(r: dict) -> list[float | None]:
        vals: list[float | None] = [r.get("perplexity", {}).get(str(n), {}).get("ppl") for n in ppl_lens]
        zs = (r.get("zeroshot") or {}).get("tasks", {})
        for t, _ in tasks:
            e = zs.get(t)
            vals.append(100 * e[e["average_uses"]] if e and e.get(e["average_uses"]) is not None else None)
        if tasks:
            av = (r.get("zeroshot") or {}).get("average")
            vals.append(100 * av if av is not None else None)
        return vals

    for name, r in results.items():
        lines.append(
            "| "
            + " | ".join([name, f"{r['params'] / 1e6:.1f}M"] + [f"{v:.2f}" if v is not None else "-" for v in cells(r)])
            + " |"
        )
    if dense_key and dense_key in results:
        base = cells(results[dense_key])
        for name, r in results.items():
            if name == dense_key:
                continue
            share = []
            for i, (b, v) in enumerate(zip(base, cells(r))):
                if b is None or v is None:
                    share.append("-")
                elif i < len(ppl_lens):
                    share.append(f"{b / v:.0%}")  # perplexity: lower is better, dense / pruned
                else:
                    share.append(f"{v / b:.0%}")
            lines.append(
                "| "
                + " | ".join([f"{name} / dense retained", f"{r['params'] / results[dense_key]['params']:.0%}"] + share)
                + " |"
            )
    return "\n".join(lines)


def evaluate_models(
    models: list[str],
    *,
    compare: bool = False,
    seq_lens: list[int] = (2048, 128),
    ppl_data: str = "default",
    ppl_tokens: int | None = None,
    tasks: list[str] = (),
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    dtype: str = "fp32",
    device: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """Perplexity and zero-shot accuracy of every model in ``models`` (folders, hub ids, GGUF files, or
    ``smollm2-135m``), one loaded at a time. ``compare``: the first is the dense reference and the table shows
    the share of it the others retain. Returns the results (date, machine, protocol, per-model results and
    the markdown ``table``)."""
    import datetime

    from .dtypes import autocast_dtype
    from .errors import MaskPruneError
    from .models import load_model
    from .outputs import machine_info, resolve_device
    from .zeroshot import check_sources, resolve_tasks

    if not models:
        raise MaskPruneError("no model to evaluate", expected="maskprune eval MODEL or --compare DENSE PRUNED")
    if ppl_tokens is not None and ppl_tokens < 1:
        raise MaskPruneError(f"--ppl-tokens must be a positive token count, found {ppl_tokens}")
    tasks = resolve_tasks(tasks) if tasks else []
    check_sources(tasks, data_dir)
    dev = resolve_device(device)
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(dev),
        "dtype": dtype,
        "limit": limit,
        "ppl_tokens": ppl_tokens,
        "models": {},
    }
    for spec in models:
        loaded = load_model(spec, trust_remote_code=trust_remote_code, device=dev)
        _check_context(spec, loaded.model, seq_lens)
        results["models"][spec] = evaluate_model(
            loaded.model,
            loaded.tokenizer,
            seq_lens=list(seq_lens),
            ppl_data=ppl_data,
            tasks=tasks,
            data_dir=data_dir,
            limit=limit,
            batch_size=batch_size,
            autocast_dtype=autocast_dtype(dtype),
            progress=progress,
            ppl_tokens=ppl_tokens,
        )
        del loaded
    results["table"] = format_table(results["models"], dense_key=models[0] if compare else None)
    return results


def _check_context(spec: str, model, seq_lens) -> None:
    """Refuse perplexity windows longer than the model's context (they would be scored past its positions)."""
    from .errors import MaskPruneError

    max_pos = getattr(model.config, "max_position_embeddings", None)
    too_long = [n for n in seq_lens if max_pos is not None and n > max_pos]
    if too_long:
        raise MaskPruneError(
            f"--seq-len {','.join(map(str, too_long))} is above the context of {spec}",
            expected=f"at most max_position_embeddings = {max_pos}",
            fix=f"lower --seq-len (e.g. {min(max_pos, 2048)})",
        )
