"""OpenAI's request and response shapes for the server: checks a request body, builds the replies.

Everything a request may hold is checked here, so a bad one becomes one
sentence in OpenAI's error body (HTTP 400) and never reaches the engine.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid

from mixtral_jax.engine import Request

# Accepted and honoured; anything else a client sends is refused by name, never silently ignored.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "stream",
           "stream_options", "n", "user"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON | {"prompt"}
# Accepted at their neutral value only.
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": (None, False), "echo": False,
            "best_of": (None, 1), "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": None,
            "logit_bias": (None, {}), "suffix": (None, "")}


class BadRequest(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body: dict, name: str, default, low: float, high: float = math.inf, integer: bool = False,
            low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}.", name)
    if value < low or (low_open and value == low) or value > high:
        lo = f"> {low}" if low_open else f">= {low}"
        raise BadRequest(f"'{name}' must be {lo}{'' if high == math.inf else f' and <= {high}'}, got {value}.", name)
    return value


def _stops(body: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    ids = body.get("stop_token_ids") or []
    if not isinstance(stop, list) or not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings (or token ids).", "stop")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise BadRequest("'stop_token_ids' must be a list of token ids.", "stop_token_ids")
    ids = ids + [s for s in stop if isinstance(s, int)]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise BadRequest(f"stop token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}).", "stop")
    return [s for s in stop if isinstance(s, str)], ids


def _prompt(body: dict, chat: bool, tokenizer) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is required: a non-empty list of {role, content} objects.", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise BadRequest("each message needs a 'role' and a string 'content' (text only).", "messages")
        try:
            return tokenizer.encode_chat([{k: m[k] for k in ("role", "content", "prefix") if k in m}
                                          for m in messages])
        except ValueError as e:
            raise BadRequest(str(e), "messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode(prompt, bos=True)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise BadRequest("'prompt' is required: a non-empty string or list of token ids (one prompt per request).",
                     "prompt")


def parse(body, chat: bool, model_name: str, tokenizer, vocab_size: int) -> tuple[Request, dict]:
    """Checks a request body; returns (the engine request, {"stream", "include_usage"}).

    Raises:
      BadRequest: one sentence for the first thing that is wrong.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object.")
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name, value in body.items():
        if name in _NEUTRAL:
            neutral = _NEUTRAL[name] if isinstance(_NEUTRAL[name], tuple) else (_NEUTRAL[name],)
            if value not in neutral:
                raise BadRequest(f"'{name}' is not supported by this server.", name, "unsupported_parameter")
        elif name not in allowed:
            raise BadRequest(f"'{name}' is not a supported request argument.", name, "unsupported_parameter")
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadRequest(f"The model '{model}' does not exist; this server serves '{model_name}'.", "model",
                         "model_not_found")
    if _number(body, "n", 1, 1, integer=True) != 1:
        raise BadRequest("'n' > 1 is not supported; send one request per completion.", "n", "unsupported_parameter")
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise BadRequest("'stream' must be a boolean and 'stream_options' an object.", "stream")
    limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, limit_name, None, 1, integer=True)
    # Without a seed, sampled requests differ from each other, as OpenAI's do.
    seed = _number(body, "seed", None, -2**63, 2**63 - 1, integer=True)
    seed = secrets.randbits(32) if seed is None else seed
    stop, stop_ids = _stops(body, vocab_size)
    req = Request(
        prompt=_prompt(body, chat, tokenizer), max_tokens=max_tokens or 0,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)),
        top_k=_number(body, "top_k", 0, 0, integer=True), seed=seed, stop_tokens=stop_ids, stop=stop)
    return req, {"stream": stream, "include_usage": bool(options.get("include_usage")), "limit_name": limit_name,
                 "max_tokens_given": max_tokens is not None}


class Reply:
    """The response pieces of one request: ids, chunks and the final body."""

    def __init__(self, chat: bool, model_name: str, req: Request):
        self.chat, self.model, self.req = chat, model_name, req
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        p, c = len(self.req.prompt), len(self.req.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def body(self) -> dict:
        """The whole (not streamed) response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.req.text}, "logprobs": None,
                      "finish_reason": self.req.finish_reason}
        else:
            choice = {"index": 0, "text": self.req.text, "logprobs": None, "finish_reason": self.req.finish_reason}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": self.usage()}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed chunk; with text None, the usage chunk (no choices)."""
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        if text is None:
            return {**head, "choices": [], "usage": self.usage()}
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}
