"""A thinking model's reasoning comes back as `reasoning_content`, apart from the content,
streamed and not (vLLM's deepseek_r1 style: the template opens <think>). The tiny model is made
to think by a grammar: it must write three letters, `</think>`, three letters."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from mell_cluster import LocalCluster, start_cluster

from mell.common.tiny_model import ensure_tiny_model

pytestmark = pytest.mark.slow
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{{ m.content.split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
FORCE = {"guided_regex": "[a-z]{3}</think>[a-z]{3}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    root = tmp_path_factory.mktemp("thinking")
    tiny = ensure_tiny_model(root / "mell-tiny")
    model = Path(shutil.copytree(tiny, root / "thinker"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    cluster: LocalCluster = start_cluster(
        root / "data", "--model", str(model), "--workers", "1", "--device", "cpu"
    )
    yield openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)
    cluster.stop()


def test_reasoning_content_apart(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Think first."}]
    full = client.chat.completions.create(
        model="thinker", messages=messages, max_tokens=20, temperature=0, extra_body=FORCE
    )
    message = full.choices[0].message
    reasoning = message.model_extra["reasoning_content"]  # type: ignore[index]
    assert len(reasoning) == 3 and reasoning.isalpha()
    assert len(message.content or "") == 3 and "</think>" not in (message.content or "")
    thought, said = "", ""
    for chunk in client.chat.completions.create(
        model="thinker",
        messages=messages,
        max_tokens=20,
        temperature=0,
        extra_body=FORCE,
        stream=True,
    ):
        for c in chunk.choices:
            thought += (c.delta.model_extra or {}).get("reasoning_content") or ""
            said += c.delta.content or ""
    assert (thought, said) == (reasoning, message.content)
    hidden = client.chat.completions.create(
        model="thinker",
        messages=messages,
        max_tokens=20,
        temperature=0,
        extra_body={**FORCE, "include_reasoning": False},
    )
    assert hidden.choices[0].message.content == message.content
    assert hidden.choices[0].message.model_extra["reasoning_content"] == ""  # type: ignore[index]
