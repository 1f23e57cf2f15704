"""The plan before a run: for each phase of ``maskprune prune``, its peak memory, its FLOPs and its time at a rate
measured on this machine, from the model's config alone (the model is built on PyTorch's meta device: shapes, no
weights), and what to switch on where it does not fit (``maskprune plan``; ``prune`` runs the same plan first and
refuses a run that cannot fit, before any heavy work).

Memory is the whole process's peak resident set (host) per phase, as :class:`maskprune.outputs.Phases` measures it,
or the device's peak allocation on a GPU run. Each phase's peak is the sum of named components (``parts``), each a
formula of the shape and the settings that follows what the code holds at that moment (the comments say which
code). ``RUNTIME_BYTES``, the process's resident size with torch and transformers loaded and nothing else, and the
time efficiency were measured (bench/results/2026-12-07-plan.md); everything else is predicted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from ..config import PruneConfig, cut_first_config
from ..memory import ModelShape, format_bytes, parse_bytes

__all__ = ["Phase", "RunPlan", "ModelFacts", "model_facts", "plan_run", "available_memory", "matmul_rate"]

log = logging.getLogger(__name__)

RUNTIME_BYTES = 420 * 2**20
"""Resident size of a maskprune process with torch, transformers and the tokenizer loaded, before any weight
(measured: VmRSS with maskprune imported and the tokenizer loaded, 2-core AMD EPYC, torch 2.13 CPU,
transformers 5.25)."""

EFFICIENCY = 0.6
"""Share of the measured matmul rate a whole pass reaches (attention, norms, small batches, Python): measured on
the default's cut of SmolLM2-135M (bench/results/2026-12-07-plan.md)."""


