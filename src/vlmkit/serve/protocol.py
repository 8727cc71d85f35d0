"""The OpenAI-compatible wire format, as pydantic models: what the server accepts and returns.

Strict types: ``"temperature": false`` is an error, not 0. The same models generate
``/openapi.json``, so the published schema is exactly what is validated.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from .. import limits

Strict = ConfigDict(extra="forbid", strict=True)
Lenient = ConfigDict(extra="ignore", strict=True)  # unknown OpenAI fields (user, metadata, ...) are tolerated


class ImageURL(BaseModel):
    model_config = Lenient
    url: StrictStr = Field(description="a data: URL (base64), or file:// / http(s):// where the server allows it")
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: StrictStr


class ImagePart(BaseModel):
    model_config = Strict
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = Lenient
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[ContentPart]]
    name: StrictStr | None = None


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    model_config = Lenient
    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, **limits.MAX_NEW_TOKENS.schema())
    max_completion_tokens: StrictInt | None = Field(default=None, **limits.MAX_NEW_TOKENS.schema())
    # a strict float takes 1 as well as 1.0 (not true): one type, so the bounds reach the schema
    temperature: StrictFloat | None = Field(default=None, **limits.TEMPERATURE.schema())
    top_p: StrictFloat | None = Field(default=None, **limits.TOP_P.schema())
    seed: StrictInt | None = Field(default=None, **limits.SEED.schema())
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: StrictInt = Field(default=1, ge=1, le=1, description="only 1 is supported")


# /v1/score: what one request may ask (each text is one forward of the matching head with the image)
MAX_SCORE_TEXTS = 32
MAX_SCORE_TEXT_CHARS = 2000  # BLIP-2 reads 32 tokens of a text; the bound keeps the request small


class ScoreRequest(BaseModel):
    model_config = Lenient
    model: StrictStr | None = None
    image_url: ImageURL
    texts: list[Annotated[StrictStr, Field(max_length=MAX_SCORE_TEXT_CHARS)]] = Field(
        min_length=1, max_length=MAX_SCORE_TEXTS, description="the texts to score against the image")


class Score(BaseModel):
    index: int
    object: Literal["score"] = "score"
    text: str
    itm: float = Field(description="image-text matching: the probability that the text matches the image")
    itc: float = Field(description="image-text contrastive: the similarity of their embeddings")


class ScoreList(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[Score]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="text tokens + image feature positions")
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlmkit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
