"""Sentencepiece tokenizer, Mistral's chat formats (v1 for 8x7B, v3 for 8x22B), and text streamed as tokens
arrive (`StreamDecoder`, with stop strings).

The chat formats reimplement mistral-common's `MistralTokenizer.encode_chat_completion`
on plain sentencepiece, so any Mistral `.model` file works without mistral-common at
runtime; mistral-common only ships the preset model files and is the test reference.

The rules, as mistral-common 1.13 applies them to system/user/assistant text:

- All system messages, wherever they sit, are joined with "\\n\\n" into one system
  prompt. v1 prepends it (plus "\\n\\n") to the FIRST user message, v3 to the LAST.
- Consecutive messages of one role merge into one, non-empty contents joined with
  "\\n\\n"; a system message between two user messages keeps them apart.
- If the first remaining message is not a user message, an empty user message is
  inserted before it.
- v1 encodes a user turn as the text f"[INST] {content} [/INST]" (brackets are plain
  text pieces); v3 encodes [INST] + encode(content) + [/INST] with control tokens.
- An assistant turn is encode(content) + EOS; v3 first strips trailing spaces. A final
  assistant message with "prefix": True gets no EOS, so the model continues it.
- Every piece of text is encoded separately (each gets sentencepiece's dummy-prefix
  space), and the whole conversation starts with a single BOS.
"""

import itertools
import os
from collections.abc import Iterable, Sequence
from importlib import resources

# Preset name -> (file in mistral_common/data, chat format version).
_PRESETS = {
    "8x7b": ("tokenizer.model.v1", "v1"),
    "8x22b": ("mistral_instruct_tokenizer_240323.model.v3", "v3"),
    "tiny": ("tokenizer.model.v1", "v1"),  # the tiny preset keeps 8x7B's 32000 vocab
}
_VERSIONS = ("v1", "v3")
_V3_VOCAB_SIZE = 32768
_ROLES = ("system", "user", "assistant")


class Tokenizer:
    """A sentencepiece model plus one Mistral chat format.

    Args:
        model_path: path to a sentencepiece `.model` file.
        version: chat format, "v1" or "v3"; None infers it from a `.v1`/`.v3` file
            suffix, else from the vocab (32768 pieces with [INST] control tokens is v3).

    Raises:
        ImportError: if sentencepiece is not installed.
        FileNotFoundError: if `model_path` is not a file.
        ValueError: if the file is not a sentencepiece model, or the version is
            unknown or does not fit the model.
    """

    def __init__(self, model_path: str | os.PathLike, version: str | None = None):
        try:
            import sentencepiece
        except ImportError as e:
            # Imported here so `import mixtral_jax` works for users who never tokenize.
            raise ImportError("The tokenizer needs sentencepiece; run `pip install sentencepiece`.") from e
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No tokenizer model file at {path}; pass a preset name or a sentencepiece .model path."
            )
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a sentencepiece model file ({e}).") from e
        self._version = _resolve_version(self._sp, path, version)
        if self._version == "v3":
            self._inst_id = self._sp.piece_to_id("[INST]")
            self._end_inst_id = self._sp.piece_to_id("[/INST]")

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model (32000 for v1, 32768 for v3)."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token <s>."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token </s>; generation stops on it."""
        return self._sp.eos_id()

    @property
    def version(self) -> str:
        """Chat format: "v1" (Mixtral 8x7B) or "v3" (Mixtral 8x22B)."""
        return self._version

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Encodes raw text, with no chat formatting.

        Args:
            text: the text to encode; control-token names in it stay plain text.
            bos: whether to start with the BOS id.

        Returns:
            The token ids, never followed by EOS.
        """
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text, dropping control tokens (BOS, EOS, [INST], ...).

        Args:
            ids: a sequence of int ids (a list, or a 1-D numpy/JAX array).

        Returns:
            The decoded text.

        Raises:
            ValueError: if an id is outside [0, vocab_size).
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Token ids {bad[:5]} are outside this tokenizer's vocab of {self.vocab_size}.")
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """Returns the sentencepiece piece of one id, e.g. "▁hello" or "[INST]"."""
        return self._sp.id_to_piece(int(token_id))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Encodes a conversation in this model's chat format, as mistral-common does.

        Args:
            messages: dicts {"role": "system"|"user"|"assistant", "content": str}; the
                last assistant message may add "prefix": True to be continued rather
                than closed with EOS.

        Returns:
            The prompt ids, starting with BOS; feed them to generation as they are.

        Raises:
            ValueError: if a message is malformed or the roles are out of order.
        """
        system_prompt, turns = _normalize(messages)
        return self._encode_turns(system_prompt, turns, close_last=False)[0]

    def encode_chat_for_training(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Encodes a finished conversation for fine-tuning, with the assistant turns marked.

        Args:
            messages: as `encode_chat`, ending with an assistant reply (no "prefix").

        Returns:
            (ids, mask): `encode_chat`'s ids for the conversation with its last
            reply closed by EOS, and mask 1 on every assistant token and its EOS
            (the tokens the model learns to produce), 0 elsewhere.

        Raises:
            ValueError: if a message is malformed, the roles are out of order, or
                the conversation does not end with an assistant reply.
        """
        if not isinstance(messages, (list, tuple)) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "assistant" or "prefix" in messages[-1]:
            raise ValueError("A training conversation must end with an assistant reply (without 'prefix').")
        # Validated as a conversation whose reply is left open, then closed here like every other reply.
        system_prompt, turns = _normalize([*messages[:-1], {**messages[-1], "prefix": True}])
        return self._encode_turns(system_prompt, turns, close_last=True)

    def _encode_turns(self, system_prompt, turns, close_last: bool) -> tuple[list[int], list[int]]:
        """(ids, assistant mask) of normalised turns; `close_last` ends a prefix reply with EOS too."""
        user_indices = [i for i, (role, _, _) in enumerate(turns) if role == "user"]
        system_index = user_indices[0] if self._version == "v1" else user_indices[-1]
        ids, mask = [self.bos_id], [0]
        for i, (role, content, prefix) in enumerate(turns):
            if role == "user":
                if system_prompt and i == system_index:
                    content = f"{system_prompt}\n\n{content}"
                if self._version == "v1":
                    new = self._sp.encode(f"[INST] {content} [/INST]")
                else:
                    new = [self._inst_id, *self._sp.encode(content), self._end_inst_id]
                ids += new
                mask += [0] * len(new)
            else:
                if self._version == "v3":
                    content = content.rstrip(" ")
                new = self._sp.encode(content)
                if not prefix or close_last:
                    new.append(self.eos_id)
                ids += new
                mask += [1] * len(new)
        return ids, mask


