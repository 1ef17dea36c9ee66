"""A conversation about an image with llama-server, through the `openai` client, timed per turn.

Each turn is one streamed `/v1/chat/completions` request carrying the whole conversation so far (the
API is stateless); the image goes as a base64 data URL in the first user message. llama-server
keeps the slot's KV cache and reuses its longest common prefix with the new prompt, image chunks
included (`server_tokens`, `cache_prompt`, on by default), so a follow-up only processes the new
text. The figures of a turn come from the server's own `timings` object (in the last streamed
chunk): `prompt_n` prompt tokens processed, `cache_n` taken from the cache, `prompt_ms`,
`predicted_n`, `predicted_ms`. The time to the first token and the total are measured by the
client around the stream.
"""
from __future__ import annotations

import base64
import logging
import mimetypes
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

MODEL_NAME = "llava"  # llama-server serves one model; the name in a request is not checked


def image_data_url(path: str | Path) -> str:
    """data:<mime>;base64,... of an image file, as the OpenAI chat API takes an image inline."""
    path = Path(path)
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user_message(text: str, images: Iterable[str | Path] = ()) -> dict[str, Any]:
    """A user turn: its images first (like llama-mtmd-cli's prompt, the image before the question)."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@dataclass
class Turn:
    turn: int
    question: str
    images: list[str]
    answer: str
    finish_reason: str | None
    ttft_s: float | None  # request sent -> first content piece
    total_s: float  # request sent -> stream ended
    prompt_n: int | None  # prompt tokens the server processed for this turn
    cache_n: int | None  # prompt tokens it took from the slot's cache
    prompt_ms: float | None
    predicted_n: int | None
    predicted_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Conversation:
    """Turns about images with one server; `ask` sends the history plus the new question."""

    base_url: str  # the API root, e.g. http://127.0.0.1:8080/v1
    max_tokens: int = 32
    temperature: float = 0.0
    timeout_s: float = 600
    messages: list[dict[str, Any]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        from openai import OpenAI

        # llama-server checks no key unless started with --api-key; the client insists on one.
        self.client = OpenAI(base_url=self.base_url, api_key="none", timeout=self.timeout_s, max_retries=0)

    def ask(self, question: str, images: Iterable[str | Path] = ()) -> Turn:
        images = [str(p) for p in images]
        message = user_message(question, images)
        t0 = time.perf_counter()
        stream = self.client.chat.completions.create(
            model=MODEL_NAME, messages=[*self.messages, message], max_tokens=self.max_tokens,
            temperature=self.temperature, stream=True, stream_options={"include_usage": True})
        pieces: list[str] = []
        first: float | None = None
        finish: str | None = None
        timings: dict[str, Any] = {}
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    if first is None:
                        first = time.perf_counter()
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
            extra = chunk.model_extra or {}
            if extra.get("timings"):
                timings = extra["timings"]
        total = time.perf_counter() - t0
        answer = "".join(pieces)
        self.messages += [message, {"role": "assistant", "content": answer}]
        turn = Turn(len(self.turns) + 1, question, [Path(p).name for p in images], answer, finish,
                    None if first is None else first - t0, total, timings.get("prompt_n"), timings.get("cache_n"),
                    timings.get("prompt_ms"), timings.get("predicted_n"), timings.get("predicted_ms"))
        log.info("turn %d: %d prompt tokens processed, %s from cache, first token after %s s, %.2f s in all",
                 turn.turn, turn.prompt_n or 0, turn.cache_n, None if turn.ttft_s is None else f"{turn.ttft_s:.2f}",
                 total)
        self.turns.append(turn)
        return turn

    def table(self):
        import pandas as pd

        return pd.DataFrame([t.to_dict() for t in self.turns])
