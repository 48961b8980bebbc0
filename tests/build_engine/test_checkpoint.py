"""The generated checkpoints load in transformers exactly like the real GLM-4.6V-Flash layout."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Glm4vForConditionalGeneration

from build_engine.checkpoint import (
    GLM_EXTRA_TOKEN_IDS,
    full_size_config,
    make_dummy_checkpoint,
    make_tiny_checkpoint,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


def test_tiny_loads_in_transformers(tiny):
    model = Glm4vForConditionalGeneration.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image|>")
    assert cfg.image_start_token_id == tok.convert_tokens_to_ids("<|begin_of_image|>")
    assert cfg.text_config.eos_token_id == [
        tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
    ]
    assert cfg.text_config.vocab_size == len(tok)
    rope = cfg.text_config.rope_parameters
    assert rope["partial_rotary_factor"] == 0.5
    assert (
        sum(rope["mrope_section"]) * 4 == cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    )
    assert AutoImageProcessor.from_pretrained(tiny).merge_size == 2


def test_tiny_is_deterministic(tiny, tmp_path):
    again = make_tiny_checkpoint(tmp_path, "tiny", seed=0)
    assert (again / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_text() == (tiny / "tokenizer.json").read_text()


def test_chat_template_renders_glm46v_layout(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}
    ]
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    image = "<|begin_of_image|><|image|><|end_of_image|>"
    assert on == f"[gMASK]<sop><|user|>\n{image}What is in this image?<|assistant|>\n"
    assert (
        off == f"[gMASK]<sop><|user|>\n{image}What is in this image?/nothink<|assistant|>\n<think></think>\n"
    )


def test_tokenizer_splits_rare_chinese_into_bytes(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok.encode("鑫", add_special_tokens=False)
    assert len(ids) == 3  # one UTF-8 byte per token
    assert tok.decode(ids) == "鑫"


def test_dummy_has_real_glm_ids(tmp_path):
    out = make_dummy_checkpoint(tmp_path)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.image_token_id == 151363 == tok.convert_tokens_to_ids("<|image|>")
    assert tok.convert_tokens_to_ids("[gMASK]") == 151331
    assert tok.convert_tokens_to_ids("</think>") == GLM_EXTRA_TOKEN_IDS["</think>"]
    assert cfg.text_config.eos_token_id == [151329, 151336, 151338]
    assert not list(out.glob("*.safetensors"))
    assert json.loads((out / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 9633792


def test_dummy_ids_below_the_specials_decode_to_text_and_encoding_is_unchanged(tmp_path):
    """Every id under the first special one decodes to its own non-empty text (a random model writes text,
    and a grammar engine sees a full vocabulary); the filler words never come out of encoding."""
    from tokenizers import Tokenizer

    from build_engine.checkpoint import GLM_FIRST_SPECIAL_ID, PRESETS, _train_tokenizer

    tok = Tokenizer.from_file(str(make_dummy_checkpoint(tmp_path) / "tokenizer.json"))
    learned = _train_tokenizer(PRESETS["small"].vocab_target)
    start = len(json.loads(learned.to_str())["model"]["vocab"])  # the learned ids (specials come after)
    texts = [tok.decode([i]) for i in range(GLM_FIRST_SPECIAL_ID)]
    assert all(texts)
    fillers = texts[start:]
    assert len(set(fillers)) == len(fillers) == GLM_FIRST_SPECIAL_ID - start
    assert fillers[:2] == [" baa", "bab"] and all(re.fullmatch(" ?[a-z]{3,}", t) for t in fillers)
    sample = "Describe this screenshot: abc the quick brown fox, 发票号码 INV-2024 abb aba"
    assert tok.encode(sample).ids == learned.encode(sample).ids


def test_full_size_parameter_count():
    with torch.device("meta"):
        model = Glm4vForConditionalGeneration(full_size_config())
    assert sum(p.numel() for p in model.parameters()) == 10_292_777_472
