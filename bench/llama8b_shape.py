"""An 8B-shaped checkpoint for the scale measurements: Llama-3.1-8B's config (hidden 4096, FFN 14336, 32 layers,
32 query / 8 KV heads, vocabulary 128256, untied head, llama3 rope scaling) with random bf16 weights, written as
sharded safetensors one layer at a time (the process never holds more than one shard), and the embedded default's
tokenizer (its ids are all below 128256).

    python bench/llama8b_shape.py OUT                # config and tokenizer only (enough for `maskprune plan OUT`)
    python bench/llama8b_shape.py OUT --weights      # and the ~16 GB of random bf16 weights
    python bench/llama8b_shape.py OUT --shallow-of FULL --layers 4   # the same width, 4 layers (links, no copy)

The weights are random (std 0.02, norms at 1): the model computes nothing useful; it measures memory and time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def _tensors(layer: int | None, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One shard's tensors: decoder layer ``layer``, or (None) the embedding, the final norm and the head."""
    h, f, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    if layer is None:
        return {
            "model.embed_tokens.weight": rand(v, h),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
            "lm_head.weight": rand(v, h),
        }
    p = f"model.layers.{layer}."
    return {
        p + "self_attn.q_proj.weight": rand(h, h),
        p + "self_attn.k_proj.weight": rand(kv, h),
        p + "self_attn.v_proj.weight": rand(kv, h),
        p + "self_attn.o_proj.weight": rand(h, h),
        p + "mlp.gate_proj.weight": rand(f, h),
        p + "mlp.up_proj.weight": rand(f, h),
        p + "mlp.down_proj.weight": rand(h, f),
        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
    }


def write(out: Path, weights: bool, seed: int = 0) -> None:
    from safetensors.torch import save_file

    from maskprune.models import default_model_dir

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(out)
    if not weights:
        return
    gen = torch.Generator().manual_seed(seed)
    index: dict[str, str] = {}
    shards = [None, *range(CONFIG["num_hidden_layers"])]
    total = 0
    for i, layer in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = _tensors(layer, gen)
        save_file(tensors, out / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        index.update(dict.fromkeys(tensors, name))
        print(f"{name}: {'embedding, norm, head' if layer is None else f'layer {layer}'}", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )


def shallow_view(out: Path, source: Path, layers: int) -> None:
    """A checkpoint of the same width with only the first ``layers`` decoder layers of ``source`` (written by
    :func:`write`): its config with ``num_hidden_layers`` changed, links to the source's shard files and an index
    of the tensors it keeps. Every module is the 8B model's size (what a streamed cut's memory depends on); only the
    depth, and with it the time, is smaller."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=1))
    index = json.loads((source / "model.safetensors.index.json").read_text())
    keep = {
        k: f
        for k, f in index["weight_map"].items()
        if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers
    }
    for file in sorted(set(keep.values())):
        link = out / file
        if not link.exists():
            link.symlink_to((source / file).resolve())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=1))
    for extra in source.iterdir():
        if extra.name.startswith("tokenizer") or extra.name.endswith(".jinja"):
            (out / extra.name).write_bytes(extra.read_bytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--weights", action="store_true", help="write the ~16 GB of random bf16 weights too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shallow-of", type=Path, help="a checkpoint written with --weights: link its first --layers")
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args()
    if a.shallow_of is not None:
        shallow_view(a.out, a.shallow_of, a.layers)
    else:
        write(a.out, a.weights, a.seed)


if __name__ == "__main__":
    main()
