"""vLLM's parser layer on the demo model's tokenizer: reasoning and tool calls split as `vllm serve` does."""

import pytest
from support import MODEL_DIR

from worker.protocol.tools import ToolSet, ToolSpec

LOOK = ToolSpec("look", "Look.", '{"type": "object", "properties": {"d": {"type": "string"}}}')


@pytest.fixture(scope="module")
def tokenizer():
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip("the demo model is not prepared (make model)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_a_reasoning_parser_splits_reasoning_off_the_content(tokenizer):
    from worker.engine.vllm_parsing import OutputParsing

    parsing = OutputParsing(tokenizer, None, "qwen3")
    parsed = parsing.parse(parsing.prepare(None), "<think>the exit is east</think>Go east.")
    assert (parsed.reasoning, parsed.content, parsed.calls) == ("the exit is east", "Go east.", ())


def test_tool_and_reasoning_parsers_compose(tokenizer):
    from worker.engine.vllm_parsing import OutputParsing

    parsing = OutputParsing(tokenizer, "hermes", "qwen3")
    prepared = parsing.prepare(ToolSet((LOOK,)))
    text = '<think>look first</think><tool_call>\n{"name": "look", "arguments": {"d": "n"}}\n</tool_call>'
    parsed = parsing.parse(prepared, text)
    assert parsed.reasoning == "look first"
    assert [(c.name, c.arguments) for c in parsed.calls] == [("look", '{"d": "n"}')]


def test_a_forced_choice_asks_vllm_for_a_structural_tag(tokenizer):
    from worker.engine.vllm_parsing import OutputParsing

    parsing = OutputParsing(tokenizer, "hermes", None)
    assert parsing.prepare(ToolSet((LOOK,), "required", "look")).structured_outputs.structural_tag
    assert parsing.prepare(ToolSet((LOOK,))).structured_outputs is not None  # strict level "parameter"


def test_an_unknown_parser_name_is_a_config_error(tokenizer):
    from worker.engine.vllm_parsing import OutputParsing
    from worker.errors import ConfigError

    with pytest.raises(ConfigError, match="no_such_parser"):
        OutputParsing(tokenizer, "no_such_parser", None)
