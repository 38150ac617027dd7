"""``xpuflow.runtime`` and ``xpuflow.init`` on real models on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

import xpuflow
from xpuflow.bundled import smollm2_gguf_path
from xpuflow.errors import ConfigError

CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_unknown_device_and_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known devices"):
        xpuflow.runtime("cuda:7")
    rt = xpuflow.runtime("cpu", store=None)
    try:
        with pytest.raises(ConfigError, match="does not exist"):
            rt.load_model(tmp_path / "missing.gguf")
        odd = tmp_path / "weights.bin"
        odd.write_bytes(b"\0" * 16)
        with pytest.raises(ConfigError, match="cannot tell the format"):
            rt.load_model(odd)
        with pytest.raises(ConfigError, match="load_model"):
            rt.chat(CAPITAL)
    finally:
        rt.close()


@pytest.mark.slow
def test_acceptance_auto_runtime_answers_paris(tmp_path: Path) -> None:
    from xpuflow.artifacts.store import ArtifactStore

    rt = xpuflow.runtime("auto", store=ArtifactStore(tmp_path / "store"))
    try:
        rt.load_model(smollm2_gguf_path())
        reply = rt.chat(CAPITAL, max_tokens=16)
        assert isinstance(reply, str)
        assert "Paris" in reply
        assert rt.device == "cpu"
        assert rt.models[next(iter(rt.models))].backend == "llamacpp"
        text = rt.generate("The capital of France is", max_tokens=8)
        assert isinstance(text, str)
        assert text
        rt.switch("cpu")  # models move with the runtime; still answer the same way
        assert rt.chat(CAPITAL, max_tokens=16) == reply
    finally:
        rt.close()


@pytest.mark.slow
def test_init_places_unchanged_from_pretrained_code(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")

    original = transformers.PreTrainedModel.__dict__["from_pretrained"].__func__
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    device = xpuflow.init(device="auto")
    try:
        assert device == torch.device("cpu")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
        assert type(model) is transformers.LlamaForCausalLM  # the real class, no proxy
        assert model.device == device
        # sampling defaults are what transformers gives without the hook
        assert model.generation_config.to_dict() == plain.generation_config.to_dict()
    finally:
        xpuflow.deinit()
    assert transformers.PreTrainedModel.__dict__["from_pretrained"].__func__ is original
