"""Request bodies of the OpenAI-compatible API (what the official `openai` client sends), with
the limits we enforce. Unknown fields are ignored, as OpenAI-compatible servers do; fields
we cannot honour when set (logprobs or n > 1 while streaming) are refused by name."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from infinikv.engine.grammar import json_grammar
from infinikv.engine.logprobs import MAX_TOP
from infinikv.engine.sampling import SamplingParams

# Choices per request (n): each a sequence of its own, decoded in one batch.
MAX_CHOICES = 16
# A session id as we mint them (sess_ + 32 hex digits); any other string is not found.
SESSION_ID = r"^[A-Za-z0-9_\-]{1,64}$"


def _encodable(text: str) -> str:
    """JSON can carry a lone surrogate (\\ud800) that no tokenizer can encode: refuse it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text holds a lone surrogate at character {e.start}, not valid Unicode") from e
    return text


Text = Annotated[str, AfterValidator(_encodable)]


def check_token_ids(tokens: list[int], vocab: int) -> None:
    """Refuse (ValueError: a 400) a token id the model has no embedding for."""
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field("response", max_length=64)
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text`, any JSON object, or JSON valid under a schema: the output always parses."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self

    def grammar(self) -> str | None:
        if self.type == "text":
            return None
        return json_grammar(self.json_schema.json_schema if self.json_schema is not None else None)


class GenerationRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description="choices for the prompt; with a seed, choice i draws with seed + i",
    )
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop_token_ids: list[int] | None = Field(
        None, max_length=64, description="end the output at any of these"
    )
    session_id: str | None = Field(None, pattern=SESSION_ID, description="append to this session")
    citations: bool = Field(
        False,
        description="each choice lists the passages it attended to most (session documents, else the prompt)",
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def sampling(self, default_max_tokens: int, limit: int, vocab: int) -> SamplingParams:
        """The request's parameters; token ids (bias, stops) must be below `vocab`."""
        wanted = self.max_completion_tokens or self.max_tokens or min(default_max_tokens, limit)
        if wanted > limit:
            raise ValueError(f"max_tokens={wanted} exceeds this server's limit of {limit}")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        try:
            bias = tuple((int(token), value) for token, value in (self.logit_bias or {}).items())
        except ValueError as e:
            raise ValueError("logit_bias keys must be token ids") from e
        check_token_ids([t for t, _ in bias] + list(self.stop_token_ids or []), vocab)
        return SamplingParams(
            max_tokens=wanted,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(stops),
            logprobs=self.top_alternatives,
            echo=self.echoed,
            grammar=None if self.response_format is None else self.response_format.grammar(),
            logit_bias=bias,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            citations=self.citations,
        )

    @property
    def top_alternatives(self) -> int | None:
        """Alternatives per token when log-probabilities are asked for, else None."""
        return None

    @property
    def echoed(self) -> bool:
        return False

    @model_validator(mode="after")
    def _no_logprobs_stream(self) -> GenerationRequest:
        if self.stream and self.top_alternatives is not None:
            raise ValueError("logprobs are not available with stream: set stream to false")
        if self.n > 1 and (self.stream or self.session_id is not None):
            raise ValueError("n > 1 takes neither stream nor session_id")
        return self


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# Prompts per text completion request: each is a sequence of its own, decoded in one batch.
MAX_PROMPTS = 64


class CompletionRequest(GenerationRequest):
    """`prompt`: a text, token ids, or a list of either (one choice each, by `index`)."""

    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str] | list[int] | list[list[int]]) -> str | list:
        prompts = _prompt_list(v)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt takes 1 to {MAX_PROMPTS} prompts")
        if any(not p for p in prompts):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _one_prompt_when(self) -> CompletionRequest:
        if self.stream and (len(self.prompts) > 1 or self.echo):
            raise ValueError("stream takes one prompt and no echo")
        if self.session_id is not None and (len(self.prompts) > 1 or not isinstance(self.prompts[0], str)):
            raise ValueError("prompt takes one text with session_id")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text or its token ids."""
        return _prompt_list(self.prompt)

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs

    @property
    def echoed(self) -> bool:
        return self.echo


def _prompt_list(v: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One prompt (a text, token ids) or a list of them, as a list."""
    return [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else list(v)  # type: ignore[list-item]


class DocumentText(BaseModel):
    text: Text = Field(min_length=1)
    name: Text = Field("document", max_length=256)


class TokenizeRequest(BaseModel):
    """A text (`prompt`) or chat `messages` (through the chat template), as vLLM takes them."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)
