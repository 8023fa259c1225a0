"""The server and its engine: every request equals `mj.generate` of it alone, whatever runs beside it;
the official openai client parses every reply; bad requests get OpenAI's 400; a client that leaves frees
its slot; nothing compiles after warm-up. One model, engine and server for the whole module."""

import concurrent.futures
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import uvicorn

import mixtral_jax as mj
from mixtral_jax.engine import _DECODE, Engine, Request
from mixtral_jax.serve import build_app

MAX_SEQ_LEN = 64
CHUNK = 4  # small, so short prompts take several chunks
SLOTS = 8  # fewer than the concurrent requests, so some wait for a slot
PREFILL_BATCH = 4  # prompts prefilled in one call: calls of 1, 2 and 4 rows, the padded ones repeating a row


@pytest.fixture(scope="module")
def model():
    return mj.init_random(mj.load_config("tiny"), seed=0)


@pytest.fixture(scope="module")
def tok():
    return mj.load_tokenizer("8x7b")


@pytest.fixture(scope="module")
def engine(model, tok):
    eng = Engine(model, max_batch=SLOTS, max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK, tokenizer=tok,
                 prefill_batch=PREFILL_BATCH)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def server(engine, tok):
    """The app on 127.0.0.1 at a free port, in a thread; stopped at the end whatever happens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(build_app(engine, tok, "tiny"), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start in 30 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def _prompts(lengths, seed):
    rs = np.random.RandomState(seed)
    return [[1] + rs.randint(3, 32000, n - 1).tolist() for n in lengths]


def _text(tok, prompt, tokens):
    """The text of new tokens as the server must send it: decoded after the prompt's last token (so the
    first word keeps its space), without a final EOS."""
    head = tok.decode(prompt[-1:])
    return tok.decode(prompt[-1:] + tokens)[len(head):]


def _wait(reqs, timeout=60):
    deadline = time.monotonic() + timeout
    for r in reqs:
        while r.finish_reason is None:
            assert time.monotonic() < deadline, "the engine did not finish in time"
            time.sleep(0.005)


SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.8)


def test_serve_loads_the_model_quantized_as_asked():
    from mixtral_jax.serve import load_model

    model, source = load_model(None, mj.load_config("tiny"), 0, "float32", None, "int4-experts")
    assert model.quantization == "int4-experts" and source.endswith(", quantized int4-experts")


def test_engine_requests_equal_generate_alone(model, engine):
    """Greedy and seeded sampled requests, more than the slots, prompts of 1 to 5 chunks, each equal to
    mj.generate of its prompt alone (same seed): what else runs changes nothing, not even prompts
    prefilled in the same call or between the parts of a decode step."""
    # Prompts up to 16 tokens and 16 new ones: the references share one compiled prefill and decode.
    prompts = _prompts([1, 3, 8, 9, 16, 5, 12, 2, 15, 7], seed=0)
    n_new = [5, 12, 3, 9, 7, 16, 1, 10, 6, 11]
    # The device calls, in order: a decode step runs as parts, and prompts are prefilled between them.
    log, run_call = [], engine._run_call
    engine._run_call = lambda kind, args: log.append((kind, args)) or run_call(kind, args)
    greedy = [engine.submit(Request(p, n)) for p, n in zip(prompts, n_new)]
    sampled = [engine.submit(Request(p, 8, seed=100 + i, **SAMPLING)) for i, p in enumerate(prompts[:4])]
    calls, steps = engine.prefill_calls.copy(), engine.decode_calls.copy()
    _wait(greedy + sampled)
    # One request decoding alone (a step over its slot only) while a prompt of 4 chunks arrives.
    alone = engine.submit(Request(prompts[1], 24))
    while len(alone.tokens) < 2:
        time.sleep(0.001)
    beside = engine.submit(Request(prompts[4], 4))
    _wait([alone, beside])
    engine._run_call = run_call
    batched = engine.prefill_calls - calls
    assert max(batched) > 1 and sum(batched.values()) < sum(-(-len(p) // CHUNK) for p in prompts + prompts[:4])
    stepped = engine.decode_calls - steps  # steps of every slot, and steps of the decoding slots only
    assert engine.max_batch in stepped and min(stepped) < engine.max_batch
    # Decode calls are (part, ...); a prefill between part 0 and part 1 of both kinds of step.
    part = [int(args[0][0]) if kind == _DECODE or kind >= engine._rows_kind else None for kind, args in log]
    between = {log[i][0] for i in range(len(log) - 2)
               if part[i] == 0 and part[i + 1] is None and log[i + 2][0] == log[i][0] and part[i + 2] == 1}
    assert _DECODE in between and max(between) >= engine._rows_kind
    for r, p, n in zip(greedy, prompts, n_new):
        ref = mj.generate(model, [p], max_new_tokens=n)[0]
        assert r.tokens == ref
        assert r.finish_reason == ("stop" if ref[-1] == model.cfg.eos_token_id else "length")
    for i, (r, p) in enumerate(zip(sampled, prompts)):
        assert r.tokens == mj.generate(model, [p], max_new_tokens=8, seed=100 + i, **SAMPLING)[0]
    assert alone.tokens == mj.generate(model, [prompts[1]], max_new_tokens=24)[0]
    assert beside.tokens == mj.generate(model, [prompts[4]], max_new_tokens=4)[0]


def test_engine_gives_a_stopped_requests_slot_away_only_after_the_step_that_computes_it(model, engine):
    """A request that stops on a token is computed once more by the next decode step, whose later parts
    write its slot; a prompt waiting for a slot must not be prefilled into it between those parts."""
    prompts = _prompts([3, 5, 2, 6, 4, 7, 3, 5, 2], seed=5)
    stopper = mj.generate(model, [prompts[0]], max_new_tokens=2, stop_tokens=[])[0]
    reqs = [engine.submit(Request(prompts[0], 12, stop_tokens=[stopper[1]]))]
    reqs += [engine.submit(Request(p, 12, stop_tokens=[])) for p in prompts[1:]]  # the last waits for a slot
    _wait(reqs)
    assert reqs[0].tokens == stopper and reqs[0].finish_reason == "stop"
    for r, p in zip(reqs[1:], prompts[1:]):
        assert r.tokens == mj.generate(model, [p], max_new_tokens=12, stop_tokens=[])[0]


def test_engine_stops_on_token_ids_and_strings(model, engine, tok):
    p = _prompts([6], seed=1)[0]
    ref = mj.generate(model, [p], max_new_tokens=12, stop_tokens=[])[0]
    by_id = engine.submit(Request(p, 12, stop_tokens=[ref[3]]))
    full = engine.submit(Request(p, 12))
    _wait([by_id, full])
    assert by_id.tokens == ref[:ref.index(ref[3]) + 1] and by_id.finish_reason == "stop"
    text = full.text
    assert text == _text(tok, p, ref)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    by_text = engine.submit(Request(p, 12, stop=["\x00never", stop]))
    _wait([by_text])
    assert by_text.finish_reason == "stop" and by_text.text == text[:text.index(stop)]


def test_completions_and_chat_streamed_and_not(model, tok, client):
    p = _prompts([7], seed=2)[0]
    ref = mj.generate(model, [p], max_new_tokens=10)[0]
    out = client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0)
    assert out.choices[0].text == _text(tok, p, ref)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(p), len(ref))

    messages = [{"role": "user", "content": "Name three experts."}]
    chat_prompt = tok.encode_chat(messages)
    ref = mj.generate(model, [chat_prompt], max_new_tokens=9)[0]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0)
    assert chat.choices[0].message.content == _text(tok, chat_prompt, ref)
    assert chat.choices[0].finish_reason == ("stop" if ref[-1] == 2 else "length")
    assert chat.usage.completion_tokens == len(ref)

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref)

    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=tok.decode(p), max_tokens=10, temperature=0, stream=True))
    assert text == out.choices[0].text  # the text prompt encodes to the same ids


def test_32_concurrent_requests_each_equal_generate_alone(model, tok, client):
    lengths = [1 + (7 * i) % 16 for i in range(32)]
    prompts = _prompts(lengths, seed=3)
    n_new = [2 + (5 * i) % 15 for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda pn: client.completions.create(
            model="tiny", prompt=pn[0], max_tokens=pn[1], temperature=0, stream=pn[1] % 2 == 0), zip(prompts, n_new)))
    for out, p, n in zip(outs, prompts, n_new):
        ref = mj.generate(model, [p], max_new_tokens=n)[0]
        text = out.choices[0].text if n % 2 else "".join(c.choices[0].text for c in out)
        assert text == _text(tok, p, ref)


def _get(url) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def _metric(server, name):
    for line in _get(server + "/metrics").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_client_leaving_mid_stream_frees_its_slot(engine, client, server):
    stream = client.completions.create(model="tiny", prompt=[1, 5, 6], max_tokens=MAX_SEQ_LEN - 3, temperature=0,
                                       stream=True)
    next(iter(stream))
    assert engine.active_slots == 1
    stream.close()
    deadline = time.monotonic() + 10
    while engine.active_slots:
        assert time.monotonic() < deadline, "the slot stayed busy after the client left"
        time.sleep(0.01)
    assert _metric(server, 'mixtral_requests_total{endpoint="completions",finish_reason="cancelled"}') == 1
    assert client.completions.create(model="tiny", prompt=[1], max_tokens=2).usage.completion_tokens >= 1


BAD = {
    "missing messages": ("chat", {"model": "tiny"}, "messages"),
    "negative max_tokens": ("completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    "negative temperature": ("completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
    "prompt beyond positions": ("completions", {"prompt": [1] * MAX_SEQ_LEN, "max_tokens": 1}, "prompt"),
    "unknown model": ("chat", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    "n=2": ("completions", {"prompt": "hi", "n": 2}, "n"),
    "tools": ("chat", {"messages": [{"role": "user", "content": "hi"}],
                       "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "token id outside vocab": ("completions", {"prompt": [1, 99999]}, "prompt"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_request_gets_openai_400(client, case):
    kind, body, param = BAD[case]
    body = {"model": "tiny", **body}
    # The client's low-level post: its typed create() refuses some of these before sending them.
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions" if kind == "chat" else "/completions", body=body, cast_to=object)
    err = e.value.body  # the openai client's parse of {"error": {...}}
    assert e.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"} and err["message"].endswith(".")


def test_malformed_json_gets_400_and_server_stays_up(server):
    post = urllib.request.Request(server + "/v1/chat/completions", data=b"{not json",
                                  headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(post, timeout=30)
    assert e.value.code == 400 and set(json.loads(e.value.read())["error"]) == {"message", "type", "param", "code"}
    assert json.loads(_get(server + "/health"))["status"] == "ok"
    assert [m["id"] for m in json.loads(_get(server + "/v1/models"))["data"]] == ["tiny"]


def test_no_compile_after_warmup_and_metrics(engine, server):
    # Runs last: every request above (all prompt lengths, sampled and greedy, stops, cancels) compiled nothing.
    assert engine.compiles == 0
    assert _metric(server, "mixtral_generation_tokens_total") > 100
    assert _metric(server, "mixtral_time_to_first_token_seconds_count") > 30
    assert _metric(server, "mixtral_slots") == SLOTS and _metric(server, "mixtral_queue_length") == 0


@pytest.mark.parametrize("flags,message", [(["--decode_parts", "0"], "--decode_parts must be >= 1, got 0."),
                                           (["--decode_parts", "5"], "decode_parts must be in [1, 4] (the layers)")])
def test_serve_cli_bad_decode_parts_is_one_line_and_exit_2(flags, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mixtral_jax.serve", *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr.strip().splitlines()[-1]


def test_engine_on_a_mesh_equals_generate_alone():
    """The engine over an expert-parallel mesh of this process's 8 devices: greedy and seeded sampled
    requests, sent together, equal mj.generate of the same model; nothing compiles after warm-up."""
    model = mj.init_random(mj.load_config("tiny"), seed=0, mesh=mj.make_mesh("expert=4,tensor=2"))
    with pytest.raises(ValueError, match="decode_parts must be in"):  # a stacked layer slice would be a copy
        Engine(model, max_batch=4, max_seq_len=32, decode_parts=2)
    # Calls of 1 or 2 prompts of 4 or 8 tokens: the prompts' first pieces (3, 11 mod 8, 6) take both lengths.
    eng = Engine(model, max_batch=4, max_seq_len=32, prefill_chunk=8, prefill_batch=2)
    eng.start()
    try:
        prompts, n_new = _prompts([3, 11, 6], seed=4), [6, 2, 4]
        greedy = [eng.submit(Request(p, n, stop_tokens=[])) for p, n in zip(prompts, n_new)]
        sampled = eng.submit(Request(prompts[0], 8, stop_tokens=[], seed=7, **SAMPLING))
        _wait(greedy + [sampled])
        assert eng.compiles == 0
        # On a mesh every decode step computes every slot (picking some would move their cache rows).
        assert set(eng.decode_calls) == {4}
    finally:
        eng.stop()
    # Greedy references as one batch: its rows equal each prompt alone (test_generate.py).
    ref = mj.generate(model, prompts, max_new_tokens=6, stop_tokens=[])
    assert [r.tokens for r in greedy] == [row[:n] for row, n in zip(ref, n_new)]
    assert sampled.tokens == mj.generate(model, prompts[:1], max_new_tokens=8, stop_tokens=[], seed=7, **SAMPLING)[0]


def test_decoding_a_few_slots_writes_their_keys_into_the_whole_cache_in_place():
    """decode_rows (a step over P of the engine's slots) once copied the P slots' whole cache rows out of every
    layer's k and v cache and wrote them back: O(P · max_seq_len) a step, 4x one request's time per token at
    4096 positions on the bench model. Now every op that yields a whole-cache array is the in-place kernel
    write, and nothing copies a slot's row: the attention kernel reads the rows in place."""
    from mixtral_jax import slot_steps
    cfg = mj.load_config("tiny")
    eng = Engine(mj.init_random(cfg, seed=0), max_batch=4, max_seq_len=256, prefill_chunk=64)
    z = lambda *s, d=np.int32: np.zeros(s, d)
    for p in (1, 2):
        hlo = slot_steps.decode_rows.lower(eng._params, eng._last, None, z(p), z(p), z(p), eng._cache,
                                           z(p, 2, d=np.uint32), z(p), z(p, d=np.float32), z(p),
                                           np.ones((p,), np.float32), **eng._run).compile().as_text()
        per_layer = "4,%d,%d,%d]" % (cfg.num_key_value_heads, eng._cache["k"].shape[3], cfg.head_dim)
        shape = "f32[%d,%s" % (cfg.num_hidden_layers, per_layer)  # k or v: every layer's, one buffer
        made = [line.split("=", 1)[1].split("(")[0].split()[-1] for line in hlo.splitlines()
                if "=" in line and line.split("=", 1)[1].strip().startswith(shape + "{")]
        writes = [m for m in made if m == "custom-call"]
        assert len(writes) == 2 * cfg.num_hidden_layers and set(made) <= {"custom-call", "parameter"}, made
        row = "f32[%d,%s" % (p, per_layer.split(",", 1)[1])
        assert not [line for line in hlo.splitlines() if "=" in line and
                    line.split("=", 1)[1].strip().startswith(row + "{")], "a copy of the slots' cache rows"
