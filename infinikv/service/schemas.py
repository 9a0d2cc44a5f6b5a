"""Request bodies of the OpenAI-compatible API (what the official `openai` client sends), with
the limits we enforce. Unknown fields are ignored, as OpenAI-compatible servers do; fields
we cannot honour when set (n > 1, logprobs, echo) are refused by name."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from infinikv.engine.sampling import SamplingParams

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
    n: Literal[1] = 1
    logprobs: Literal[False, None] = None
    session_id: str | None = Field(None, pattern=SESSION_ID, description="append to this session")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def sampling(self, default_max_tokens: int, limit: int) -> SamplingParams:
        wanted = self.max_completion_tokens or self.max_tokens or min(default_max_tokens, limit)
        if wanted > limit:
            raise ValueError(f"max_tokens={wanted} exceeds this server's limit of {limit}")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=wanted,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(stops),
        )


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: Text | list[Text]
    echo: Literal[False, None] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if len(texts) != 1 or not texts[0]:
            raise ValueError("prompt must be one non-empty string")
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


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
