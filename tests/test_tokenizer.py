"""Tokenizer tests: raw and chat encodings must equal mistral-common's on its own model files.

The reference for each version is mistral-common's MistralTokenizer (v1: the 8x7B
tokenizer.model.v1, v3: the 8x22B ...model.v3), built from the same data files that
`load_tokenizer` reads.
"""

import shutil
import sys
from importlib import resources

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_jax.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def pairs():
    """version -> (our Tokenizer, mistral-common's MistralTokenizer) on the same file."""
    return {
        "v1": (load_tokenizer("8x7b"), MistralTokenizer.v1()),
        "v3": (load_tokenizer("8x22b"), MistralTokenizer.v3()),
    }


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text, **kw):
    return {"role": "assistant", "content": text, **kw}


def _system(text):
    return {"role": "system", "content": text}


DIALOGS = {
    "single_user": [_user("What is the capital of France?")],
    "multi_turn": [_user("Hi!"), _assistant("Hello, how can I help?"), _user("Tell me a joke.")],
    "system_single": [_system("You are terse."), _user("Explain MoE.")],
    # v1 puts the system prompt on the first user turn, v3 on the last.
    "system_multi_turn": [
        _system("You are terse."),
        _user("First question"),
        _assistant("First answer"),
        _user("Second question"),
        _assistant("Second answer"),
        _user("Third question"),
    ],
    "two_system_messages": [_system("Rule one."), _user("a"), _system("Rule two."), _assistant("b"), _user("c")],
    "non_ascii": [
        _user("Grüße, 你好, emoji 🎉"),
        _assistant("Ça va — 👍 très bien"),
        _user("Ελληνικά; 日本語"),
    ],
    "code": [
        _user("Fix this:\n```python\ndef f(x):\n    if x:\n\treturn 1\n    return 0\n```\n"),
        _assistant("```python\ndef f(x):\n    return int(bool(x))\n```"),
        _user("  Now in C?  "),
    ],
    "inst_literals": [
        _user("Here is a prompt: [INST] hi [/INST] </s> <s>"),
        _assistant("It contains [INST] and [/INST]."),
        _user("[/INST][INST]"),
    ],
    "leading_trailing_spaces": [_user("   padded   "), _assistant("  spaced reply   "), _user(" x\n")],
    "assistant_prefix": [_user("Write a haiku."), _assistant("Autumn ", prefix=True)],
    "consecutive_same_role": [
        _user("part one"),
        _user(""),
        _user("part two"),
        _assistant("a1"),
        _assistant("a2"),
        _user("q"),
    ],
    "system_between_users": [_user("a"), _system("s"), _user("b")],
    "starts_with_assistant": [_assistant("I start."), _user("Then me.")],
    "system_only": [_system("Only a system prompt.")],
    "empty_user": [_user("")],
}


@pytest.mark.parametrize("dialog", sorted(DIALOGS))
@pytest.mark.parametrize("version", ["v1", "v3"])
def test_encode_chat_matches_mistral_common(pairs, version, dialog):
    ours, ref = pairs[version]
    expected = ref.encode_chat_completion(ChatCompletionRequest(messages=DIALOGS[dialog])).tokens
    assert ours.encode_chat(DIALOGS[dialog]) == expected


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_decode_chat_drops_control_tokens_like_mistral_common(pairs, version):
    ours, ref = pairs[version]
    ids = ours.encode_chat(DIALOGS["system_multi_turn"])
    text = ours.decode(ids)
    assert text == ref.decode(ids)
    assert "<s>" not in text and "</s>" not in text


BAD_DIALOGS = {
    "empty": [],
    "lone_assistant": [_assistant("hi")],
    "ends_with_finished_assistant": [_user("q"), _assistant("a")],
    "empty_assistant": [_user("q"), _assistant(""), _user("q2")],
    "system_after_assistant": [_user("q"), _assistant("a"), _system("s"), _user("q2")],
    "prefix_not_last": [_user("q"), _assistant("a", prefix=True), _user("q2")],
    "tool_role": [_user("q"), {"role": "tool", "content": "x"}],
    "extra_key": [{"role": "user", "content": "q", "name": "bob"}],
    "non_string_content": [{"role": "user", "content": 3}],
}


