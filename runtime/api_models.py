"""The request bodies the server accepts (OpenAI completions and chat), as pydantic models.

Every field is typed and bounded at the edge, so nothing a client sends can fail later inside the shared engine
step: integers are strict (no 1.5, no true, no "3"), floats finite, token ids inside the model's vocabulary,
stop lists and prompts bounded (prompts before they are tokenized). Limits that depend on the model (vocabulary,
context length) come in `ApiLimits`, passed as the validation context. Unknown fields are ignored, as OpenAI
clients send many (user, stream_options, ...). A failed check becomes `BadRequest` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from optforge.runtime.sequence import MIN_TEMPERATURE, SamplingParams

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # strict: an int is a float, a bool is not


class BadRequest(Exception):
    """A request the server refuses with 400; `param` names the offending field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, kw_only=True)
class ApiLimits:
    vocab_size: int | None  # token ids must be in [0, vocab_size); None: unchecked (the engine checks again)
    max_context: int  # prompt + output tokens of one request, at most (max_model_len, or less where the KV cache is)
    max_prompt_chars: int  # characters of a text prompt, or of all chat messages, checked before tokenizing
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    max_messages: int = 1024  # chat messages per request

    @classmethod
    def for_context(cls, max_context: int, vocab_size: int | None, max_prompt_chars: int | None = None) -> "ApiLimits":
        # 32 characters a token is far above what real text tokenizes to, and still bounds the work
        return cls(vocab_size=vocab_size, max_context=max_context, max_prompt_chars=max_prompt_chars or 32 * max_context)


def _limits(info: ValidationInfo) -> ApiLimits:
    return info.context["limits"]


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid", message)


def _below_context(max_tokens: int | None, info: ValidationInfo) -> int | None:
    """A bound before tokenizing (the prompt takes at least one token); the exact one comes after."""
    if max_tokens is not None and max_tokens >= _limits(info).max_context:
        raise _fail(f"must be below the context length of {_limits(info).max_context} tokens, got {max_tokens}")
    return max_tokens


class _Sampling(BaseModel):
    """Fields common to both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: Float | None = Field(None, ge=0, le=100)  # 0: greedy; else >= MIN_TEMPERATURE (see sequence.py)
    top_p: Float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=1, le=2**31 - 1)
    min_p: Float | None = Field(None, ge=0, lt=1)
    repetition_penalty: Float | None = Field(None, ge=1e-2, le=100)  # beyond these, penalized logits overflow
    seed: Int | None = Field(None, ge=-(2**63), lt=2**63)
    ignore_eos: StrictBool = False
    max_tokens: Int | None = Field(None, ge=1)
    stop: tuple[str, ...] = ()
    n: Int = Field(1, ge=1, le=1)  # one choice per request
    stream: StrictBool = False

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise _fail(f"must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {value}")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_fit(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _below_context(value, info)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any, info: ValidationInfo) -> tuple[str, ...]:
        limits = _limits(info)
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _fail("must be a string or a list of strings")
        if len(stops) > limits.max_stop or not all(1 <= len(s) <= limits.max_stop_chars for s in stops):
            raise _fail(f"takes at most {limits.max_stop} strings of 1 to {limits.max_stop_chars} characters")
        return tuple(stops)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed") if getattr(self, k) is not None}
        return SamplingParams(max_tokens=max_tokens, stop=self.stop, ignore_eos=self.ignore_eos, logprobs=logprobs, **given)


class CompletionRequest(_Sampling):
    """POST /v1/completions: one prompt, text or token ids."""

    prompt: str | list[int]
    logprobs: Int | None = Field(None, ge=0, le=20)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any, info: ValidationInfo) -> str | list[int]:
        limits = _limits(info)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]  # a batch of one text prompt
        if isinstance(value, str):
            if not value or len(value) > limits.max_prompt_chars:
                raise _fail(f"a text prompt must have 1 to {limits.max_prompt_chars} characters, got {len(value)}")
            return value
        if not isinstance(value, list) or not value or not all(type(t) is int for t in value):
            raise _fail("must be a non-empty string or a list of token ids (one prompt per request)")
        if len(value) >= limits.max_context:
            raise _fail(f"the prompt has {len(value)} tokens; the context length is {limits.max_context}")
        if limits.vocab_size is not None:
            bad = next((t for t in value if not 0 <= t < limits.vocab_size), None)
            if bad is not None:
                raise _fail(f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
        return value

    def to_params(self, num_prompt_tokens: int, max_context: int) -> SamplingParams:
        return self.sampling_params(self.max_tokens or 16, self.logprobs)  # 16: the OpenAI completions default


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str
    name: str | None = Field(None, max_length=64)

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> str:
        """A string, or OpenAI's list of text parts (joined); images and audio are not understood here."""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise _fail("must be a string or a list of {type: 'text', text: string} parts")


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_bounded(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise _fail("must be a non-empty list of {role, content} objects")
        if len(value) > limits.max_messages:
            raise _fail(f"at most {limits.max_messages} messages, got {len(value)}")
        return value

    @field_validator("messages")
    @classmethod
    def _messages_size(cls, value: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        limit = _limits(info).max_prompt_chars
        if sum(len(m.content) for m in value) > limit:
            raise _fail(f"the messages have more than {limit} characters in all")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens_fit(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _below_context(value, info)

    def to_params(self, num_prompt_tokens: int, max_context: int) -> SamplingParams:
        # as OpenAI's chat API: without a limit, a reply may fill what the prompt leaves of the context
        max_tokens = self.max_completion_tokens or self.max_tokens or max(1, max_context - num_prompt_tokens)
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


def _param(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI names a field: messages[1].content."""
    if not loc:
        return None
    out = str(loc[0])
    for part in loc[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_request(cls: type[_Sampling], body: Any, limits: ApiLimits) -> _Sampling:
    """Validate a decoded JSON body; BadRequest names the first offending field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return cls.model_validate(body, context={"limits": limits})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param(first["loc"])
        raise BadRequest(f"'{param}': {first['msg']}" if param else first["msg"], param) from None
