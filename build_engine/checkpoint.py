"""Random GLM-4V checkpoints in the exact Hugging Face layout.

`make_tiny_checkpoint(out_dir, preset)` writes a directory that transformers loads as a real GLM-4.6V-Flash
checkpoint (`Glm4vForConditionalGeneration.from_pretrained`, `AutoTokenizer`, `AutoProcessor`), so that
transformers is the reference for every test:

    config.json               Glm4vConfig: partial_rotary_factor 0.5, mrope_section summing to rotary_dim / 2,
                              every GLM special-token id mapped into the small vocabulary
    model.safetensors         random weights, deterministic by seed
    tokenizer.json            a byte-level BPE trained on a built-in Chinese + English corpus, with GLM's
    tokenizer_config.json     special tokens and the GLM-4.6V chat template (with `enable_thinking`)
    chat_template.jinja
    preprocessor_config.json  Glm46VImageProcessor settings (CLIP mean/std, patch 14, merge 2)
    generation_config.json

`full_size_config()` is the GLM-4.6V-Flash shape itself; `make_dummy_checkpoint(out_dir)` writes its config
and a tokenizer whose special tokens sit at the real GLM-4.6V ids, but no weights: the runtime creates random
weights directly on the target device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# GLM-4 special tokens in their id order (151329 … in the real tokenizer).
GLM_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
# Ids of the GLM-4.6V family for tokens outside the contiguous block above.
GLM_EXTRA_TOKEN_IDS: dict[str, int] = {
    "<think>": 151350,
    "</think>": 151351,
    "<|begin_of_box|>": 151357,
    "<|end_of_box|>": 151358,
    "<|image|>": 151363,
    "<|video|>": 151364,
}
GLM_FIRST_SPECIAL_ID = 151329
GLM_VOCAB_SIZE = 151552

# Renders GLM-4.6V's prompt layout: `[gMASK]<sop>`, `<|user|>\n`, images as
# `<|begin_of_image|><|image|><|end_of_image|>` directly followed by text, and with enable_thinking=False
# a `/nothink` suffix on the last user turn plus an empty `<think></think>` after `<|assistant|>\n`.
# With `tools`: GLM-4.5V's tool prompt in a system turn first, assistant `tool_calls` as
# `<tool_call>name\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>`, and `tool` turns as
# `<tool_response>` blocks after one `<|observation|>`.
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FORMAT = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML "
    "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}"
    "</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- if tools -%}<|system|>{{ '\\n' }}"
    + TOOLS_PROMPT.replace("\n", "{{ '\\n' }}")
    + "{%- for tool in tools -%}{{ tool | tojson(ensure_ascii=False) }}{{ '\\n' }}{%- endfor -%}"
    + TOOLS_FORMAT.replace("\n", "{{ '\\n' }}")
    + "{%- endif -%}"
    "{%- set thinking_off = enable_thinking is defined and not enable_thinking -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.content is string -%}{%- set text = m.content -%}{%- else -%}{%- set text = '' -%}{%- endif -%}"
    "{%- if m.role == 'system' -%}<|system|>{{ '\\n' }}{{ text }}"
    "{%- for part in (m.content if m.content is not string else []) -%}"
    "{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}"
    "{%- elif m.role == 'user' -%}<|user|>{{ '\\n' }}"
    "{%- set ns2 = namespace(last_text='') -%}"
    "{%- if m.content is string -%}{{ m.content }}{%- set ns2.last_text = m.content -%}{%- else -%}"
    "{%- for part in m.content -%}"
    "{%- if part.type in ('image', 'image_url') -%}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif part.type == 'text' -%}{{ part.text }}{%- set ns2.last_text = part.text -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if thinking_off and loop.index0 == ns.last_user and not ns2.last_text.endswith('/nothink') -%}"
    "/nothink{%- endif -%}"
    "{%- elif m.role == 'assistant' -%}<|assistant|>{{ '\\n' }}"
    "{%- if m.reasoning_content is defined and m.reasoning_content and loop.index0 > ns.last_user -%}"
    "<think>{{ m.reasoning_content }}</think>{{ '\\n' }}{%- else -%}<think></think>{{ '\\n' }}{%- endif -%}"
    "{{ text }}"
    "{%- for tc in (m.tool_calls or []) -%}{%- set f = tc.function if tc.function is defined else tc -%}"
    "{{ '\\n' }}<tool_call>{{ f.name }}{{ '\\n' }}{%- for k, v in f.arguments.items() -%}"
    "<arg_key>{{ k }}</arg_key>{{ '\\n' }}<arg_value>"
    "{{ v if v is string else v | tojson(ensure_ascii=False) }}</arg_value>{{ '\\n' }}"
    "{%- endfor -%}</tool_call>{%- endfor -%}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}<|observation|>{%- endif -%}"
    "{{ '\\n' }}<tool_response>{{ '\\n' }}{{ text }}{{ '\\n' }}</tool_response>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- if thinking_off -%}<think></think>{{ '\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# A small bilingual corpus: enough merges for real multi-token words and for Chinese characters that
# span several byte-level tokens.
CORPUS = """
The quick brown fox jumps over the lazy dog. What does this screenshot say? Is this clause present in the
contract? The invoice total is 1,234.56 dollars, due on March 3rd. Please describe the product in the photo.
A red square on a white background. A table with three columns: name, price, quantity. The answer is yes.
The document states that the warranty covers two years of normal use. Click the blue button to continue.
Error 404: page not found. Welcome to our online store! Free shipping on orders over 50 dollars.
这张图片里有什么？这是一个红色的正方形。请描述这张截图的内容。合同中是否包含这一条款？
发票总额为一千二百三十四元。产品照片显示一双白色运动鞋。表格有三列：名称、价格、数量。答案是肯定的。
文件规定保修期为两年。点击蓝色按钮继续。欢迎光临我们的网上商店！订单满五十元免运费。
图像 文字 问题 回答 模型 服务 推理 视觉 语言 中文 英文 识别 文档 屏幕 截图 价格 数量 名称
""".strip()


@dataclass(frozen=True)
class Preset:
    """Shape of a random checkpoint."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    vision_image_size: int
    vocab_target: int
    max_image_tokens: int  # per image, sets preprocessor longest_edge
    initializer_range: float