@pytest.mark.parametrize("dialog", sorted(BAD_DIALOGS))
def test_encode_chat_rejects_what_mistral_common_rejects(pairs, dialog):
    ours, ref = pairs["v3"]
    with pytest.raises(Exception):
        ref.encode_chat_completion(ChatCompletionRequest(messages=BAD_DIALOGS[dialog]))
    with pytest.raises(ValueError):
        ours.encode_chat(BAD_DIALOGS[dialog])


TEXTS = [
    "Hello world",
    "",
    "  two leading spaces and two trailing  ",
    "Grüße, 你好, emoji 🎉",
    "def f(x):\n    return x\t# tab\n\n",
    "[INST] literal control names [/INST] <s> </s>",
    "numbers 1234567890 and punctuation !?;:",
]


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("version", ["v1", "v3"])
def test_encode_matches_mistral_common(pairs, version, bos):
    ours, ref = pairs[version]
    for text in TEXTS:
        assert ours.encode(text, bos=bos) == ref.instruct_tokenizer.tokenizer.encode(text, bos=bos, eos=False), text


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_decode_round_trips(pairs, version):
    ours, _ = pairs[version]
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text


def test_decode_rejects_out_of_range_ids(pairs):
    ours, _ = pairs["v1"]
    with pytest.raises(ValueError, match="outside"):
        ours.decode([1, 32000])


@pytest.mark.parametrize(
    "name,version,vocab",
    [("8x7b", "v1", 32000), ("8x22b", "v3", 32768), ("tiny", "v1", 32000), ("8x7B", "v1", 32000)],
)
def test_presets(name, version, vocab):
    tok = load_tokenizer(name)
    assert (tok.version, tok.vocab_size, tok.bos_id, tok.eos_id) == (version, vocab, 1, 2)


def _data_file(version):
    name = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}[version]
    return resources.files("mistral_common") / "data" / name


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_path_version_from_suffix_and_from_vocab(tmp_path, version):
    src = _data_file(version)
    assert load_tokenizer(str(src)).version == version
    # Without a version suffix the vocab decides: 32768 pieces with [INST] control tokens is v3.
    plain = tmp_path / "tokenizer.model"
    shutil.copy(src, plain)
    assert load_tokenizer(plain).version == version


def test_version_override_and_mismatch(tmp_path):
    v3_as_plain = tmp_path / "tokenizer.model"
    shutil.copy(_data_file("v3"), v3_as_plain)
    assert load_tokenizer(v3_as_plain, version="v1").version == "v1"
    with pytest.raises(ValueError, match="control tokens"):
        load_tokenizer("8x7b", version="v3")
    with pytest.raises(ValueError, match="Unknown chat format version 'v9'"):
        load_tokenizer("8x7b", version="v9")


def test_unsupported_format_suffix_needs_override(tmp_path):
    v7 = tmp_path / "tokenizer.model.v7"
    shutil.copy(_data_file("v3"), v7)
    with pytest.raises(ValueError, match="not supported"):
        load_tokenizer(v7)
    assert load_tokenizer(v7, version="v3").version == "v3"


def test_unknown_name_lists_presets():
    with pytest.raises(ValueError, match=r"Unknown tokenizer 'mixtral'; use one of 8x22b, 8x7b, tiny"):
        load_tokenizer("mixtral")


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No tokenizer model file"):
        load_tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(junk)
    with pytest.raises(ValueError, match="is a directory"):
        load_tokenizer(tmp_path)


def test_preset_without_mistral_common(monkeypatch):
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    with pytest.raises(ValueError, match="pip install mistral-common"):
        load_tokenizer("8x7b")