@dataclasses.dataclass(frozen=True)
class ModelFacts(ModelShape):
    """What the plan needs of a model, read from its config (built on the meta device): its shape and more."""

    name: str = ""
    model_type: str = ""
    tied: bool = False
    layer_params: int = 0
    file_bytes: int | None = None  # the checkpoint's weight files on disk, where local
    max_positions: int | None = None
    folder: str | None = None  # the local safetensors checkpoint, where there is one (the read rate is measured on it)
    source_bytes: int = 2  # bytes of a weight in the checkpoint the run reads (a GGUF's dequantized one: fp32)
    config: object = dataclasses.field(default=None, repr=False, compare=False)  # the model's config
    meta: object = dataclasses.field(default=None, repr=False, compare=False)  # the model on the meta device

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def forward_flops(self, tokens: int, seq_len: int, *, head: bool = True, layers: int | None = None) -> float:
        """FLOPs of a forward over ``tokens`` in windows of ``seq_len``: 2 per weight and token through the layers
        (and the LM head), plus causal attention (QK^T and AV: 2 * 2 * seq_len / 2 * heads * head_dim a layer)."""
        n = self.layers if layers is None else layers
        attn = 2 * seq_len * self.heads * self.head_dim
        per_token = n * (2 * self.layer_params + attn) + (2 * self.vocab * self.hidden if head else 0)
        return float(per_token * tokens)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a run: peak bytes (with the components that make it), FLOPs and seconds."""

    name: str
    peak_bytes: int
    flops: float
    seconds: float
    parts: dict[str, int]
    where: str = "host"
    read_bytes: float = 0.0  # read from disk where the weights wait there (seconds at the plan's read rate)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "peak_bytes": int(self.peak_bytes),
            "flops": float(self.flops),
            "seconds": round(self.seconds, 1),
            "where": self.where,
            "read_bytes": int(self.read_bytes),
            "parts": {k: int(v) for k, v in self.parts.items()},
        }


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """The plan of one run: its phases, whether the largest fits in ``max_memory``, and advice where not."""

    model: ModelFacts
    device: str
    dtype: str
    weight_dtype: str
    streamed: bool
    max_memory: int
    phases: list[Phase]
    advice: list[str]
    rate_flops: float
    host_memory: int | None = None  # a GPU run's host limit (None: the phases all live where max_memory is)
    read_rate: float | None = None  # bytes/s a slot is read from the checkpoint and converted (weights on disk)

    def limit(self, phase: Phase) -> int:
        """The memory ``phase`` may use: ``max_memory`` where the run computes, the host's on a GPU run's host."""
        return self.host_memory if phase.where == "host" and self.host_memory is not None else self.max_memory

    def over(self) -> list[Phase]:
        return [p for p in self.phases if p.peak_bytes > self.limit(p)]

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.peak_bytes)

    @property
    def fits(self) -> bool:
        return not self.over()

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    def to_dict(self) -> dict:
        m = self.model
        return {
            "fits": self.fits,
            "phases": [p.to_dict() for p in self.phases],
            "advice": list(self.advice),
            "model": {"name": m.name, "model_type": m.model_type, "params": m.params, "layers": m.layers},
            "device": self.device,
            "dtype": self.dtype,
            "weight_dtype": self.weight_dtype,
            "streaming": "on" if self.streamed else "off",
            "max_memory_bytes": self.max_memory,
            "host_memory_bytes": self.host_memory,
            "peak_bytes": self.peak.peak_bytes,
            "seconds": round(self.seconds, 1),
            "rate_flops_per_second": self.rate_flops,
            "read_bytes_per_second": self.read_rate,
            "predicted": "every figure but max_memory_bytes and the measured rate is predicted from the config",
        }

    def table(self) -> str:
        """The plan as a terminal table."""
        m = self.model
        lines = [
            f"{m.name}: {m.model_type}, {m.params / 1e9:.2f}B parameters, {m.layers} layers, hidden {m.hidden}, "
            f"vocab {m.vocab}",
            f"device {self.device}, autocast {self.dtype}, weights {self.weight_dtype}, streaming "
            f"{'on' if self.streamed else 'off'}; memory allowed {format_bytes(self.max_memory)}",
            "",
            f"{'phase':<22}{'peak memory':>14}{'TFLOP':>10}{'minutes':>10}",
        ]
        for p in self.phases:
            mark = "  <- over" if p.peak_bytes > self.limit(p) else ""
            mark += "  (host)" if p.where == "host" and self.host_memory is not None else ""
            lines.append(
                f"{p.name:<22}{format_bytes(p.peak_bytes):>14}{p.flops / 1e12:>10.2f}{p.seconds / 60:>10.1f}{mark}"
            )
        lines.append(f"{'whole run':<22}{format_bytes(self.peak.peak_bytes):>14}{'':>10}{self.seconds / 60:>10.1f}")
        lines.append("")
        worst = max(self.over(), key=lambda p: p.peak_bytes - self.limit(p), default=self.peak)
        lines.append(
            ("fits" if self.fits else "does NOT fit")
            + f": the largest phase ({worst.name}) needs {format_bytes(worst.peak_bytes)}"
        )
        lines += [f"- {a}" for a in self.advice]
        return "\n".join(lines)


# ---- reading a model's config -------------------------------------------------------------------------------
def model_facts(model: str, *, gguf_file: str | None = None, trust_remote_code: bool = False) -> ModelFacts:
    """The shapes of ``model`` (a folder, a GGUF file, a hub id, or the embedded default) from its config alone:
    the model is built on the meta device, so parameter counts are exact and no weight is read or allocated."""
    from transformers import AutoModelForCausalLM

    from ..arch import adapter_for
    from ..models import DEFAULT_ALIASES, Source, _check_architecture, _smollm2_gguf, resolve_source

    if model in DEFAULT_ALIASES:
        gguf = _smollm2_gguf()
        src = Source(str(gguf.parent), gguf.name, True)
    else:
        src = resolve_source(model, gguf_file)
    config = _check_architecture(src, trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    adapter = adapter_for(meta)
    adapter.unfuse_(meta)
    shape = adapter.shape(meta.config)
    layers = adapter.layers(meta)
    emb, head = adapter.embedding(meta), adapter.lm_head(meta)
    return ModelFacts(
        name=Path(model).name if model not in DEFAULT_ALIASES else "smollm2-135m",
        model_type=adapter.model_type,
        params=sum(p.numel() for p in meta.parameters()),
        layers=len(layers),
        hidden=shape["hidden_size"],
        intermediate=shape["intermediate_size"],
        heads=shape["num_attention_heads"],
        kv_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        vocab=shape["vocab_size"],
        tied=head is None or head.weight is emb.weight,
        layer_params=sum(p.numel() for p in layers[0].parameters()),
        file_bytes=_weight_file_bytes(src),
        folder=src.location if src.is_local and not src.gguf_file and _weight_file_bytes(src) else None,
        max_positions=getattr(meta.config, "max_position_embeddings", None),
        source_bytes=4 if src.gguf_file else _DTYPE_BYTES.get(str(_declared(config)).replace("torch.", ""), 2),
        config=meta.config,
        meta=meta,
    )


_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}


def _declared(config):
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)


def _weight_file_bytes(src) -> int | None:
    if not src.is_local:
        return None
    folder = Path(src.location)
    if src.gguf_file:  # the run reads the fp32 checkpoint the GGUF is dequantized into, once
        return None
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


# ---- what the machine has ------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int:
    """Free memory where the run's largest phase lives: the GPU's free bytes on a CUDA run, the host's available
    memory (``MemAvailable``) otherwise."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 0.15) -> float:
    """FLOP/s of a square matmul of this device and dtype, measured now (``seconds``, after one warm-up)."""
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = a @ b
        reps += 1
    c.sum().item()
    return 2 * n**3 * reps / (time.perf_counter() - start)


# ---- the plan ------------------------------------------------------------------------------------------------
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def plan_run(
    cfg: PruneConfig,
    facts: ModelFacts,
    *,
    device: torch.device,
    max_memory: int | None = None,
    rate: float | None = None,
    streamed: bool | None = None,
    host_memory: int | None = None,
) -> RunPlan:
    """The plan of ``cfg`` on a model of ``facts``: phases in run order. ``streamed``: force the execution (None:
    ``cfg.streaming``, with ``auto`` resolved to on only where a resident run does not fit)."""
    from ..dtypes import autocast_dtype, resolve_dtype
    from .outcome import weight_dtype

    absent = device.type == "cuda" and not torch.cuda.is_available()  # planned for a GPU this machine lacks
    dtype_name = "bf16" if absent and cfg.dtype == "auto" else resolve_dtype(cfg.dtype, device)
    cfg = cfg.replace(dtype=dtype_name)
    if cfg.resolved_cut_first():  # the default recipe: a one-shot cut, then its distillation (recipes.run)
        cfg = cut_first_config(cfg)
    autocast = autocast_dtype(dtype_name, device)
    wdtype = weight_dtype(cfg)
    max_memory = max_memory if max_memory is not None else available_memory(device)
    if host_memory is None and device.type == "cuda":
        host_memory = available_memory(torch.device("cpu"))
    if rate is None:
        rate = matmul_rate(device, autocast or torch.float32)
    if streamed is None:
        if cfg.streaming == "auto":
            resident = _plan(cfg, facts, device, wdtype, autocast, max_memory, host_memory, rate, False)
            streamed = not resident.fits
        else:
            streamed = cfg.streaming == "on"
    return _plan(cfg, facts, device, wdtype, autocast, max_memory, host_memory, rate, streamed)