PRESETS: dict[str, Preset] = {
    # ~1 M parameters: unit tests.
    "tiny": Preset(64, 2, 4, 2, 128, (1, 1, 2), 2, 32, 2, 96, 56, 1200, 256, 0.08),
    # ~30 M parameters: CPU demos.
    "small": Preset(256, 4, 8, 2, 704, (2, 3, 3), 4, 128, 4, 512, 112, 3000, 1024, 0.04),
}


def _train_tokenizer(vocab_target: int):
    """Byte-level BPE over CORPUS; GLM special tokens appended after the learned vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    specials = list(GLM_SPECIAL_TOKENS) + list(GLM_EXTRA_TOKEN_IDS)
    tok.add_special_tokens(specials)
    return tok


def _save_tokenizer(tok, out: Path) -> dict[str, int]:
    """Write tokenizer.json / tokenizer_config.json / chat_template.jinja; return the special-token ids."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    fast.model_max_length = 131072
    fast.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return {t: tok.token_to_id(t) for t in list(GLM_SPECIAL_TOKENS) + list(GLM_EXTRA_TOKEN_IDS)}


FULL_SIZE_MAX_IMAGE_TOKENS = 6144  # GLM-4.6V-Flash's image processor: longest_edge = 2 * 28 * 28 * this


