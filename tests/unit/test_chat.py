"""modeling.chat.render_prompt on a character tokenizer whose ids are known: strings as the tokenizer encodes
them, chat messages through a chat template given here, system prompts, template kwargs, and the errors.
The real SmolLM2 template is checked in tests/integration/test_smollm2.py."""

from __future__ import annotations

import pytest

from common.tasks import ADDITION_CHARS, TaskError
from modeling import ChatTemplateError, build_char_tokenizer, render_prompt

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}|{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant|{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}nothink|{% endif %}"
)


@pytest.fixture
def tok():
    t = build_char_tokenizer(ADDITION_CHARS + " abcdefghijklmnopqrstuvwxyz|")
    t.chat_template = TEMPLATE
    return t


def chars(tok, *parts: str) -> list[int]:
    """Ids of the parts: "<s>" and "</s>" as their special tokens, anything else one id per character."""
    out = []
    for p in parts:
        out += [tok.convert_tokens_to_ids(p)] if p in ("<s>", "</s>") else tok.convert_tokens_to_ids(list(p))
    return out


def test_a_string_is_tokenised_as_is(tok):
    assert render_prompt(tok, "12+34=") == chars(tok, "12+34=") == tok("12+34=").input_ids
    assert render_prompt(tok, "12+34=", add_special_tokens=False) == chars(tok, "12+34=")


def test_a_string_gets_the_special_tokens_the_tokenizer_adds_by_default(tok):
    from tokenizers.processors import TemplateProcessing

    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert render_prompt(tok, "1+2=") == [1, *chars(tok, "1+2=")]  # a BOS, as Llama-3's tokenizer adds
    assert render_prompt(tok, "1+2=", add_special_tokens=False) == chars(tok, "1+2=")


def test_messages_go_through_the_chat_template(tok):
    msgs = [{"role": "user", "content": "1+2="}]
    want = chars(tok, "<s>", "user|1+2=", "</s>", "<s>", "assistant|")
    assert render_prompt(tok, msgs) == want
    assert render_prompt(tok, msgs) == tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert render_prompt(tok, msgs, add_special_tokens=False) == want  # the template places special tokens
    assert render_prompt(tok, msgs, chat_template_kwargs={"add_generation_prompt": False}) == want[:-11]


def test_system_prompt_is_prepended_only_when_there_is_none(tok):
    user = {"role": "user", "content": "1+2="}
    got = render_prompt(tok, [user], system_prompt="be brief")
    assert got == chars(
        tok, "<s>", "system|be brief", "</s>", "<s>", "user|1+2=", "</s>", "<s>", "assistant|"
    )
    own = [{"role": "system", "content": "no"}, user]
    assert render_prompt(tok, own, system_prompt="be brief") == render_prompt(tok, own)


def test_template_kwargs_are_passed_through(tok):
    msgs = [{"role": "user", "content": "1+2="}]
    got = render_prompt(tok, msgs, chat_template_kwargs={"enable_thinking": False})
    assert got == render_prompt(tok, msgs) + chars(tok, "nothink|")
    assert render_prompt(tok, msgs, chat_template_kwargs={"enable_thinking": True}) == render_prompt(
        tok, msgs
    )
    with pytest.raises(ChatTemplateError, match="may not set 'tokenize'"):
        render_prompt(tok, msgs, chat_template_kwargs={"tokenize": False})


def test_errors(tok):
    plain = build_char_tokenizer()
    assert not getattr(plain, "chat_template", None)
    with pytest.raises(
        ChatTemplateError, match="list of chat messages but the tokenizer .* has no chat template"
    ):
        render_prompt(plain, [{"role": "user", "content": "1+2="}])
    with pytest.raises(ChatTemplateError, match="system_prompt applies to chat prompts"):
        render_prompt(tok, "1+2=", system_prompt="be brief")
    with pytest.raises(TaskError, match="message 0 needs a string 'role'"):
        render_prompt(tok, [{"content": "1+2="}])
    with pytest.raises(TaskError):
        render_prompt(tok, [])


def test_the_producer_tokenises_a_task_as_its_fields_say(tok):
    """producer/intake.py: a text task with the tokenizer's default special tokens unless add_special_tokens says,
    a chat task through the template with its template arguments."""
    from types import SimpleNamespace

    from tokenizers.processors import TemplateProcessing

    from common.wire import PromptTask
    from producer.intake import Intake

    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    me = SimpleNamespace(tokenizer=tok)
    text = PromptTask(task_id="t", prompt="1+2=", task="addition")
    assert Intake._tokenize(me, text) == [1, *chars(tok, "1+2=")]  # like Llama-3: the BOS it adds by default
    no_bos = PromptTask(task_id="t", prompt="1+2=", task="addition", add_special_tokens=False)
    assert Intake._tokenize(me, no_bos) == chars(tok, "1+2=")
    chat = PromptTask(
        task_id="t",
        prompt="",
        task="addition",
        messages=({"role": "user", "content": "1+2="},),
        chat_template_kwargs={"enable_thinking": False},
    )
    assert Intake._tokenize(me, chat) == chars(
        tok, "<s>", "user|1+2=", "</s>", "<s>", "assistant|", "nothink|"
    )