def _plan(cfg, facts: ModelFacts, device, wdtype, autocast, max_memory, host_memory, rate, streamed) -> RunPlan:
    z = _Sizes(cfg, facts, device.type == "cuda", _BYTES[wdtype], _BYTES[autocast or torch.float32], streamed)
    phases = [
        phase
        for phase in (
            z.load(),
            z.eval_dense(),
            z.shape_search(),
            z.score(),
            z.reconstruct(),
            z.export(),
            z.eval_exported(),
            z.teacher_topk(),
            z.distill(),
        )  # fmt: skip
        if phase is not None
    ]
    eff = rate * EFFICIENCY
    reading = read_rate(facts, wdtype, device) if z.on_disk else None
    phases = [
        dataclasses.replace(p, seconds=(p.flops / eff if eff else 0.0) + (p.read_bytes / reading if reading else 0.0))
        for p in phases
    ]
    phases = _within_budget(cfg, phases)
    plan = RunPlan(facts, str(device), cfg.dtype, str(wdtype).replace("torch.", ""), streamed, max_memory, phases,
                   [], rate, host_memory, reading)  # fmt: skip
    return dataclasses.replace(plan, advice=_advice(cfg, plan))


def _within_budget(cfg: PruneConfig, phases: list[Phase]) -> list[Phase]:
    """Under a time budget (``minutes``) the distillation takes what the other phases leave of it, at most its
    ``steps`` (:mod:`maskprune.budget`): its seconds (and FLOPs) scaled down to that."""
    if not cfg.minutes or not any(p.name == "distill" for p in phases):
        return phases
    others = sum(p.seconds for p in phases if p.name != "distill")
    out = []
    for p in phases:
        if p.name == "distill" and p.seconds > 0:
            share = max(0.0, min(1.0, (60.0 * cfg.minutes - others) / p.seconds))
            p = dataclasses.replace(p, seconds=p.seconds * share, flops=p.flops * share)
        out.append(p)
    return out


