"""Rendering a Hugging Face ``chat_template`` (Jinja) for checkpoints that ship one.

V4 ships none (spec/serving.md §6); this is for other checkpoints and for users who pass a template.
jinja2 is imported only when a template is rendered, so the package does not need it otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from .encoding import ChatFormatError


def _raise_exception(message: str):
    raise ChatFormatError(f"chat_template: {message}")


def render_jinja(template: str, messages, *, add_generation_prompt: bool = True, tools=None,
                 bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """Render ``template`` the way transformers' apply_chat_template does (sandboxed, trim/lstrip blocks).

    Extra keyword arguments (e.g. ``enable_thinking``) become template variables."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=bos_token, eos_token=eos_token, **kwargs)
    except ChatFormatError:
        raise
    except jinja2.TemplateError as e:
        raise ChatFormatError(f"chat_template: {type(e).__name__}: {e}") from e


def load_chat_template(checkpoint_dir) -> str | None:
    """The ``chat_template`` from ``tokenizer_config.json`` in ``checkpoint_dir``, or None.

    The field may be a string or a list of ``{"name", "template"}`` (the one named "default" is taken)."""
    path = Path(checkpoint_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None
    template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
    return None
