"""Structured output on the default model: whatever the sampler draws (seeded, temperature
1), the answer under a JSON schema's grammar parses and validates against the schema (any
JSON object, whose size no schema bounds, greedily)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from infinikv.engine.generator import Generator
from infinikv.engine.grammar import GrammarError, json_grammar
from infinikv.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

SCHEMAS = [
    None,  # any JSON object
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "bright": {"type": "boolean"},
        },
        "required": ["colors", "bright"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "city": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "population": {"type": "number", "minimum": 0},
                },
                "required": ["name", "population"],
                "additionalProperties": False,
            }
        },
        "required": ["city"],
        "additionalProperties": False,
    },
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "person", "colors", "nested"])
def test_sampled_answers_parse_and_validate(cpu_kernels, schema) -> None:
    gen = Generator(cpu_kernels, 2048)
    grammar = json_grammar(schema)
    ask = "Reply with a JSON object: a person's name and age." if schema is None else "Describe something."
    prompt = gen.encode_chat([{"role": "user", "content": ask}])
    temperature = 0.0 if schema is None else 1.0
    for seed in range(1 if schema is None else 3):
        params = SamplingParams(max_tokens=160, temperature=temperature, seed=seed, grammar=grammar)
        out = gen.generate(prompt, params)
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        jsonschema.validate(value, schema or {"type": "object"})


def test_a_schema_that_does_not_compile_is_refused_by_name() -> None:
    with pytest.raises(GrammarError, match="Invalid type: bogus"):
        json_grammar({"type": "bogus"})
