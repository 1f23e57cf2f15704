"""Tiny in-process models and tokenizers for fast offline tests (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

TEXT = (
    "The quick brown fox jumps over the lazy dog. A pruned model keeps the same shape in every layer. "
    "Masks learn which heads and channels matter; the rest are cut. Language models predict the next "
    "token from the ones before it, and structured pruning removes whole units of computation. "
) * 8

VOCAB = 256


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    return fast


def config_for(kind: str, *, tied: bool = False, layers: int = 2):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        eos_token_id=0,
        bos_token_id=1,
        pad_token_id=0,
    )
    if kind == "llama_mha":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common)
    if kind == "llama_gqa":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
    if kind == "llama_bias":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True, **common)
    if kind == "mistral":
        return MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common)
    if kind == "qwen2":
        return Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    if kind == "qwen3":
        return Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)
    if kind == "gemma2":  # head_dim independent of hidden / heads, soft-capping, pre- and post-norms
        from transformers import Gemma2Config

        return Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=32, **common)
    if kind == "gemma3":  # one KV head (only the query policy can cut), q/k norms per head, sliding layers
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=32, **common)
    if kind == "granite":  # embedding / residual / attention / logits multipliers
        from transformers import GraniteConfig

        return GraniteConfig(
            num_attention_heads=4,
            num_key_value_heads=2,
            embedding_multiplier=6.0,
            residual_multiplier=0.5,
            attention_multiplier=0.1,
            logits_scaling=4.0,
            **common,
        )
    if kind == "smollm3":  # NoPE layers
        from transformers import SmolLM3Config

        return SmolLM3Config(num_attention_heads=4, num_key_value_heads=2, **common)
    if kind == "olmo2":  # q/k RMSNorm over the whole projected width
        from transformers import Olmo2Config

        return Olmo2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    if kind == "phi3":  # fused qkv_proj and gate_up_proj
        from transformers import Phi3Config

        return Phi3Config(num_attention_heads=4, num_key_value_heads=2, **common)
    raise KeyError(kind)


def make_model(kind: str, *, tied: bool = False, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(kind, tied=tied, layers=layers), dtype=torch.float32)
    # stronger-than-default init so masks matter and logits differ measurably
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    return model.eval()


def save_tiny(folder: Path, kind: str = "llama_gqa", *, tied: bool = False, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_model(kind, tied=tied, seed=seed).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def write_calib(path: Path, docs: int = 40) -> Path:
    import json

    with open(path, "w") as fh:
        for i in range(docs):
            fh.write(json.dumps({"text": f"Document {i}. " + TEXT[(i * 37) % 200 :]}) + "\n")
    return path


def small_run(
    calib: Path | None,
    *,
    calib_samples: int = 16,
    seq_len: int = 32,
    batch_size: int | None = None,
    evaluate: bool = True,
    dtype: str | None = None,
    threads: int | None = None,
) -> list[str]:
    """The common CLI flags of a seconds-long run (the one list every test builds on): short windows, few of
    them, from ``calib``; a two-window evaluation (``evaluate=False``: none); batch, dtype and threads when
    given."""
    flags = ["--seq-len", str(seq_len), "--calib-samples", str(calib_samples)]
    flags += ["--calib", str(calib)] if calib is not None else []
    flags += ["--eval-seq-len", "64", "--eval-max-windows", "2"] if evaluate else ["--eval-data", "none"]
    for flag, value in (("--batch-size", batch_size), ("--dtype", dtype), ("--threads", threads)):
        if value is not None:
            flags += [flag, str(value)]
    return flags
