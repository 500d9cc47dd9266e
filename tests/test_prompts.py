"""Prompt formats and the encoder of decoder-only backbones, on the real stories260K tokenizer: only inputs are
truncated, template positions are protected, chat templates render as the tokenizer renders them, training rows
hold prompt and answer, label words are scored by their first tokens."""

from __future__ import annotations

import pytest

from rlskip.encoding import Encoder, Text
from rlskip.prompts import PromptFormat, Prompter

from paths import STORIES_DIR

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DOC = "Once upon a time there was a little girl named Lily. She loved to play in the park with her dog."


@pytest.fixture(scope="module")
def tokenizer():
    if not (STORIES_DIR / "tokenizer.json").is_file():
        pytest.skip(f"stories260K not found at {STORIES_DIR}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES_DIR))


def test_plain_prompt_keeps_the_template_and_protects_it(tokenizer):
    p = Prompter(tokenizer, PromptFormat("Summarize this story.\n\n{input}\nSummary:"))
    ids, cut = p.encode(DOC, None, 200, "longest_first")
    assert not cut and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("Summarize this story.")
    assert DOC in tokenizer.decode(ids, skip_special_tokens=True)
    # exactly the input's tokens are droppable
    assert tokenizer.decode(free_ids(ids)).strip() == DOC
    assert ids == tokenizer(f"Summarize this story.\n\n{DOC}\nSummary:")["input_ids"]  # as the tokenizer sees the prompt
    overhead = len(ids.protected)
    short, cut = p.encode(DOC, None, overhead + 5, "longest_first")
    assert cut and len(short) == overhead + 5 and [short[i] for i in range(len(short)) if i not in set(short.protected)] == free_ids(ids)[:5]
    with pytest.raises(ValueError, match="the prompt template alone takes"):
        p.encode(DOC, None, overhead, "longest_first")


def test_chat_prompt_renders_as_the_tokenizer_does(tokenizer):
    tokenizer = _with_chat(tokenizer)
    fmt = PromptFormat("Summarize this story.\n\n{input}", chat=True)
    ids, _ = Prompter(tokenizer, fmt).encode(DOC, None, 300, "longest_first")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Summarize this story.\n\n{DOC}"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(ids) == rendered
    assert Prompter(tokenizer, fmt).answer_prefix == ""
    with pytest.raises(ValueError, match="the tokenizer has none"):
        Prompter(_without_chat(tokenizer), fmt)


def test_pairs_truncate_the_second_part_and_refuse_the_wrong_shape(tokenizer):
    fmt = PromptFormat("Context: {pair}\nQuestion: {input}\nAnswer:")
    p = Prompter(tokenizer, fmt)
    question = "Who was named Lily?"
    ids, cut = p.encode(question, DOC * 5, 80, "only_second")
    assert cut and len(ids) == 80 and question in tokenizer.decode(ids, skip_special_tokens=True)
    ids, _ = p.encode(DOC * 3, DOC * 3, 80, "longest_first")
    assert len(ids) == 80
    with pytest.raises(ValueError, match="takes a text pair"):
        p.encode(question, None, 80, "only_second")
    with pytest.raises(ValueError, match="one \\{input\\}"):
        PromptFormat("no placeholder")


def test_decoder_only_training_rows_hold_prompt_and_answer(tokenizer):
    enc = Encoder(tokenizer, 64, prompt=PromptFormat("Story: {input}\nSummary:"), causal=True, max_target_tokens=8)
    ex = [_Example("Lily went to the park.", "Lily played."), _Example("A big red ball.", "A ball.")]
    ids, mask, protected, labels = enc.training_batch(ex)
    prompts, _ = enc.inputs(ex)
    for i, (prompt, e) in enumerate(zip(prompts, ex)):
        n = int(mask[i].sum())
        answer = labels[i][labels[i] != -100].tolist()
        assert ids[i, len(prompt) : n].tolist() == answer and answer[-1] == tokenizer.eos_token_id
        assert (labels[i, : len(prompt)] == -100).all()
        assert protected[i, len(prompt) : n].all()  # the answer is never dropped
        assert not protected[i, : len(prompt)].all()  # the input is
    with pytest.raises(ValueError, match="needs a prompt format"):
        Encoder(tokenizer, 64, causal=True)


def test_label_words_are_scored_by_their_first_tokens(tokenizer):
    enc = Encoder(tokenizer, 64, prompt=PromptFormat("{input}\nAnswer:"), causal=True)
    ids = enc.label_token_ids(["yes", "no"])
    for word, tok in zip(["yes", "no"], ids):  # the token the answer starts with, as tokenised after the prompt
        prompt = tokenizer("x\nAnswer:")["input_ids"]
        full = tokenizer("x\nAnswer: " + word)["input_ids"]
        assert full[: len(prompt)] == prompt and full[len(prompt)] == tok
        assert word.startswith(tokenizer.decode([tok]).strip())
    with pytest.raises(ValueError, match="do not start with distinct tokens"):
        enc.label_token_ids(["house", "houses"])
    with pytest.raises(ValueError, match="empty"):
        enc.inputs([Text("  ")])


def free_ids(ids):
    return [t for i, t in enumerate(ids) if i not in set(ids.protected)]


class _Example:
    def __init__(self, source, target):
        self.source, self.source_pair, self.targets = source, None, (target,)


def _with_chat(tokenizer):
    import copy

    t = copy.deepcopy(tokenizer)
    t.chat_template = CHATML
    return t


def _without_chat(tokenizer):
    import copy

    t = copy.deepcopy(tokenizer)
    t.chat_template = None
    return t