@dataclasses.dataclass(frozen=True)
class _Sizes:
    """Each phase's peak bytes (by component) and FLOPs, following what the code holds at that moment. ``wb`` /
    ``ab``: bytes of a learning weight and of an activation (the autocast dtype)."""

    cfg: PruneConfig
    f: ModelFacts
    gpu: bool
    wb: int
    ab: int
    streamed: bool

    @property
    def base(self) -> int:
        return 0 if self.gpu else RUNTIME_BYTES

    @property
    def where(self) -> str:
        return "device" if self.gpu else "host"

    @property
    def weights(self) -> int:
        return self.f.params * self.wb

    @property
    def on_disk(self) -> bool:
        """Whether the weights wait on disk (:mod:`maskprune.offload`): a streamed one-shot cut."""
        c = self.cfg
        return self.streamed and c.method not in ("maskprune", "taylor") and not c.has_teacher

    @property
    def small(self) -> int:
        """The parameters that stay in memory when the rest waits on disk: every one-dimensional one."""
        return sum(p.numel() for p in self.f.meta.parameters() if p.dim() < 2) * self.wb

    @property
    def layer_slot(self) -> int:
        """Parameters of a decoder layer's matrices (what one read from disk brings during a pass)."""
        return self.f.layer_params - sum(p.numel() for p in _first_layer(self.f.meta).parameters() if p.dim() < 2)

    @property
    def end_slot(self) -> int:
        """Parameters of the embedding (or of an untied LM head, the same size): read at a pass's start and end."""
        return self.f.vocab * self.f.hidden

    def read(self, params: int, dtype_bytes: int | None = None) -> int:
        """``params`` read from disk: in ``dtype_bytes`` (default: the learning dtype), with the file's pages
        mapped while they are converted (the checkpoint's dtype)."""
        return params * ((dtype_bytes or self.wb) + self.f.source_bytes)

    @property
    def held(self) -> int:
        """What a pass holds of the model: all of it where it is loaded whole (a streamed pass on a model loaded
        whole visits one layer at a time, but the others stay); the small parameters and one slot being read where
        the weights wait on disk."""
        return self.small + self.read(max(self.layer_slot, self.end_slot)) if self.on_disk else self.weights

    @property
    def kept(self) -> float:
        c = self.cfg
        return 1.0 - (c.sparsity if c.sparsity is not None else 1.0 - c.budget_params / self.f.params)

    @property
    def eval_tokens(self) -> int:
        c = self.cfg
        return (c.eval_max_windows or _wikitext_windows(c.eval_seq_len)) * c.eval_seq_len

    def act(self, tokens: int, width_factor: float = 1.0) -> int:
        """Inference activations of one layer on ``tokens`` (no backward): q/k/v/o and the FFN's widest tensors,
        in the autocast dtype (a layer's are freed before the next). Attention scores are not counted: SDPA's
        fused kernels do not hold them (an eager attention at long context would)."""
        f = self.f
        per_token = (4 * f.hidden + (f.heads + 2 * f.kv_heads) * f.head_dim + 3 * f.intermediate) * width_factor
        return int(tokens * per_token * self.ab)

    def logits(self, tokens: int, copies: float) -> int:
        return int(tokens * self.f.vocab * 4 * copies)

    def head_chunks(self, seq_len: int) -> int:
        """The perplexity's head on at most 1024 positions at a time (``evaluate._window_nll``): the logits and
        their log-softmax in fp32."""
        return self.logits(min(1024, self.cfg.batch_size * (seq_len - 1)), 2)

    def stream(self, tokens: int) -> int:
        """A streamed pass holds every window's hidden states between layers (inputs and outputs)."""
        return 2 * tokens * self.f.hidden * self.ab if self.streamed else 0

    def _phase(
        self, name: str, parts: dict[str, int], flops: float, where: str | None = None, passes: float = 0.0
    ) -> Phase:
        """``passes``: reads of every matrix of the model from disk in the phase (where the weights wait there)."""
        reads = passes * self.matrix_params * self.f.source_bytes if self.on_disk else 0.0
        return Phase(name, sum(parts.values()), flops, 0.0, parts, where or self.where, reads)

    @property
    def matrix_params(self) -> int:
        return sum(p.numel() for p in self.f.meta.parameters() if p.dim() >= 2)

    def load(self) -> Phase:
        # transformers reads safetensors through a memory map: the file's pages are resident while the weights are
        # converted (an fp32 file to bf16 weights: both at once; the same dtype: the pages are the weights)
        file = self.f.file_bytes if self.f.file_bytes is not None else self.f.params * 4  # a GGUF's fp32 checkpoint
        pages = 0 if self.gpu or abs(file - self.weights) <= 0.05 * self.weights else file  # same dtype: one copy
        parts = {"runtime": self.base, "weights": self.weights, "file_pages": pages}
        if self.on_disk:  # the small parameters only; the matrices wait in the files
            parts = {"runtime": self.base, "weights": self.small}
        return self._phase("load", parts, 0.0, "host")

    def eval_dense(self) -> Phase | None:
        if self.cfg.eval_data == "none":
            return None
        n, t = self.eval_tokens, self.cfg.eval_seq_len
        parts = {"runtime": self.base, "weights": self.held, "activations": self.act(self.cfg.batch_size * t),
                 "head_chunks": self.head_chunks(t), "streamed_hidden": self.stream(n)}  # fmt: skip
        return self._phase("eval_dense", parts, self.f.forward_flops(n, t), passes=1)

    def shape_search(self) -> Phase | None:
        c, f = self.cfg, self.f
        axes = c.resolved_prune_axes()
        if not c.searches_shape():
            return None
        t, n_cut = c.seq_len, c.resolved_cut_samples()
        tokens = min(c.split_search_samples, c.calib_samples) * t
        head = f.forward_flops(tokens, t) - f.forward_flops(tokens, t, head=False)
        flops = f.forward_flops(tokens, t)  # the dense reference
        passes = 2.0  # the reference; the hidden energies and the metric's statistics (one pass)
        variants = 0
        if "layers" in axes:  # every skip in one pass: L (L + 1) / 2 layer runs (the dense run among them: the
            # reference is its head), L + 1 heads
            flops = (f.layers + 1) / 2 * f.forward_flops(tokens, t, head=False) + (f.layers + 1) * head
            variants = f.layers * tokens * f.hidden * self.ab  # every variant's hidden states at the last layer
        flops += f.forward_flops(n_cut * t, t, head=False)  # hidden energies and the metric's statistics
        # each candidate is scored from those statistics (no pass); every split is measured on the screening windows,
        # and those within the margin on the rest (assumed: one split a shape, the others screened out)
        n_win = min(c.split_search_samples, c.calib_samples)
        screen = -(-c.shape_screen_samples // c.batch_size) * c.batch_size if c.shape_screen_samples else 0
        screen = screen if screen < n_win else 0
        streamed_split_passes = self.streamed  # all of a shape's splits in one pass over the layers
        for layers, _params, splits in _search_candidates(c, f):  # a candidate's dropped layers do not run
            if screen:
                flops += splits * f.forward_flops(screen * t, t, layers=layers)
                flops += f.forward_flops((n_win - screen) * t, t, layers=layers)
                passes += 2 if streamed_split_passes else splits + 1
            else:
                flops += splits * f.forward_flops(tokens, t, layers=layers)
                passes += 1 if streamed_split_passes else splits
        # each candidate is emulated on the dense model (no copy): the norms' weights are saved and put back
        parts = {"runtime": self.base, "weights": self.held, "norm_weights_saved": 2 * f.layers * f.hidden * self.wb,
                 "reference_logits_bf16": tokens * f.vocab * 2, "candidate_logits": self.logits(c.batch_size * t, 3),
                 "activations": self.act(c.batch_size * t), "streamed_hidden": self.stream(tokens),
                 "skip_variants_hidden": variants}  # fmt: skip
        return self._phase("shape_search", parts, flops, passes=passes)

    def score(self) -> Phase | None:
        c = self.cfg
        if c.searches_shape() and not c.resolved_layerwise_calibration():
            return None  # the shape search scored the units already (FLAP's compensation means: a pass, not counted)
        tokens = c.resolved_cut_samples() * c.seq_len
        parts = {"runtime": self.base, "weights": self.held, "activations": self.act(c.batch_size * c.seq_len),
                 "streamed_hidden": self.stream(tokens)}  # fmt: skip
        return self._phase("score", parts, self.f.forward_flops(tokens, c.seq_len, head=False), passes=2)

    def reconstruct(self) -> Phase | None:
        # the re-fit runs on fp32 weights: a half-precision run reloads the source in fp32 while its learning copy is
        # still referenced (stages.outcome.rebuild_for_export), resident whatever the execution; it keeps every
        # window's hidden states between layers and a float64 Gram of the widest projection input
        c, f = self.cfg, self.f
        if not c.reconstruct:
            return None
        tokens = c.resolved_cut_samples() * c.seq_len
        grams = 0.0  # float64 work per layer and projection (o_proj, down_proj): the Gram, W G (the cross moment and
        # tr(W G W^T)), the error before the fit (the cut columns' block), Cholesky and its solves
        for width in (f.heads * f.head_dim, f.intermediate):
            k = width * self.kept
            # the Gram's upper block triangle (sequential.add_gram_: block rows of 256) is about half the product
            grams += tokens * width * (width + 256) + 2 * f.hidden * width**2 + 2 * f.hidden * (width - k) ** 2
            grams += k**3 / 3 + 2 * f.hidden * k**2
        grams *= f.layers * self.kept
        acts = self.act(c.batch_size * c.seq_len, 4 / self.ab)
        gram = int(3 * (f.intermediate * self.kept) ** 2 * 8)  # the kept inputs' Gram, its ridge copy, the solve's
        # the kept down_proj inputs (fp32) kept to carry a layer on without a third run, where down_proj writes the
        # layer's output (not after Gemma's / OLMo 2's post-FFN norm) and they fit sequential.MERGE_BYTES
        from ..sequential import MERGE_BYTES

        kept_inputs = int(tokens * f.intermediate * self.kept * 4)
        merged = kept_inputs <= MERGE_BYTES and not _ffn_output_normed(f.meta)
        gram += kept_inputs if merged else 0
        contexts = int(tokens * f.heads * f.head_dim * 4)  # o_proj's inputs, kept to replay the attention
        gram += contexts if contexts <= MERGE_BYTES else 0
        if self.on_disk:  # the layers of the cut model and of its dense twin read in turn, one at a time, in fp32;
            # the embeddings at the start, the Grams in the layer loop (never both)
            layer_part = self.read(self.layer_slot, 4) + gram
            parts = {"runtime": self.base, "small_fp32": 2 * self.small, "layer_inputs": 2 * tokens * f.hidden * 4,
                     "activations": acts}  # fmt: skip
            if layer_part >= self.read(self.end_slot, 4):
                parts.update(layer_fp32=self.read(self.layer_slot, 4), gram_fp64=gram)
            else:
                parts.update(embedding_fp32=self.read(self.end_slot, 4))
        else:
            weights = f.params * 4 + (self.weights if self.wb != 4 else 0)
            parts = {"runtime": self.base, "weights_fp32": weights, "layer_inputs": 2 * tokens * f.hidden * 4,
                     "gram_fp64": gram, "activations": acts}  # fmt: skip
        # each kept layer: to o_proj's input (the attention, computed once), whole with the attention replayed from
        # that input (down_proj's Gram), [the same again where not merged]
        dense = f.forward_flops(tokens, c.seq_len, head=False)
        attention = f.layers * tokens * (2 * f.hidden * (f.heads + 2 * f.kv_heads) * f.head_dim + 2 * c.seq_len
                                         * f.heads * f.head_dim)  # fmt: skip
        flops = self.kept * (dense + (0 if merged else dense - attention)) + 2 * grams  # float64: half the rate
        return self._phase("reconstruct", parts, flops, passes=2)  # the dense twin's layers and the cut's

    @property
    def export_bytes(self) -> int:
        """Bytes of an exported weight: ``export_dtype``, or (``auto``) the source checkpoint's dtype."""
        return _DTYPE_BYTES[self.cfg.export_dtype] if self.cfg.export_dtype != "auto" else self.f.source_bytes

    def export(self) -> Phase:
        if self.on_disk:  # each module read in fp32, folded and sliced, written; then each read in the export
            # dtype into a shard of at most 1 GiB (or one layer); the largest module is the embedding or the head
            slot = max(self.layer_slot, self.end_slot)
            fold = self.read(slot, 4) + int(slot * self.kept) * 4
            shard = min(2**30, int(self.f.params * self.kept) * self.export_bytes)  # at most the whole export
            save = slot * (self.export_bytes + 4) + max(shard, int(self.layer_slot * self.kept) * self.export_bytes)
            parts = {"runtime": self.base, "small_fp32": self.small,
                     "probe_logits": self.logits(2 * min(self.cfg.seq_len, 64), 3)}  # fmt: skip
            parts.update({"fold_and_slice": fold} if fold >= save else {"save": save})
            return self._phase("export", parts, 0.0, passes=5)  # fold, two parity checks, the save, the reload's
        fp32 = self.f.params * 4  # fold and slice in fp32, cast, write, reload with from_pretrained and compare
        parts = {"runtime": self.base, "weights_fp32": fp32, "sliced_copy": int(fp32 * self.kept),
                 "reloaded_copy": int(self.f.params * self.kept * self.export_bytes)}  # fmt: skip
        return self._phase("export", parts, 0.0)

    def eval_exported(self) -> Phase | None:
        if self.cfg.eval_data == "none":
            return None
        t = self.cfg.eval_seq_len
        weights = self.small + self.read(self.end_slot, 4) if self.on_disk else int(self.f.params * 4 * self.kept)
        parts = {"runtime": self.base, "weights": weights, "activations": self.act(self.cfg.batch_size * t),
                 "head_chunks": self.head_chunks(t), "streamed_hidden": self.stream(self.eval_tokens)}  # fmt: skip
        return self._phase("eval_exported", parts, self.kept * self.f.forward_flops(self.eval_tokens, t), passes=1)

    def _drawn(self) -> int:
        """Windows the teacher's top-k covers: those the steps draw (one pass at most) and the held-out ones."""
        c = self.cfg
        return min(c.calib_samples, c.recover_steps * c.batch_size) + c.val_windows

    def _rows_bytes(self) -> int:
        """A batch's top-k rows in memory (fp16 log-probs, int32 ids, fp32 tail): the windows wait on disk
        (``teacher_cache``; ``_drawn`` windows of ``seq_len x (6k + 4)`` bytes there), a step reads its batch."""
        c = self.cfg
        return c.batch_size * c.seq_len * (c.resolved_teacher_topk() * 6 + 4)

    def teacher_topk(self) -> Phase | None:
        """Streamed, every window the steps can draw in one pass before them; resident, the held-out windows only
        (a training window is computed when a step first draws it, the teacher kept, as without top-k)."""
        c = self.cfg
        if not (c.recover_steps and c.resolved_teacher_topk()):
            return None
        tokens = (self._drawn() if self.streamed else c.val_windows) * c.seq_len
        parts = {"runtime": self.base, "student_weights": int(self.weights * self.kept), "teacher_weights": self.held,
                 "logits": self.logits(c.batch_size * c.seq_len, 3), "cache": self._rows_bytes(),
                 "streamed_hidden": self.stream(tokens)}  # fmt: skip
        return self._phase("teacher_topk", parts, self.f.forward_flops(tokens, c.seq_len))

    def distill(self) -> Phase | None:
        from ..memory import estimate_distill_memory, pruned_shape

        c, f = self.cfg, self.f
        if not c.recover_steps:
            return None
        teacher = ModelShape(*(getattr(f, k.name) for k in dataclasses.fields(ModelShape)))
        student = pruned_shape(teacher, 1.0 - self.kept)
        tokens = c.batch_size * c.seq_len
        est = estimate_distill_memory(student, teacher, batch_tokens=tokens, full=c.full, lora_rank=c.lora_rank,
                                      gradient_checkpointing=c.gradient_checkpointing)  # fmt: skip
        parts = {k: int(v) for k, v in est.items() if k != "total"}
        parts.update(runtime=self.base, weights=int(student.params * (4 if c.full else self.wb)))
        # top-k: streamed, the cache instead of the teacher and its logits; resident, the teacher is kept for the
        # windows the cache lacks (a run that finds them all never loads it: the plan assumes it does not)
        parts["teacher_weights_bf16"] = 0 if c.resolved_teacher_topk() and self.streamed else self.weights
        if c.resolved_teacher_topk():
            if self.streamed:
                parts["logits_student_and_teacher_bf16"] //= 2
            parts["teacher_topk_cache"] = self._rows_bytes()
        total = c.recover_steps * tokens
        teacher_flops = 0 if c.resolved_teacher_topk() and self.streamed else f.forward_flops(total, c.seq_len)
        return self._phase("distill", parts, teacher_flops + 3 * self.kept * f.forward_flops(total, c.seq_len))


NOMINAL_READ_RATE = 1e9
"""Bytes/s of reading and converting weights that wait on disk, assumed where no local checkpoint can be timed."""


def read_rate(facts: ModelFacts, wdtype: torch.dtype, device: torch.device) -> float:
    """Bytes/s (of the checkpoint) at which a layer's matrices are read from disk and converted to ``wdtype`` on
    ``device``, measured now on the first layer of a local safetensors checkpoint (its second read: the passes after
    the first find the file in the page cache where it fits in free memory); :data:`NOMINAL_READ_RATE` otherwise."""
    from ..offload import checkpoint_files, read_tensors

    if facts.folder is None:
        return NOMINAL_READ_RATE
    try:
        files = checkpoint_files(Path(facts.folder))
    except Exception:  # noqa: BLE001 - a folder the plan cannot time is planned at the nominal rate
        return NOMINAL_READ_RATE
    prefix = next((n.rsplit(".layers.0.", 1)[0] for n in files if ".layers.0." in n), None)
    names = [n for n in files if prefix is not None and n.startswith(f"{prefix}.layers.0.")]
    if not names:
        return NOMINAL_READ_RATE
    sources = {n: (files[n], n) for n in names}
    dtypes = dict.fromkeys(names, wdtype)
    read_tensors(sources, names, device, dtypes)
    start = time.perf_counter()
    got = read_tensors(sources, names, device, dtypes)
    seconds = time.perf_counter() - start
    nbytes = sum(t.numel() for t in got.values()) * facts.source_bytes
    return nbytes / max(seconds, 1e-6)


def _first_layer(meta) -> torch.nn.Module:
    from ..arch import adapter_for

    return adapter_for(meta).layers(meta)[0]


def _wikitext_windows(seq_len: int) -> int:
    """Windows of the shipped WikiText-2 test split at ``seq_len`` (about 290k tokens with a 49k-token BPE)."""
    return max(1, 290_000 // seq_len)


def _search_candidates(cfg: PruneConfig, f: ModelFacts, refused: list | None = None) -> list[tuple[int, int, int]]:
    """``(layers, parameters, splits)`` of every shape the shape search ranks, enumerated as the search does
    (:func:`maskprune.cut.candidate_shapes`) on copies of the meta-device model (free: no storage), each shape's
    splits as :func:`maskprune.cut.candidate_splits` gives them. Shapes that remove more than the budget, or leave
    too little for heads and FFN, cost no pass and are left out."""
    import copy

    from ..arch import adapter_for
    from ..axis_scores import hidden_channel_params, layer_params
    from ..cut import candidate_shapes, candidate_splits
    from ..errors import MaskPruneError
    from ..structure import Structure
    from ..surgery import config_accepts
    from .shape import _fixed, reshape_

    meta = f.meta
    ad = adapter_for(meta)
    structure = Structure.of(meta, ad, cfg.gqa_policy)
    budget = cfg.budget_for(structure.dense_params)
    shapes = candidate_shapes(
        removed=structure.dense_params - budget,
        num_layers=f.layers,
        hidden=f.hidden,
        layer_params=layer_params(meta, ad),
        hidden_params=lambda layers: hidden_channel_params(meta, ad, layers),
        axes=cfg.resolved_prune_axes(),
        hidden_multiple=cfg.hidden_multiple,
        hidden_ok=lambda width: config_accepts(meta.config, hidden_size=width),
    )
    out = []
    for shape in _fixed(shapes, cfg.keep_layers, cfg.keep_hidden, f.layers, f.hidden):
        reduced = copy.deepcopy(meta)
        reshape_(reduced, ad, list(range(f.layers - shape.drop_layers)), torch.arange(shape.hidden))
        s = Structure.of(reduced, ad, cfg.gqa_policy)
        what = f"{s.num_layers} layers, hidden {shape.hidden}"
        if s.dense_params < budget:
            (refused if refused is not None else []).append(f"{what}: removes more than the budget")
            continue
        try:
            mult = {"head_multiple": cfg.head_multiple, "ffn_multiple": cfg.ffn_multiple}
            splits = len(candidate_splits(s, budget, **mult)) if cfg.resolved_split_search() else 1
        except MaskPruneError:
            (refused if refused is not None else []).append(f"{what}: leaves too little for heads and FFN")
            continue
        out.append((s.num_layers, s.dense_params, splits))
    return out


def _advice(cfg, plan: RunPlan) -> list[str]:
    over = plan.over()
    if not over:
        return []
    out = []
    streamed, max_memory = plan.streamed, plan.limit(over[0])
    worst = max(over, key=lambda p: p.peak_bytes - plan.limit(p))
    parts = worst.parts
    if not streamed:
        out.append(
            "--streaming on: a one-shot cut (the default's) then keeps its weights on disk and reads one layer at a "
            "time; learning (--method maskprune) and distillation still hold the whole model"
        )
    if parts.get("reference_logits_bf16", 0) > max_memory / 8:
        out.append(f"--split-search-samples {max(1, cfg.split_search_samples // 4)}: the shape search keeps the dense "
                   "model's logits of every window it ranks on")  # fmt: skip
    if parts.get("layer_inputs", 0) > max_memory / 8 or parts.get("streamed_hidden", 0) > max_memory / 8:
        out.append(f"--cut-samples {max(8, cfg.resolved_cut_samples() // 4)}: fewer windows' activations held")
    if worst.name == "distill":
        out.append("--steps 0: the cut alone (its weights wait on disk with --streaming on, one layer in memory); "
                   "then `maskprune distill` the cut where the student fits")  # fmt: skip
        if not cfg.gradient_checkpointing:
            out.append("--gradient-checkpointing: recompute each layer's activations in the backward pass")
        out.append("--batch-size 1 (fewer tokens' activations), or FSDP over several GPUs (--fsdp under torchrun)")
    if worst.name == "reconstruct" and not streamed:
        out.append("--no-reconstruct: the re-fit rebuilds the whole model in fp32 where it is not streamed")
    if worst.name == "export" and not streamed:
        out.append("nothing to switch on yet: the export folds and slices the whole model in fp32 in memory (not "
                   f"streamed yet); a machine with {format_bytes(worst.peak_bytes * 1.1)} runs it")  # fmt: skip
    out.append(f"or give more memory: --max-memory above {format_bytes(worst.peak_bytes)} on a machine that has it")
    return out


NOMINAL_CUDA_RATE = 400e12
"""The bf16 dense matmul rate assumed for a GPU this machine does not have (an H100's order; measured where the GPU
is present)."""


def plan_for(cfg: PruneConfig, facts: ModelFacts | None = None) -> RunPlan:
    """The plan of ``cfg`` on this machine (or on the device it names, with ``max_memory`` given where this machine
    lacks it)."""
    from ..errors import MaskPruneError

    cfg = cfg.validate()
    facts = facts or model_facts(cfg.model, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)
    device = _planned_device(cfg.device)
    present = device.type != "cuda" or torch.cuda.is_available()
    if not present and cfg.max_memory is None:
        raise MaskPruneError(
            f"this machine has no {device.type} device to read the free memory of",
            fix="give --max-memory (the device's memory, e.g. 80GB) to plan for it",
        )
    rate = None if present else NOMINAL_CUDA_RATE
    max_memory = parse_bytes(cfg.max_memory) if cfg.max_memory is not None else available_memory(device)
    return plan_run(cfg, facts, device=device, max_memory=max_memory, rate=rate)


def _planned_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_request(cfg: PruneConfig, facts: ModelFacts) -> None:
    """The checks of what the run asks that need the model's config only, made before anything is loaded: a fixed
    hidden width or depth the model has (and its family's config accepts); where the shape is searched, a candidate
    shape that meets the parameter budget."""
    from ..errors import MaskPruneError
    from ..surgery import config_accepts

    def within(flag: str, value: int | None, top: int, what: str) -> None:
        if value is not None and not 1 <= value <= top:
            raise MaskPruneError(
                f"--{flag} is outside the model's {what}",
                expected=f"1 to {top} (the model's {what})",
                found=f"--{flag} {value}",
                fix=f"pick a smaller --{flag}, or drop it and let the shape search choose",
            )

    within("keep-hidden", cfg.keep_hidden, facts.hidden, "hidden width")
    within("keep-layers", cfg.keep_layers, facts.layers, "depth")
    if cfg.keep_hidden is not None and not config_accepts(facts.config, hidden_size=cfg.keep_hidden):
        raise MaskPruneError(
            f"{type(facts.config).__name__} refuses hidden_size {cfg.keep_hidden}",
            expected=f"a hidden size its config accepts (a multiple of num_attention_heads {facts.heads} for this "
            "family)",
            found=f"--keep-hidden {cfg.keep_hidden}",
            fix="pick another --keep-hidden, or drop it and let the shape search choose",
        )
    if cfg.searches_shape() and not cfg.has_teacher:
        _check_shapes(cfg, facts)


def _check_shapes(cfg: PruneConfig, facts: ModelFacts) -> None:
    """Refuse a budget no candidate shape meets (every one removes more, or leaves too little for a head and an FFN
    channel per layer), from the config alone: the shape search would say so only after the dense evaluation."""
    from ..errors import MaskPruneError

    refused: list[str] = []
    if _search_candidates(cfg, facts, refused):
        return
    fixed = cfg.keep_layers is not None or cfg.keep_hidden is not None
    asked = f"sparsity {cfg.sparsity}" if cfg.budget_params is None else f"budget {cfg.budget_params:,} parameters"
    raise MaskPruneError(
        "no candidate shape meets the parameter budget",
        expected=f"a cut of {', '.join(cfg.resolved_prune_axes())} that keeps heads and FFN channels in every layer",
        found=f"{asked}: " + "; ".join(refused),
        fix="keep more layers or hidden channels (--keep-layers / --keep-hidden)" if fixed else "lower --sparsity",
    )


def check_plan(plan: RunPlan) -> None:
    """Refuse a plan that does not fit, with its advice (a :class:`maskprune.errors.MaskPruneError`)."""
    from ..errors import MaskPruneError

    if plan.fits:
        return
    worst = max(plan.over(), key=lambda p: p.peak_bytes - plan.limit(p))
    raise MaskPruneError(
        f"this run does not fit: its {worst.name} phase needs about {format_bytes(worst.peak_bytes)}",
        expected=f"at most {format_bytes(plan.limit(worst))} (--max-memory, default: the memory free now)",
        found=", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(worst.parts.items(), key=lambda kv: -kv[1]) if v),
        fix="; ".join(plan.advice) + " (see `maskprune plan MODEL ...` for every phase)",
    )


def _ffn_output_normed(meta) -> bool:
    """Whether the model's decoder layers norm the FFN's output before the residual (Gemma 2 / 3's and OLMo 2's
    ``post_feedforward_layernorm``), from the model on the meta device (False where there is none): the re-fit then
    runs each layer a third time (:func:`maskprune.sequential.reconstruct_layerwise_` probes it on the weights)."""
    if meta is None:
        return False
    from ..arch import adapter_for

    layer = adapter_for(meta).layers(meta)[0]
    return any(
        "norm" in name and "post" in name and any(w in name for w in ("feedforward", "ffn", "mlp"))
        for name, _ in layer.named_children()
    )
