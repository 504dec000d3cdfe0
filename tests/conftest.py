"""Shared test fixtures: tiny random Llama targets built in code (nothing loads from a hub)."""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(num_layers: int = 6, hidden: int = 32, vocab: int = 128, heads: int = 4, kv_heads: int = 2,
                    seed: int = 0, tie: bool = False, max_pos: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
        rope_theta=50000.0, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).float().eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def real_cache_root():
    """The user's cache directory (``SPEC_LIGHTNING_CACHE`` or the default), read before any test isolates it."""
    from spec_lightning.targets import cache_root

    return cache_root()


@pytest.fixture(scope="session")
def isolated_cache_root(tmp_path_factory, real_cache_root):
    """The session's cache root: tokenised-data and vocab caches start empty; the converted builtin target is the
    user's (linked, so it is converted once per machine, not once per session)."""
    root = tmp_path_factory.getbasetemp() / "spec_cache"
    root.mkdir(exist_ok=True)
    (real_cache_root / "targets").mkdir(parents=True, exist_ok=True)
    (root / "targets").symlink_to(real_cache_root / "targets", target_is_directory=True)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(isolated_cache_root, monkeypatch):
    """Every test sees the session's isolated cache root."""
    monkeypatch.setenv("SPEC_LIGHTNING_CACHE", str(isolated_cache_root))


@pytest.fixture(autouse=True)
def _hf_engine_unless_vllm_test(request, monkeypatch):
    """Data generation runs on HF in the fast suite whether or not vLLM is installed (an engine start costs ~2 min);
    ``@pytest.mark.vllm`` tests choose vLLM themselves."""
    if request.node.get_closest_marker("vllm") is None:
        monkeypatch.setenv("SPEC_LIGHTNING_ENGINE", "hf")


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory):
    """A HF directory with a tiny random Llama that uses SmolLM2's tokenizer (CLI tests load it by path)."""
    from spec_lightning.targets import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = make_tiny_llama(num_layers=6, hidden=32, vocab=len(tok), heads=4, kv_heads=2, max_pos=512)
    out = tmp_path_factory.mktemp("tiny_target")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_file(tmp_path_factory):
    """A small OpenAI-shape JSONL chat file."""
    import json

    out = tmp_path_factory.mktemp("chat") / "chats.jsonl"
    rows = []
    for i in range(24):
        rows.append({"id": f"s{i}", "messages": [
            {"role": "user", "content": f"Tell me about number {i}."},
            {"role": "assistant", "content": f"The number {i} comes after {i - 1} and before {i + 1}."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
        ]})
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a shared 2-core machine thread hand-offs cost more than the maths."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
