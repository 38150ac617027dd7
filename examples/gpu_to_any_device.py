"""From GPU-only code to whatever device is best or available: the two-line migration.

BEFORE (runs only where CUDA exists)::

    model = AutoModelForCausalLM.from_pretrained(path).to("cuda")
    inputs = tokenizer(prompt, return_tensors="pt").to("cuda")
    output = model.generate(**inputs, max_new_tokens=16)

AFTER, with transformers code kept as it is (``xpuflow.init`` places every ``from_pretrained`` on the
advised device; the model object is the real one, sampling defaults untouched)::

    import xpuflow
    device = xpuflow.init(device="auto")                      # line 1
    model = AutoModelForCausalLM.from_pretrained(path)        # unchanged
    inputs = tokenizer(prompt, return_tensors="pt").to(device)  # line 2: "cuda" -> device

OR, with no torch code at all, any backend on any device (GGUF via llama.cpp, ONNX, NPUs)::

    rt = xpuflow.runtime("auto")
    rt.load_model(path_to_gguf)
    rt.chat([{"role": "user", "content": "..."}], max_tokens=16)

Run ``python examples/gpu_to_any_device.py``: it runs both AFTER forms on the bundled SmolLM2 model (the
first through the GGUF -> safetensors artifact the transformers backend builds and caches).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import xpuflow
from xpuflow.bundled import smollm2_gguf_path

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def with_runtime() -> str:
    rt = xpuflow.runtime("auto")
    try:
        rt.load_model(smollm2_gguf_path())
        reply = rt.chat(QUESTION, max_tokens=16)
        print(f"runtime: device={rt.device} reply={reply!r}")
        return reply
    finally:
        rt.close()


def with_unchanged_transformers_code() -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xpuflow.artifacts import ArtifactStore, build_all
    from xpuflow.backends.base import ModelConfig
    from xpuflow.backends.transformers.plugin import TransformersPlugin

    # A Hugging Face folder to load: the dequantised SmolLM2 the transformers backend caches.
    cpu = xpuflow.detect().cpu
    assert cpu is not None
    config = ModelConfig("smollm2", smollm2_gguf_path(), "chat")
    folder = build_all(TransformersPlugin(), [cpu], config, ArtifactStore())["gguf-dequant"].path

    device = xpuflow.init(device="auto")  # line 1 of the migration
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)  # unchanged: lands on `device`
        text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt").to(device)  # line 2: was .to("cuda")
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"transformers: device={model.device} reply={reply!r}")
        return reply
    finally:
        xpuflow.deinit()


if __name__ == "__main__":
    replies = [with_runtime(), with_unchanged_transformers_code()]
    sys.exit(0 if all("Paris" in r for r in replies) else 1)
