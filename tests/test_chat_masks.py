"""Loss masks checked token by token against hand-written expectations, for four template families."""

import pytest

from spec_lightning.datamodules.chat import tokenize_conversation
from tests.chat_templates import tokenizer_for

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke"},
    {"role": "assistant", "content": "Why did the chicken cross the road?"},
]

# (text, trainable) segments of the rendered conversation, written by hand from each template's format.
EXPECTED = {
    "chatml": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Hello! How can I help?<|im_end|>", 1),
        ("\n<|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Why did the chicken cross the road?<|im_end|>", 1),
        ("\n", 0),
    ],
    "llama3": [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\x00\n", 0),
        ("Hello! How can I help?<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\nTell me a joke<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\x00\n", 0),
        ("Why did the chicken cross the road?<|eot_id|>", 1),
    ],
    "mistral": [
        ("<s> [INST] Be brief.\n\nHi there [/INST]", 0),
        (" Hello! How can I help?</s>", 1),
        (" [INST] Tell me a joke [/INST]", 0),
        (" Why did the chicken cross the road?</s>", 1),
    ],
    "gemma": [
        ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n", 0),
        ("Hello! How can I help?<end_of_turn>", 1),
        ("\n<start_of_turn>user\nTell me a joke<end_of_turn>\n<start_of_turn>model\n", 0),
        ("Why did the chicken cross the road?<end_of_turn>", 1),
        ("\n", 0),
    ],
}


CUT = "\x00"  # marks where BPE pre-tokenisation splits inside a segment ("\n\nb" -> "\n", "\n", "b")


def expected_ids_and_mask(tok, segments):
    ids, mask = [], []
    for text, flag in segments:
        for piece in text.split(CUT):
            seg = tok(piece, add_special_tokens=False)["input_ids"]
            ids += seg
            mask += [flag] * len(seg)
    return ids, mask


def rendered(segments):
    return "".join(t for t, _ in segments).replace(CUT, "")


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_loss_mask_token_by_token(family):
    tok = tokenizer_for(family)
    segments = EXPECTED[family]
    # the hand-written segments are exactly the template's rendering
    assert tok.apply_chat_template(CONV, tokenize=False) == rendered(segments)
    ids, mask = expected_ids_and_mask(tok, segments)
    got = tokenize_conversation(tok, CONV)
    assert got.input_ids == ids
    assert got.loss_mask == mask
    # the end-of-turn token of every assistant turn is trainable
    assert sum(mask) == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t, f in segments if f)
    assert got.input_ids == tok(rendered(segments), add_special_tokens=False)["input_ids"]


def test_chatml_default_system_prompt_is_not_trainable():
    tok = tokenizer_for("chatml")
    conv = CONV[1:3]
    got = tokenize_conversation(tok, conv)
    text = tok.apply_chat_template(conv, tokenize=False)
    prefix, rest = text.split("<|im_start|>assistant\n")
    segments = [(prefix + "<|im_start|>assistant\n", 0), ("Hello! How can I help?<|im_end|>", 1), ("\n", 0)]
    assert rest == "Hello! How can I help?<|im_end|>\n" and "You are a helpful AI assistant" in prefix
    assert (got.input_ids, got.loss_mask) == expected_ids_and_mask(tok, segments)


def test_llama3_without_system_and_three_turns():
    tok = tokenizer_for("llama3")
    conv = [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"},
        {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"},
        {"role": "user", "content": "f"}, {"role": "assistant", "content": "g h i"},
    ]
    h = "<|start_header_id|>{}<|end_header_id|>\n\x00\n"
    segments = [
        ("<|begin_of_text|>" + h.format("user") + "a<|eot_id|>" + h.format("assistant"), 0), ("b c<|eot_id|>", 1),
        (h.format("user") + "d<|eot_id|>" + h.format("assistant"), 0), ("e<|eot_id|>", 1),
        (h.format("user") + "f<|eot_id|>" + h.format("assistant"), 0), ("g h i<|eot_id|>", 1),
    ]
    got = tokenize_conversation(tok, conv)
    assert (got.input_ids, got.loss_mask) == expected_ids_and_mask(tok, segments)


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma"])
def test_assistant_first_conversation_trains_only_assistant_content(family):
    tok = tokenizer_for(family)
    conv = [{"role": "assistant", "content": "Welcome back!"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "How can I help?"}]
    try:
        text = tok.apply_chat_template(conv, tokenize=False)
    except Exception:  # a template that refuses this order: the data module skips and counts the sample
        pytest.skip(f"{family} template refuses an assistant-first conversation")
    got = tokenize_conversation(tok, conv)
    trained = tok.decode([t for t, m in zip(got.input_ids, got.loss_mask, strict=True) if m])
    eot = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}[family]
    assert trained == f"Welcome back!{eot}How can I help?{eot}", text
    # the injected system prompt and role headers stay untrained
    assert "assistant" not in trained and "system" not in trained and "model\n" not in trained
