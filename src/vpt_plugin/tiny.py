"""A tiny random Qwen2-VL base, built offline and deterministically from a seed.

Everything the real base ships is here at toy size: a byte-level BPE tokenizer trained
on generated text, with every Qwen2-VL special token and the Qwen2-VL chat template; a
Qwen2VLProcessor with small pixel bounds; a Qwen2-VL model; and tiny DINOv2 and SAM
encoder configs. ``vpt init --tiny`` turns it into a VPT checkpoint.
"""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Dinov2Config,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    SamVisionConfig,
)

from .vocabulary import REENCODING_PROMPT, REGION_PROMPT

# The special tokens of Qwen2-VL's tokenizer, in its order (ids follow the trained vocabulary here).
QWEN2_VL_SPECIAL_TOKENS = [
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

# The Qwen2-VL chat format: a default system turn, then <|im_start|>role\ncontent<|im_end|>\n per turn.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "what which where is are the a an of in on at to and colour color shape digit square circle triangle "
    "red green blue yellow white black cell grid region image picture question answer small large left "
    "right top bottom corner centre center look again how many there you assistant system user helpful"
).split()

# Pixel bounds that give 16 image tokens for a 224x224 image (56^2 .. 112^2 pixels).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def tiny_tokenizer(seed: int = 0, vocab_size: int = 600) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer trained on generated text, with Qwen2-VL's special tokens and template."""
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
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_VL_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


def tiny_processor(tokenizer) -> Qwen2VLProcessor:
    size = {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def tiny_base_config(tokenizer) -> Qwen2VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    hidden = 128
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=14),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def tiny_encoder_configs() -> dict:
    """Branch name -> tiny encoder config. SAM keeps its real 1024x1024 input and 256x64x64 output."""
    return {
        "dino": Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=224, patch_size=14,
        ),
        "sam": SamVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
            global_attn_indexes=[1], window_size=8, output_channels=256, image_size=1024, patch_size=16,
        ),
    }


def build_tiny_base(output_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL (model, tokenizer, processor) to ``output_dir``."""
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(seed)
    model = Qwen2VLForConditionalGeneration(tiny_base_config(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tiny_processor(tokenizer).save_pretrained(output_dir)
    return output_dir


def build_tiny_fixtures(output_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """A tiny plain Qwen2-VL (``qwen2-vl``) and tiny branch encoders (``dinov2``, ``sam``) saved as
    hub-style directories, so recipes that build a VPT model from a base run offline."""
    from transformers import Dinov2Model, SamVisionModel

    output_dir = Path(output_dir)
    paths = {"base": build_tiny_base(output_dir / "qwen2-vl", seed)}
    configs = tiny_encoder_configs()
    torch.manual_seed(seed)
    for name, model_class, folder in (("dino", Dinov2Model, "dinov2"), ("sam", SamVisionModel, "sam")):
        paths[name] = output_dir / folder
        model_class(configs[name]).save_pretrained(paths[name])
    return paths
