"""Tiny random bases, built offline and deterministically from a seed.

Everything a real base ships is here at toy size: a byte-level BPE tokenizer trained on
generated text, with every Qwen-VL special token; the base's processor with small pixel
bounds and its chat template; the base model (``vpt_plugin.bases``: each base's tiny config);
and each branch's tiny encoder (``VisionBranch.tiny_encoder_config``). ``vpt init --tiny`` turns
one into a VPT checkpoint.
"""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

from .bases import get_base
from .branches import BRANCHES
from .vocabulary import REENCODING_PROMPT, REGION_PROMPT

# The special tokens of the Qwen-VL tokenizers, in their order (ids follow the trained vocabulary here).
QWEN_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

DEFAULT_BASE = "qwen2_vl"

_WORDS = (
    "what which where is are the a an of in on at to and colour color shape digit square circle triangle "
    "red green blue yellow white black cell grid region image picture question answer small large left "
    "right top bottom corner centre center look again how many there you assistant system user helpful"
).split()


def tiny_tokenizer(seed: int = 0, vocab_size: int = 600) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer trained on generated text, with the Qwen-VL special tokens."""
    rng = random.Random(seed)
    corpus = [REGION_PROMPT, REENCODING_PROMPT]
    for _ in range(3000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        corpus.append(" ".join(words) + rng.choice([".", "?", "!", ":", ","]) + " " + str(rng.randint(0, 999)))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VL_SPECIAL_TOKENS[1:]})
    return tokenizer


def tiny_encoder_configs() -> dict:
    """Branch name -> tiny encoder config, for every branch with its own encoder."""
    return {name: branch.tiny_encoder_config() for name, branch in BRANCHES.items() if branch.has_encoder}


def build_tiny_base(output_dir: str | Path, seed: int = 0, base: str = DEFAULT_BASE) -> Path:
    """Write a tiny random plain base (model, tokenizer, processor) of ``base`` (a base model_type) to ``output_dir``."""
    description = get_base(base)
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(seed)
    processor = description.tiny_processor(tokenizer)
    tokenizer.chat_template = processor.chat_template
    model = description.base_model_class(description.tiny_config(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def tiny_base_folder(base: str) -> str:
    """The folder name ``vpt tiny`` writes a base to: ``qwen2-vl``, ``qwen2.5-vl``, ``qwen3-vl``."""
    return base.replace("_", "-").replace("2-5", "2.5")


def build_tiny_fixtures(output_dir: str | Path, seed: int = 0, bases: tuple[str, ...] = (DEFAULT_BASE,)) -> dict[str, Path]:
    """Tiny plain bases (``qwen2-vl``, ``qwen2.5-vl``, ... per ``bases``) and each branch's tiny encoder
    (in its ``tiny_folder``: ``dinov2``, ...) saved as hub-style directories, so recipes that build a VPT
    model from a base run offline."""
    output_dir = Path(output_dir)
    paths = {base: build_tiny_base(output_dir / tiny_base_folder(base), seed, base) for base in bases}
    for name, branch in BRANCHES.items():
        if branch.has_encoder:
            paths[name] = branch.save_tiny_encoder(output_dir / branch.tiny_folder, seed)
    return paths
