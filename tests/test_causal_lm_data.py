"""causal-lm data handling, in-process: which tokens carry the loss in each format, truncation, and packing
that lets no attention or position cross an example boundary (a packed row's logits equal each example's
logits computed alone)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="causal-lm needs the nlp extra: pip install 'kubetrain[nlp]'")

import torch  # noqa: E402

from trainer.errors import UserError  # noqa: E402
from trainer.tasks._llm_data import (IGNORE, CausalCollate, Tokenize, WithLengths, detect_format, pack,  # noqa: E402
                                     tokenize_rows)
from trainer.tasks.causal_lm import save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def labelled(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


def test_chat_rows_put_the_loss_on_the_assistant_turns_only(tiny):
    _, tokenizer = tiny
    row = {"messages": [{"role": "user", "content": "what comes after two ?"},
                        {"role": "assistant", "content": "three"},
                        {"role": "user", "content": "and after nine ?"},
                        {"role": "assistant", "content": "ten"}]}
    example = Tokenize(tokenizer, "chat", 256, False, "k")(row, 0)
    assert labelled(tokenizer, example) == "three<|end|>ten<|end|>"
    everything = Tokenize(tokenizer, "chat", 256, True, "k")(row, 0)
    assert all(t != IGNORE for t in everything.labels)
    assert detect_format([row], "k") == "chat"


def test_prompt_completion_and_text_rows(tiny):
    _, tokenizer = tiny
    pc = Tokenize(tokenizer, "prompt-completion", 256, False, "k")({"prompt": "one two", "completion": " three"}, 0)
    assert labelled(tokenizer, pc) == " three<|end|>"
    text = Tokenize(tokenizer, "text", 256, False, "k")({"text": "one two three"}, 0)
    assert labelled(tokenizer, text) == "one two three<|end|>"
    with pytest.raises(UserError, match=r"columns \['question'\]: expected `messages`"):
        detect_format([{"question": "x"}], "training.data.path")


def test_long_rows_are_truncated_and_counted(tiny):
    _, tokenizer = tiny
    tokenize = Tokenize(tokenizer, "text", 8, False, "k")
    examples = tokenize_rows([{"text": "one two"}, {"text": " ".join(["seven"] * 30)}], tokenize)
    assert tokenize.truncated == 1 and max(len(e.input_ids) for e in examples) == 8


def test_packed_examples_see_only_themselves(tiny):
    """Three examples packed into one row of 24 tokens: each one's logits equal its logits alone, so
    neither attention nor positions leak across the boundaries."""
    model, tokenizer = tiny
    rows = [{"text": "what comes after two ?"}, {"text": "one two three four"}, {"text": "say the number"}]
    examples = tokenize_rows(rows, Tokenize(tokenizer, "text", 24, False, "k"))
    packed = pack(examples, 24, tokenizer.pad_token_id, seed=0)
    assert len(packed) == 1 and sum(packed.packed[0]) == 24
    inputs, labels = CausalCollate(tokenizer.pad_token_id)([WithLengths(packed)[0]])
    with torch.no_grad():
        together = model(**inputs).logits[0]
        start = 0
        for length in packed.packed[0][:len(examples)]:
            ids = inputs["input_ids"][:, start:start + length]
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(together[start:start + length], alone, rtol=1e-4, atol=1e-4)
            start += length
    # With a KV cache transformers ignores the packing: the same check then fails, so it can.
    with torch.no_grad():
        unpacked = model(**{**inputs, "use_cache": True}).logits[0]
    assert not torch.allclose(unpacked, together, atol=1e-3)