class StreamDecoder:
    """A generation's text as its tokens arrive: what can be sent so far without splitting a stop string or
    a character whose bytes are still coming. With no tokenizer, no text."""

    def __init__(self, tokenizer: Tokenizer | None, prompt: Sequence[int], stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, tuple(s for s in stop if s)
        # Decoding after the prompt's last token keeps the first word's leading space.
        self.prefix = list(prompt[-1:])
        self.prefix_len = len(tokenizer.decode(self.prefix)) if tokenizer else 0
        self.ids: list[int] = []
        self.sent = 0

    def add(self, token: int | None) -> tuple[str, bool]:
        """Adds a token (None: just flush); returns (text to send, whether a stop string ended it)."""
        if self.tok is None:
            return "", False
        if token is not None:
            self.ids.append(token)
        text = self.tok.decode(self.prefix + self.ids)[self.prefix_len:]
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            out = text[self.sent:min(hits)]
            self.sent = min(hits)
            return out, True
        end = len(text)
        if token is not None:
            while end > self.sent and text[end - 1] == "\ufffd":  # a character whose bytes are still coming
                end -= 1
            hold = max((n for s in self.stop for n in range(1, len(s)) if text[:end].endswith(s[:n])), default=0)
            end -= hold
        out, self.sent = text[self.sent:end], max(self.sent, end)
        return out, False


def preset_for(vocab_size: int) -> str:
    """The tokenizer preset of a Mixtral vocabulary: "8x22b" (v3) for 32768 pieces, else "8x7b" (v1)."""
    return "8x22b" if vocab_size == 32768 else "8x7b"


def load_tokenizer(name_or_path: str | os.PathLike, version: str | None = None) -> Tokenizer:
    """Loads the tokenizer of a preset or a sentencepiece model file.

    Args:
        name_or_path: "8x7b" (v1), "8x22b" (v3), "tiny" (v1), whose model files come
            from the installed mistral-common package, or a path to a `.model` file.
        version: chat format override, "v1" or "v3"; None picks the preset's, or
            infers it from the file (see `Tokenizer`).

    Returns:
        The Tokenizer.

    Raises:
        ValueError: for an unknown name, a missing mistral-common, or a bad version.
        FileNotFoundError: for a path that is not a file.
    """
    name = os.fspath(name_or_path)
    preset = _PRESETS.get(name.lower())
    if preset is not None:
        filename, preset_version = preset
        try:
            data = resources.files("mistral_common") / "data"
        except ModuleNotFoundError as e:
            raise ValueError(
                f"Tokenizer preset {name!r} reads its model file from mistral-common; run `pip install mistral-common`."
            ) from e
        model = data / filename
        if not model.is_file():
            raise ValueError(
                f"The installed mistral-common has no data/{filename}; run `pip install -U mistral-common`."
            )
        with resources.as_file(model) as path:
            return Tokenizer(path, version or preset_version)
    if os.path.isdir(name):
        raise ValueError(f"{name} is a directory; pass the path of the sentencepiece .model file inside it.")
    # A name with a dot or a slash is meant as a path, so a typo there reports the missing file.
    if not os.path.exists(name) and "." not in name and os.sep not in name:
        presets = ", ".join(sorted(_PRESETS))
        raise ValueError(f"Unknown tokenizer {name!r}; use one of {presets} or a path to a sentencepiece .model file.")
    return Tokenizer(name, version)


def _resolve_version(sp, path: str, version: str | None) -> str:
    """Picks the chat format for a model file and checks the model supports it."""
    has_inst = all(sp.IsControl(sp.piece_to_id(p)) for p in ("[INST]", "[/INST]"))
    if version is None:
        suffix = os.path.basename(path).rsplit(".", 1)[-1]
        if suffix in _VERSIONS:
            version = suffix
        elif suffix[:1] == "v" and suffix[1:].isdigit():
            # mistral-common names files by format; other formats (v2 tools, v7 system
            # tokens, ...) differ from v1/v3, so guessing from the vocab would be wrong.
            raise ValueError(
                f"{path} is chat format {suffix}, which is not supported; pass version='v1' or 'v3' to force one."
            )
        else:
            version = "v3" if sp.get_piece_size() == _V3_VOCAB_SIZE and has_inst else "v1"
    if version not in _VERSIONS:
        raise ValueError(f"Unknown chat format version {version!r}; use one of {', '.join(_VERSIONS)}.")
    if version == "v3" and not has_inst:
        raise ValueError(
            f"Chat format v3 needs [INST] and [/INST] control tokens, which {path} lacks; use version='v1'."
        )
    return version


def _normalize(messages: list[dict]) -> tuple[str | None, list[tuple[str, str, bool]]]:
    """Validates a conversation and merges it into turns the way mistral-common does.

    Args:
        messages: the conversation given to `Tokenizer.encode_chat`.

    Returns:
        (system_prompt or None, turns), each turn (role, content, prefix) with role
        "user" or "assistant"; turns start with a user turn.

    Raises:
        ValueError: if the conversation breaks one of mistral-common's rules.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ValueError(f"Message {i} must be a dict whose role is one of {', '.join(_ROLES)}, got {m!r}.")
        allowed = {"role", "content", "prefix"} if m["role"] == "assistant" else {"role", "content"}
        if extra := sorted(set(m) - allowed):
            raise ValueError(f"Message {i} has unsupported keys {extra}; allowed: {sorted(allowed)}.")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"Message {i} needs a string 'content', got {m.get('content')!r}.")
        if m["role"] == "assistant" and not m["content"]:
            raise ValueError(f"Assistant message {i} has empty content; drop it or give it text.")
        if not isinstance(m.get("prefix", False), bool):
            raise ValueError(f"Message {i} has a non-bool 'prefix' {m['prefix']!r}.")
        if m.get("prefix") and i != len(messages) - 1:
            raise ValueError(f"Assistant message {i} has prefix=True but only the last message may.")
        if i and messages[i - 1]["role"] == "assistant" and m["role"] == "system":
            raise ValueError(f"System message {i} follows an assistant message; mistral-common forbids that order.")
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        raise ValueError("A conversation must start with a user or system message.")
    last = messages[-1]
    if len(messages) > 1 and last["role"] == "assistant" and not last.get("prefix", False):
        raise ValueError(
            "The last message must not be a finished assistant reply; end with a user message or set prefix=True."
        )

    system_parts = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    turns = []
    for role, group in itertools.groupby(messages, key=lambda m: m["role"]):
        if role == "system":
            continue
        group = list(group)
        content = "\n\n".join(m["content"] for m in group if m["content"])
        turns.append((role, content, any(m.get("prefix", False) for m in group)))
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", "", False))
    return ("\n\n".join(system_parts) or None), turns
