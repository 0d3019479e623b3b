"""Prompt rendering: a dataset row's prompt (``common.tasks.Prompt``: a string, or chat messages in TRL's
conversational format) to the token ids a model is sampled from.

Both services use it (the producer to tokenise a task, the learner or tools to render the same prompt), so it
lives in the shared torch-side package and imports neither service.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.tasks import Prompt, check_prompt


class ChatTemplateError(ValueError):
    """A chat prompt for a tokenizer without a chat template, or a system prompt that cannot apply."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(out: Any) -> list[int]:
    """The token ids of one rendered conversation, whatever shape this transformers version returns."""
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        if len(out) != 1:
            raise ValueError(f"expected one rendered conversation, got {len(out)}")
        out = out[0]
    return [int(t) for t in out]


def render_prompt(
    tokenizer: Any,
    prompt: Prompt,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    add_special_tokens: bool | None = None,
) -> list[int]:
    """Token ids of ``prompt`` for ``tokenizer``.

    - A string is tokenised as is, no template: with the special tokens the tokenizer adds by default (e.g. a
      BOS for Llama-3, nothing for Qwen or SmolLM2), or as ``add_special_tokens`` says when it is given.
    - A message list ``[{"role": ..., "content": ...}, ...]`` is rendered with the tokenizer's chat template,
      ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``: the template places its own
      special tokens (``add_special_tokens`` does not apply). ``system_prompt`` is prepended as a system message
      when the list has none; ``chat_template_kwargs`` go to the template (e.g. ``{"enable_thinking": False}``
      for Qwen3, or ``{"add_generation_prompt": False}`` to override the default).

    Raises ChatTemplateError for a message list when the tokenizer has no chat template, and for a
    ``system_prompt`` with a string prompt (a system prompt needs a chat template: give chat prompts);
    TaskError for a malformed prompt."""
    prompt = check_prompt(prompt)
    if isinstance(prompt, str):
        if system_prompt:
            raise ChatTemplateError(
                "system_prompt applies to chat prompts (lists of messages) only, and this prompt is a string"
            )
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return _ids(tokenizer(prompt, **kw)["input_ids"])
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"the prompt is a list of chat messages but the tokenizer ({name}) has no chat template: give string "
            "prompts, or a tokenizer with one (tokenizer.chat_template / chat_template.jinja in the model dir)"
        )
    messages: Sequence[Mapping[str, Any]] = prompt
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    kwargs = {"add_generation_prompt": True, **dict(chat_template_kwargs or {})}
    for reserved in ("tokenize", "return_dict", "conversation"):
        if reserved in kwargs:
            raise ChatTemplateError(f"chat_template_kwargs may not set {reserved!r}")
    return _ids(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=False, **kwargs))
