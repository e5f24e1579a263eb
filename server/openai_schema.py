"""The OpenAI request bodies lorad accepts, validated at the edge (pydantic), and their mapping to
lorad's SamplingParams. Every field OpenAI defines is named here: supported ones are mapped,
the others are refused with a 400 that says what to send instead, and a field OpenAI does not
define is refused too (a typo never silently changes nothing).

Defaults follow OpenAI, not lorad's gRPC API: an omitted temperature is 1.0 (sampling); send
temperature=0 for greedy. An omitted max_tokens is the server's --default-max-new-tokens.
lorad extensions (vLLM spells them the same): top_k, repetition_penalty, return_token_ids.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorad.errors import InvalidRequestError

from lorad.server.sampling import SamplingParams


class _Strict(BaseModel):
    # strict: "yes" is not a boolean and "5" is not a number (ints still pass as floats)
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # the SDK's own; nothing to obfuscate here


class _GenerationBody(_Strict):
    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=512)  # accepted, unused
    # lorad extensions
    top_k: int | None = None
    repetition_penalty: float | None = None
    return_token_ids: bool | None = False

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequestError("n: lorad returns one choice per request; leave n out or send n=1, "
                                      "and send several requests for several choices")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise InvalidRequestError(f"{name}: not supported; use repetition_penalty (a lorad extension, "
                                          "1 = off, above 1 discourages repeats) instead")
        if self.logit_bias:
            raise InvalidRequestError("logit_bias: not supported by lorad")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options: only allowed with stream=true")

    def max_new_tokens(self, default: int) -> int:
        return default if self.max_tokens is None else self.max_tokens

    def sampling(self, default_max_new_tokens: int, logprobs: bool) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=self.max_new_tokens(default_max_new_tokens),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=stop,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def text(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt: is empty")
            return prompt
        if prompt and all(isinstance(p, str) for p in prompt):
            raise InvalidRequestError("prompt: one prompt per request; send a list of prompts as separate requests")
        raise InvalidRequestError("prompt: token ids are not accepted; send the prompt as text")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of not in (None, 1):
            raise InvalidRequestError("best_of: lorad generates one sequence per request; leave best_of out")
        if self.echo:
            raise InvalidRequestError("echo: not supported by lorad; the prompt is yours already")
        if self.suffix:
            raise InvalidRequestError("suffix: insertion is not supported by lorad")
        if self.logprobs not in (None, 0):
            raise InvalidRequestError(
                "logprobs: lorad reports each chosen token's log-probability but no alternatives; "
                "send logprobs=0")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, refusal... ride along unused

    role: str
    content: str | list[TextPart] | None = None

    def as_lorad(self, index: int) -> dict:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for system
        if role not in ("system", "user", "assistant"):
            raise InvalidRequestError(f"messages[{index}].role: {role[:40]!r} is not one of system, developer, "
                                      "user or assistant (tools are not supported)")
        if self.content is None:
            raise InvalidRequestError(f"messages[{index}].content: is missing")
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": role, "content": text}


class ChatCompletionBody(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # OpenAI fields that need tools, structured outputs or other modalities: refused when used
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    # accepted and unused: they change nothing about the tokens
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None

    def max_new_tokens(self, default: int) -> int:
        value = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return default if value is None else value

    def lorad_messages(self) -> list[dict]:
        return [m.as_lorad(i) for i, m in enumerate(self.messages)]

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools or self.functions or self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise InvalidRequestError("tools: tool and function calling are not supported by lorad")
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidRequestError("response_format: only {\"type\": \"text\"} is supported by lorad")
        if self.modalities not in (None, ["text"]) or self.audio is not None:
            raise InvalidRequestError("modalities: lorad generates text only")
        if self.prediction is not None:
            raise InvalidRequestError("prediction: predicted outputs are not supported by lorad")
        if self.top_logprobs not in (None, 0):
            raise InvalidRequestError("top_logprobs: lorad reports each chosen token's log-probability but no "
                                      "alternatives; send logprobs=true with top_logprobs=0 or left out")
