"""Continuous batching: requests come and go in a fixed set of slots that share one KV cache.

Each of `max_batch` slots holds one request. Between decode steps, waiting
requests take free slots and their prompts are prefilled in chunks, several
prompts in one call (one call per step while other slots decode, so running
streams keep flowing); a finished, stopped or cancelled request frees its slot
at once. A slot's tokens sit in its own cache row (position p at index p + pad, the pad
making the prompt's chunks whole), so every row decodes at its own index and
no request sees another's keys. The host dispatches step N + 1 once step N
is done (so a new request waits for one step, not two) and reads step N's
tokens while the device computes step N + 1.

On one device a decode step runs as `decode_parts` calls, each over some of the
layers: a prompt that arrives while a step computes is prefilled after the
part in flight, so it waits for a part, not a whole step (head-of-line
blocking); its slot is not one the step computes, so the step's tokens do not
change.

All shapes are fixed (prefill calls [P, L]: P prompts, a power of two up to
`prefill_batch`, L tokens each, the chunk, its half or its quarter; decode steps
[P] over the P decoding slots, P a power of two below `max_batch`, or every slot;
in slot_steps.py), so nothing compiles after `warmup()`;
`compiles` counts what did compile on the engine's thread since. With several processes,
process 0 schedules and every other process runs the same device calls
(`follow`).

Exact: a request's tokens do not depend on what else runs. Greedy tokens equal
`mj.generate(model, [prompt])`; a sampled request draws step i's token with
the key generate gives row 0 at step i, so it equals `mj.generate(model,
[prompt], seed=seed, ...)` too.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mixtral_jax import layout as layout_lib
from mixtral_jax import model as model_lib
from mixtral_jax import slot_steps
from mixtral_jax.generate import init_cache
from mixtral_jax.tokenizer import StreamDecoder

# Per-thread count of XLA compiles: the engine's thread must compile nothing after warm-up.
_compiles: collections.Counter = collections.Counter()


def _count_compile(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles[threading.get_ident()] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


# Device calls, as process 0 sends them to the others: _PREFILL + j a prefill call of the j-th shape, after those
# the decode steps of some slots (Engine._rows_kind + j: the j-th size); a decode call's first argument is the
# part of the step it runs.
_IDLE, _DECODE, _STOP, _PREFILL = range(4)
# Seconds an idle multi-process engine waits before telling the other processes it is still there.
_IDLE_S = 1.0


@dataclasses.dataclass
class Event:
    """What a request produced in one step: `token` (None on a cancel), its `text` (the new text, which
    may be empty while it could be part of a stop string), and `finish_reason` ("stop", "length",
    "cancelled") on the last event."""

    token: int | None
    text: str
    finish_reason: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request.

    Args:
      prompt: token ids (non-empty).
      max_tokens: tokens to generate at most (>= 1).
      temperature, top_p, top_k, seed: sampling, as in `mj.generate`.
      stop_tokens: ids that end the request (the id is in `tokens`, its text is not); EOS always does.
      stop: strings that end the request; the text ends before the first one.
      emit: called on the engine's thread with each `Event`; default: put into `events`.
    """

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_tokens: Sequence[int] = ()
    stop: Sequence[str] = ()
    emit: Callable[[Event], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: bool = False
    submitted_at: float = 0.0
    first_token_at: float | None = None

    def cancel(self) -> None:
        """Asks the engine to drop this request; its slot is freed before the next step."""
        self.cancelled = True


def _host(x: jax.Array) -> np.ndarray:
    """A replicated array's value, on any process (np.asarray refuses one that spans other processes)."""
    return np.asarray(x.addressable_data(0))


class _Slot:
    """A request in a slot: prefilled up to `done` prompt tokens, then decoding."""

    def __init__(self, req: Request, key_data: np.ndarray, detok):
        self.req, self.key_data, self.detok = req, key_data, detok
        self.done = 0  # prompt tokens prefilled
        self.offset = 0  # cache index - position (set when the slot is taken)
        self.issued = 0  # tokens dispatched to the device (their values may not be on the host yet)


class Engine:
    """Continuous batching over `max_batch` slots; `submit` from any thread, `start` runs it in one.

    Args:
      model: a `Mixtral` (on one device or `model.mesh`).
      max_batch: slots (requests decoding together).
      max_seq_len: positions per slot (prompt + new tokens); default min(4096, the model's).
      prefill_chunk: prompt tokens prefilled per chunk.
      prefill_batch: prompts prefilled together in one call at most (default min(max_batch, 8)); calls
        take a power of two rows (or this), each size compiled once at warm-up.
      tokenizer: for text and stop strings (None: tokens only).
      strategy: single-device MoE dispatch strategy.
      decode_parts: calls a decode step runs as, each over a run of the layers (a prompt that arrives waits for
        one part at most before its prefill); default 2 in the per_expert layout (one CPU device), where a part
        is a slice of its lists of layers. The stacked layout runs a step as one call: a slice of its stacked
        weights or cache would be a copy.
    """

    def __init__(self, model: model_lib.Mixtral, max_batch: int = 16, max_seq_len: int | None = None,
                 prefill_chunk: int = 64, tokenizer=None, strategy: str = "sparse", prefill_batch: int | None = None,
                 decode_parts: int | None = None):
        cfg = model.cfg
        max_seq_len = max_seq_len or min(4096, cfg.max_position_embeddings)
        prefill_batch = prefill_batch or min(max_batch, 8)
        if min(max_batch, prefill_chunk, prefill_batch) < 1:
            raise ValueError(f"max_batch, prefill_chunk and prefill_batch must be >= 1, got {max_batch}, "
                             f"{prefill_chunk} and {prefill_batch}.")
        if not 1 < max_seq_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_position_embeddings}] (the model's positions), "
                             f"got {max_seq_len}.")
        self._layout = layout_lib.get(model.layout)
        most = cfg.num_hidden_layers if self._layout.splits else 1
        decode_parts = decode_parts or min(2, most)
        if not 1 <= decode_parts <= most:
            raise ValueError(f"decode_parts must be in [1, {cfg.num_hidden_layers}] (the layers) in the per_expert "
                             f"layout and 1 in the stacked one, got {decode_parts} in the {model.layout} layout.")
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.max_batch, self.max_seq_len, self.chunk = max_batch, max_seq_len, prefill_chunk
        self.prefill_batch = prefill_batch
        # Prefill calls come in a few shapes [P, L], each compiled once: P prompts (1, 2, 4, ... prefill_batch)
        # so a lone prompt computes one row and a burst shares one call, at most about half its rows repeating
        # another; L tokens each (C, C/2, C/4, those of 4 or more) so a prompt's first chunk, which holds
        # T mod C of its T tokens, is not padded to C: a burst of short prompts computes about what they need.
        rows = sorted({min(2 ** j, prefill_batch) for j in range(prefill_batch.bit_length() + 1)})
        lengths = sorted({prefill_chunk // 2 ** j for j in range(3)
                          if prefill_chunk % 2 ** j == 0 and prefill_chunk // 2 ** j >= min(prefill_chunk, 4)})
        self._prefill_shapes = [(p, n) for p in rows for n in lengths]
        # On one device a decode step computes the decoding slots only when a power of two below max_batch holds
        # them (the rest repeating one), else every slot: at low load a step costs what its requests need (on the
        # CPU, a 16-slot step with one request decoding took 1.4x a 1-slot one: docs/serving.md). On a mesh the
        # slots are sharded and picking some moves their cache rows between devices, which costs more than the
        # step over every slot saves there (the TPU compiler's cost analysis, docs/serving.md): every slot.
        self._decode_sizes = [] if model.mesh is not None else [
            2 ** j for j in range(max_batch.bit_length()) if 2 ** j < max_batch]
        self._rows_kind = _PREFILL + len(self._prefill_shapes)
        # A prompt of T tokens sits at cache indices [pad, pad + T), pad = -T mod C: its chunks are whole and
        # its last chunk ends with its last token (prefill needs that position's logits only). Positions up
        # to max_seq_len - 2 are written, at indices below max_seq_len + C - 2; the next is where idle rows write.
        self.idle_index = max_seq_len + prefill_chunk - 2
        length = self.idle_index + 1
        self._params = model.params()
        self._run = dict(cfg=cfg, strategy=strategy, mesh=model.mesh)
        self._cache = init_cache(cfg, max_batch, length, model.dtype, model.mesh)
        # Part i of a decode step runs layers [lo, hi) of _spans[i].
        n = cfg.num_hidden_layers
        self._spans = [(n * i // decode_parts, n * (i + 1) // decode_parts) for i in range(decode_parts)]
        self._h = None  # the residual stream between parts of the step in progress
        # The step in progress: (kind, its arguments, its [(row, slot)], the next part), or None.
        self._stepping: tuple[int, tuple, list[tuple[int, _Slot]], int] | None = None
        self._inflight: jax.Array | None = None  # what the last decode call returns
        self._slots: list[_Slot | None] = [None] * max_batch
        # Each decoding slot's previous token, on device; replicated as the steps return it, so the first step
        # compiles the executable every later one uses.
        rep = None if model.mesh is None else jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec())
        self._last = jax.jit(lambda: jnp.zeros((max_batch,), jnp.int32), out_shardings=rep)()
        # Dispatched steps whose tokens the host has not read yet: (tokens on device, [(row, slot)]).
        self._pending: list[tuple[jax.Array, list[tuple[int, _Slot]]]] = []
        self._first: list[tuple[jax.Array, list[tuple[int, _Slot]]]] = []  # the same, from prefills
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._compiles_at_warmup: int | None = None
        # Prefill calls while serving, by the prompts they carried: {prompts: calls}.
        self.prefill_calls: collections.Counter = collections.Counter()
        # Decode steps while serving, by the slots they computed (a size of `_decode_sizes`, or max_batch).
        self.decode_calls: collections.Counter = collections.Counter()
        self.error: BaseException | None = None
        # Several processes: process 0 schedules and sends each device call's arguments to the others as one
        # fixed-size int32 vector (`_call`, `follow`), so every process runs the same steps.
        self._multi = jax.process_count() > 1
        b, i32, u32, f32 = max_batch, np.int32, np.uint32, np.float32
        self._specs = {
            **{_PREFILL + j: [((p, n), i32), ((p,), i32), ((p,), i32), ((p,), i32), ((p, 2), u32), ((p,), f32),
                              ((p,), i32), ((p,), f32)] for j, (p, n) in enumerate(self._prefill_shapes)},
            **{self._rows_kind + j: [((1,), i32), ((p,), i32), ((p,), i32), ((p,), i32), ((p, 2), u32), ((p,), i32),
                                     ((p,), f32), ((p,), i32), ((p,), f32)] for j, p in enumerate(self._decode_sizes)},
            _DECODE: [((1,), i32), ((b,), i32), ((b,), i32), ((b, 2), u32), ((b,), i32), ((b,), f32), ((b,), i32),
                      ((b,), f32)],
            _IDLE: [], _STOP: []}
        self._command_size = 1 + max(sum(int(np.prod(shape)) for shape, _ in spec) for spec in self._specs.values())

    # --- the client side (any thread) ---

    def check(self, prompt: Sequence[int], max_tokens: int) -> None:
        """Raises ValueError, in one sentence, for a request this engine cannot serve."""
        if not prompt:
            raise ValueError("the prompt is empty; it needs at least one token.")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"the prompt has token ids {bad[:5]} outside the vocabulary [0, {self.cfg.vocab_size}).")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
        if len(prompt) + max_tokens > self.max_seq_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                             f"{self.max_seq_len} positions this server has per request; shorten the prompt or ask "
                             "for fewer tokens.")

    def submit(self, req: Request) -> Request:
        """Queues a request (checked with `check`); its events arrive through `req.emit` / `req.events`."""
        self.check(req.prompt, req.max_tokens)
        req.submitted_at = time.perf_counter()
        self._inbox.put(req)
        return req

    @property
    def queue_length(self) -> int:
        """Requests waiting for a slot."""
        return self._inbox.qsize() + len(self._waiting)

    @property
    def active_slots(self) -> int:
        """Slots holding a request."""
        return sum(s is not None for s in self._slots)

    @property
    def compiles(self) -> int | None:
        """XLA compiles on the engine's thread since `warmup()` (None before it)."""
        if self._compiles_at_warmup is None:
            return None
        return _compiles[self._thread_id()] - self._compiles_at_warmup

    # --- the engine side (one thread) ---

    def _thread_id(self) -> int:
        return self._thread.ident if self._thread is not None else threading.get_ident()

    def warmup(self) -> None:
        """Compiles every step (on the calling thread, which then must run the engine)."""
        self._admit(Request([1], 1))  # the per-request key
        self._waiting.clear()
        b, parts = self.max_batch, len(self._spans)

        def decode_args(p):  # positions (-1: idle rows), offsets, key data, step, temperature, top_k, top_p
            return (np.full((p,), -1, np.int32), np.zeros((p,), np.int32), np.zeros((p, 2), np.uint32),
                    np.zeros((p,), np.int32), np.zeros((p,), np.float32), np.zeros((p,), np.int32),
                    np.ones((p,), np.float32))

        calls = {"d": (_DECODE, decode_args(b))}
        for j, p in enumerate(self._decode_sizes):  # slot 0 at position 0
            calls[f"r{j}"] = (self._rows_kind + j, (*[np.zeros((p,), np.int32)] * 2, *decode_args(p)[1:]))
        for j, (p, n) in enumerate(self._prefill_shapes):
            calls[f"p{j}"] = (_PREFILL + j, (np.zeros((p, n), np.int32), *[np.zeros((p,), np.int32)] * 3,
                                             np.zeros((p, 2), np.uint32), np.zeros((p,), np.float32),
                                             np.zeros((p,), np.int32), np.ones((p,), np.float32)))
        # Every order the calls come in (a prefill or a decode step after either; a prefill between two parts
        # of a step): should a call return `_last` or the cache in another sharding than it took them, that
        # pairing compiles here, not while serving.
        order = ["p0", "p0", "d", "d", "p0", "d"] + [c for j in range(1, len(self._prefill_shapes))
                                                      for c in (f"p{j}", f"p{j}", "d")]
        order += [c for j in range(len(self._decode_sizes)) for c in (f"r{j}", f"r{j}", "p0", f"r{j}", "d", f"r{j}")]
        for name in order:
            kind, args = calls[name]
            if _PREFILL <= kind < self._rows_kind:
                self._call(kind, args)
                continue
            for part in range(parts):
                self._call(kind, (np.array([part], np.int32), *args))
                if part == 0 < parts - 1 and name in ("d", "r0"):
                    self._call(*calls["p0"])
        if self._multi:
            self._call(_IDLE, ())
        _host(self._last)
        self._compiles_at_warmup = _compiles[threading.get_ident()]

    def start(self) -> None:
        """Warms up and runs the engine in a background thread until `stop()`."""
        ready = threading.Event()

        def loop():
            try:
                self.warmup()
                ready.set()
                while not self._stopping:
                    if not self.step():
                        self._wait_for_work()
                if self._multi:
                    self._call(_STOP, ())
            except BaseException as e:  # the server reports it; the thread must not die silently
                self.error = e
                ready.set()

        self._thread = threading.Thread(target=loop, name="mixtral-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Stops the background thread (after its current step; other processes follow it out)."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _wait_for_work(self) -> None:
        try:
            # Other processes wait in a collective for the next call: tell them, now and then, that none
            # is coming yet.
            item = self._inbox.get(timeout=_IDLE_S if self._multi else None)
        except queue.Empty:
            self._call(_IDLE, ())
            return
        if item is not None:
            self._admit(item)

    # --- every process ---

    def follow(self) -> None:
        """On a process other than 0: runs the device calls process 0's engine makes, until it stops."""
        while True:
            vec = multihost_utils.broadcast_one_to_all(np.zeros((self._command_size,), np.int32))
            kind = int(vec[0])
            if kind == _STOP:
                return
            args, at = [], 1
            for shape, dtype in self._specs[kind]:
                n = int(np.prod(shape))
                args.append(np.asarray(vec[at:at + n]).view(dtype).reshape(shape))
                at += n
            self._run_call(kind, tuple(args))

    def _call(self, kind: int, args: tuple):
        """Runs one device call; with several processes, first sends it to the others (`follow`)."""
        if self._multi:
            parts = [np.asarray(a).reshape(-1).view(np.int32) for a in args]
            vec = np.zeros((self._command_size,), np.int32)
            vec[0] = kind
            if parts:
                flat = np.concatenate(parts)
                vec[1:1 + flat.size] = flat
            multihost_utils.broadcast_one_to_all(vec)
        return self._run_call(kind, args)

    def _run_call(self, kind: int, args: tuple):
        if kind >= self._rows_kind or kind == _DECODE:  # a part of a decode step
            part, args = int(args[0][0]), args[1:]
            (lo, hi), last = self._spans[part], part == len(self._spans) - 1
            params = self._layout.layer_span(self._params, lo, hi)
            run = dict(first=part == 0, last=last, **self._run)
            if kind == _DECODE:
                out, self._cache = slot_steps.decode(params, self._last, self._h, args[0], args[1], self._cache,
                                                     *args[2:], idle_index=np.int32(self.idle_index), **run)
            else:
                out, self._cache = slot_steps.decode_rows(params, self._last, self._h, args[0], args[1], args[2],
                                                          self._cache, *args[3:], **run)
            if last:
                self._last, self._h = out, None
            else:
                self._h = out
            return out
        if kind >= _PREFILL:
            tokens, start, offset, slot, key_data, temperature, top_k, top_p = args
            nxt, self._last, self._cache = slot_steps.prefill_chunk(
                self._params, tokens, start, offset, slot, self._cache, self._last, key_data, temperature, top_k,
                top_p, **self._run)
            return nxt
        return None

    def _admit(self, req: Request) -> None:
        key_data = np.asarray(jax.random.key_data(jax.random.key(req.seed)), np.uint32)
        self._waiting.append(_Slot(req, key_data, StreamDecoder(self.tokenizer, req.prompt, req.stop)))

    def step(self) -> bool:
        """One scheduling round: wait for the decode call in flight (a step, or a part of one), admit, prefill
        (one call, one chunk of each of up to `prefill_batch` prompts, while others decode), dispatch the next
        decode call (the step's next part, or the next step), then read a finished step's tokens while that
        one computes. Returns whether it did any work."""
        previous, self._pending = self._pending, []
        # Scheduling waits for the call in flight instead of queueing the next one behind it: a request that
        # arrived meanwhile is prefilled before the next decode call, not after two (head-of-line blocking).
        jax.block_until_ready(self._inflight)
        self._inflight = None
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._admit(item)
        # The slots a step in progress computes stay theirs until it ends: its later parts write their rows.
        busy = set() if self._stepping is None else {i for i, _ in self._stepping[2]}
        for i, s in enumerate(self._slots):
            if s is not None and s.req.cancelled and i not in busy:
                self._finish(i, None, "cancelled")
        while self._waiting and self._waiting[0].req.cancelled:
            s = self._waiting.popleft()
            self._emit(s.req, Event(None, "", "cancelled"))
        for i in range(self.max_batch):
            if self._slots[i] is None and self._waiting and i not in busy:
                self._slots[i] = self._waiting.popleft()
                self._slots[i].offset = -len(self._slots[i].req.prompt) % self.chunk
        prefilling = [i for i, s in enumerate(self._slots) if s is not None and s.done < len(s.req.prompt)]
        decoding = [] if busy else [
            i for i, s in enumerate(self._slots)
            if s is not None and s.done == len(s.req.prompt) and 0 < s.issued < s.req.max_tokens]
        # With streams running, one call per decode call keeps their inter-token latency bounded; with none,
        # prefill everything waiting first. A call takes one chunk of each of several prompts, which share one
        # read of the weights (most of a small chunk's cost on an accelerator).
        while prefilling:
            self._prefill(prefilling[:self.prefill_batch])
            if busy or decoding:
                break
            prefilling = [i for i in prefilling if self._slots[i].done < len(self._slots[i].req.prompt)]
        if busy or decoding:
            self._decode_part(decoding)
        # The host reads step N's tokens while the device computes step N + 1 (dispatched just above). A row
        # that stops at step N has one step N + 1 computed for nothing; its token is dropped here. First
        # tokens (from this round's prefill) are read now too: they wait for the prefill only, not the decode.
        first, self._first = self._first, []
        for tokens, rows in previous + first:
            tokens = _host(tokens)
            for r, s in rows:
                if s.req.finish_reason is None:
                    self._append(self._slots.index(s), int(tokens[r]))
        return bool(prefilling or decoding or busy or previous or first)

    def _prefill(self, rows: list[int]) -> None:
        """One chunk of each of `rows`' prompts, in one call of the smallest shape [P, L] that holds them; the
        rows past them repeat the first one (same values written twice)."""
        pieces = [list(s.req.prompt[s.done:s.done + self.chunk - (0 if s.done else s.offset)])
                  for s in (self._slots[i] for i in rows)]
        j, (p, n) = next((j, (p, n)) for j, (p, n) in enumerate(self._prefill_shapes)
                         if p >= len(rows) and n >= max(map(len, pieces)))
        tokens, key_data = np.zeros((p, n), np.int32), np.zeros((p, 2), np.uint32)
        start, offset, slot, top_k = (np.zeros((p,), np.int32) for _ in range(4))
        temperature, top_p = np.zeros((p,), np.float32), np.ones((p,), np.float32)
        finished = []
        for r, (i, piece) in enumerate(zip(rows, pieces)):
            s, req = self._slots[i], self._slots[i].req
            # The cache index of this call's first token. A prompt's first chunk ends at index C (its pad
            # before it, the tokens right-aligned in the call); the later chunks are whole.
            start[r] = s.done + s.offset if s.done else self.chunk - n
            tokens[r, n - len(piece):] = piece
            offset[r], slot[r], key_data[r] = s.offset, i, s.key_data
            temperature[r], top_k[r], top_p[r] = req.temperature, req.top_k, req.top_p
            s.done += len(piece)
            if s.done == len(req.prompt):
                s.issued = 1
                finished.append((r, s))
        for a in (tokens, start, offset, slot, key_data, temperature, top_k, top_p):
            a[len(rows):] = a[0]
        nxt = self._call(_PREFILL + j, (tokens, start, offset, slot, key_data, temperature, top_k, top_p))
        if finished:
            self._first.append((nxt, finished))
        if self._compiles_at_warmup is not None:
            self.prefill_calls[len(rows)] += 1

    def _decode_part(self, rows: list[int]) -> None:
        """The next part of the decode step in progress, or the first of a new step of `rows`' slots: over those
        slots only when a size of `_decode_sizes` holds them (the rows past them repeating the first: the same
        values written twice), else over every slot (the idle ones at position -1)."""
        if self._stepping is None:
            size = next((j for j, p in enumerate(self._decode_sizes) if p >= len(rows)), None)
            p = self.max_batch if size is None else self._decode_sizes[size]
            slot, positions, offsets, step, top_k = (np.zeros((p,), np.int32) for _ in range(5))
            key_data, temperature = np.zeros((p, 2), np.uint32), np.zeros((p,), np.float32)
            top_p = np.ones((p,), np.float32)
            positions[:] = -1
            for r, i in enumerate(rows):
                at = i if size is None else r  # the step over every slot has slot i in row i
                s = self._slots[i]
                req = s.req
                slot[at], positions[at], offsets[at] = i, len(req.prompt) + s.issued - 1, s.offset
                key_data[at], step[at] = s.key_data, s.issued
                temperature[at], top_k[at], top_p[at] = req.temperature, req.top_k, req.top_p
                s.issued += 1
            if size is None:
                kind, args = _DECODE, (positions, offsets, key_data, step, temperature, top_k, top_p)
            else:
                args = (slot, positions, offsets, key_data, step, temperature, top_k, top_p)
                for a in args:
                    a[len(rows):] = a[0]
                kind = self._rows_kind + size
            self._stepping = (kind, args, [(i, self._slots[i]) for i in rows], 0)
        kind, args, rows, part = self._stepping
        self._inflight = self._call(kind, (np.array([part], np.int32), *args))
        if part + 1 < len(self._spans):
            self._stepping = (kind, args, rows, part + 1)
            return
        self._stepping = None
        self._pending.append((self._last, rows))
        if self._compiles_at_warmup is not None:
            self.decode_calls[args[0].shape[0]] += 1

    def _append(self, i: int, token: int) -> None:
        """Records slot i's new token, sends its text, and frees the slot when the request is done."""
        s = self._slots[i]
        r = s.req
        now = time.perf_counter()
        r.first_token_at = r.first_token_at or now
        r.tokens.append(token)
        if token == self.cfg.eos_token_id or token in r.stop_tokens:
            self._finish(i, token, "stop", s.detok.add(None)[0])
            return
        text, hit = s.detok.add(token)
        if hit:
            self._finish(i, token, "stop", text)
        elif len(r.tokens) == r.max_tokens:
            self._finish(i, token, "length", text + s.detok.add(None)[0])
        else:
            r.text += text
            self._emit(r, Event(token, text))

    def _finish(self, i: int, token: int | None, reason: str, text: str = "") -> None:
        s = self._slots[i]
        self._slots[i] = None
        s.req.text += text
        s.req.finish_reason = reason
        self._emit(s.req, Event(token, text, reason))

    @staticmethod
    def _emit(req: Request, event: Event) -> None:
        try:
            (req.emit or req.events.put)(event)
        except Exception:  # a consumer that fails must not stop the engine: drop its request instead
            req.cancel()
