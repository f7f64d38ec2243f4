"""Chat templates render as Hugging Face renders them, sandboxed; errors are 400s."""

from __future__ import annotations

from pathlib import Path

import pytest

from mell.common.errors import InvalidRequest
from mell.gateway.api.chat_template import ChatTemplate


def test_tiny_model_chatml(tiny_dir: Path) -> None:
    template = ChatTemplate.load(tiny_dir)
    assert template is not None
    text = template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_trim_blocks_loopcontrols_tojson() -> None:
    source = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{{ m | tojson }}\n{% endfor %}"
    )
    out = ChatTemplate(source).render([{"role": "user", "content": "é"}, {"role": "x"}])
    assert out == '{"role": "user", "content": "é"}\n'


def test_raise_exception_is_a_client_error() -> None:
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        template.render([])


def test_sandbox_blocks_unsafe_access() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequest):
        template.render([])


def test_template_from_jinja_file_and_named_list(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0].content }}")
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": {"content": "<s>"}}')
    template = ChatTemplate.load(tmp_path)
    assert template is not None and template.render([{"content": "x"}]) == "<s>x"
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "tool_use", "template": "T"},'
        ' {"name": "default", "template": "D"}]}'
    )
    assert ChatTemplate.load(tmp_path).render([]) == "D"  # type: ignore[union-attr]