def full_size_image_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) the full-size checkpoint's image processor resizes a width x height image to, as the
    preprocessing model does (a 3840x2160 image: 2912x1624)."""
    from engine.processing.preprocess import resized_size

    limits = preprocessor_config(FULL_SIZE_MAX_IMAGE_TOKENS)
    return resized_size(
        width,
        height,
        patch=limits["patch_size"],
        merge=limits["merge_size"],
        temporal=limits["temporal_patch_size"],
        min_pixels=limits["size"]["shortest_edge"],
        max_pixels=limits["size"]["longest_edge"],
    )


def preprocessor_config(max_image_tokens: int) -> dict:
    merge_area = 28 * 28
    return {
        "image_processor_type": "Glm46VImageProcessor",
        "processor_class": "Glm46VProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "size": {"shortest_edge": 112 * 112, "longest_edge": 2 * merge_area * max_image_tokens},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }


def _glm4v_config(p: Preset, vocab_size: int, ids: dict[str, int], max_positions: int, rope_theta: float):
    from transformers import Glm4vConfig

    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": p.text_hidden,
        "intermediate_size": p.text_intermediate,
        "num_hidden_layers": p.text_layers,
        "num_attention_heads": p.text_heads,
        "num_key_value_heads": p.text_kv_heads,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "attention_bias": True,
        "initializer_range": p.initializer_range,
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": eos,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "partial_rotary_factor": 0.5,
            "mrope_section": list(p.mrope_section),
        },
    }
    vision_config = {
        "depth": p.vision_depth,
        "hidden_size": p.vision_hidden,
        "num_heads": p.vision_heads,
        "intermediate_size": p.vision_intermediate,
        "out_hidden_size": p.text_hidden,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "image_size": p.vision_image_size,
        "in_channels": 3,
        "rms_norm_eps": 1e-5,
        "initializer_range": p.initializer_range,
    }
    head_dim = p.text_hidden // p.text_heads
    if sum(p.mrope_section) * 2 != head_dim // 2:
        raise ValueError(f"mrope_section {p.mrope_section} must sum to rotary_dim/2 = {head_dim // 4}")
    cfg = Glm4vConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Glm4vForConditionalGeneration"]
    return cfg


def _write_generation_config(out: Path, ids: dict[str, int]) -> None:
    gen = {
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def make_tiny_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random GLM-4V checkpoint of `preset` ("tiny" or "small") to `out_dir`; deterministic by seed."""
    import torch
    from transformers import Glm4vForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(p.vocab_target)
    ids = _save_tokenizer(tok, out)
    cfg = _glm4v_config(p, tok.get_vocab_size(), ids, max_positions=8192, rope_theta=500000.0)
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(p.max_image_tokens), indent=2) + "\n"
    )
    _write_generation_config(out, ids)
    return out


def full_size_config(max_positions: int = 131072, rope_theta: float = 500000.0):
    """The GLM-4.6V-Flash architecture (10.3 B parameters) with the GLM-4.6V special-token ids."""
    p = Preset(4096, 40, 32, 2, 13696, (8, 12, 12), 24, 1536, 12, 13696, 336, 0, 6144, 0.02)
    ids = {t: GLM_FIRST_SPECIAL_ID + i for i, t in enumerate(GLM_SPECIAL_TOKENS)} | GLM_EXTRA_TOKEN_IDS
    return _glm4v_config(p, GLM_VOCAB_SIZE, ids, max_positions, rope_theta)


def _fill_vocabulary(model: dict, end: int) -> None:
    """Give every id from the learned vocabulary's end up to ``end`` a token of its own: lowercase words of
    three or more letters, every other one after a space (byte-level "Ġ"), never one the vocabulary already
    has. No merge leads to them, so encoding is unchanged; but a random model's tokens decode to text as
    a real 151k vocabulary's do, and a grammar engine meets as many tokens as it would with the real one."""
    vocab = model["vocab"]
    model["ignore_merges"] = False  # a word is never taken whole from the vocabulary
    letters = "abcdefghijklmnopqrstuvwxyz"
    n, next_id = 26**2, len(vocab)
    while next_id < end:
        word, k = "", n
        while k:
            k, r = divmod(k, 26)
            word = letters[r] + word
        n += 1
        token = ("\u0120" + word) if n % 2 else word
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1


def make_dummy_checkpoint(out_dir: str | Path) -> Path:
    """Write the full-size config, processor and a tokenizer with the real special-token ids; no weights.

    The byte-level BPE covers the low ids; GLM's special tokens are placed at their real ids (151329 …) so
    prompts, image placeholders and stop ids match the real checkpoint. Ids in between are filler words
    (`_fill_vocabulary`): a random model's answers decode to text, as with the real vocabulary.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(PRESETS["small"].vocab_target)
    data = json.loads(tok.to_str())
    _fill_vocabulary(data["model"], GLM_FIRST_SPECIAL_ID)
    real_ids = {t: GLM_FIRST_SPECIAL_ID + i for i, t in enumerate(GLM_SPECIAL_TOKENS)} | GLM_EXTRA_TOKEN_IDS
    for entry in data["added_tokens"]:
        new_id = real_ids[entry["content"]]
        data["model"]["vocab"][entry["content"]] = new_id
        entry["id"] = new_id
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(data))
    ids = _save_tokenizer(tok, out)
    if ids != real_ids:
        raise RuntimeError(f"special-token ids were not placed at the GLM ids: {ids}")
    cfg = full_size_config()
    cfg.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(FULL_SIZE_MAX_IMAGE_TOKENS), indent=2) + "\n"
    )
    _write_generation_config(out, ids)
    return out
