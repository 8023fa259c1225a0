"""`python -m mixtral_jax.serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

With no flags: the tiny preset with random weights (it says so). The engine
runs in one background thread; the handlers hand it requests and read its
events through thread-safe queues. This module turns flags and HTTP into
library calls only.
"""

import asyncio
import json
import logging
import sys
import time

from absl import app, flags

from mixtral_jax import cli
from mixtral_jax.tokenizer import preset_for

FLAGS = flags.FLAGS
# Seconds between checks, while a request waits, that its client is still there.
_DISCONNECT_POLL_S = 0.5


# No `from __future__ import annotations` in this module: FastAPI reads the handlers' annotations as objects.
def build_app(engine, tokenizer, model_name: str):
    """The FastAPI app over a started `engine.Engine`.

    Args:
      engine: a started `Engine` (its thread runs the steps).
      tokenizer: the model's `Tokenizer`.
      model_name: the id /v1/models lists and requests may name.

    Returns:
      A FastAPI app; its `state.registry` holds the Prometheus metrics.
    """
    import prometheus_client as prom
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from mixtral_jax import openai_api

    registry = prom.CollectorRegistry()
    requests_total = prom.Counter("mixtral_requests", "Finished requests.", ["endpoint", "finish_reason"],
                                  registry=registry)
    prompt_tokens = prom.Counter("mixtral_prompt_tokens", "Prompt tokens of admitted requests.", registry=registry)
    new_tokens = prom.Counter("mixtral_generation_tokens", "Generated tokens.", registry=registry)
    prom.Gauge("mixtral_queue_length", "Requests waiting for a slot.", registry=registry).set_function(
        lambda: engine.queue_length)
    prom.Gauge("mixtral_slots_busy", "Slots holding a request.", registry=registry).set_function(
        lambda: engine.active_slots)
    prom.Gauge("mixtral_slots", "Slots in all.", registry=registry).set(engine.max_batch)
    buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
    ttft = prom.Histogram("mixtral_time_to_first_token_seconds", "Submit to first token.", buckets=buckets,
                          registry=registry)
    itl = prom.Histogram("mixtral_inter_token_latency_seconds", "Between a request's tokens.", buckets=buckets,
                         registry=registry)

    api = FastAPI(title="mixtral_jax", docs_url=None, redoc_url=None)
    api.state.registry = registry

    def error(status: int, message: str, param=None, code=None, kind="invalid_request_error"):
        return JSONResponse(openai_api.error_body(message, param, code, kind), status_code=status)

    @api.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), kind="invalid_request_error" if exc.status_code < 500
                     else "server_error")

    @api.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        return error(400, "the request is not valid JSON or has the wrong shape.")

    @api.get("/health")
    async def health():
        if engine.error is not None:
            return error(503, f"the engine stopped: {engine.error}", kind="server_error")
        return {"status": "ok", "slots": engine.max_batch, "busy": engine.active_slots,
                "queued": engine.queue_length}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "mixtral_jax"}]}

    @api.get("/metrics")
    async def metrics():
        return Response(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

    async def complete(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the request body is not valid JSON.")
        try:
            req, opts = openai_api.parse(body, chat, model_name, tokenizer, engine.cfg.vocab_size)
            if not opts["max_tokens_given"]:
                # OpenAI's defaults: 16 for completions, the rest of the context for chat.
                req.max_tokens = min(16, engine.max_seq_len - len(req.prompt)) if not chat else (
                    engine.max_seq_len - len(req.prompt))
            engine.check(req.prompt, max(req.max_tokens, 1))
        except openai_api.BadRequest as e:
            return error(e.status, e.message, e.param, e.code)
        except ValueError as e:
            return error(400, str(e), "messages" if chat else "prompt")
        if engine.error is not None:
            return error(503, f"the engine stopped: {engine.error}", kind="server_error")

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        last = [None]

        def emit(event):  # on the engine's thread
            now = time.perf_counter()
            if event.token is not None:
                new_tokens.inc()
                if last[0] is None:
                    ttft.observe(now - req.submitted_at)
                else:
                    itl.observe(now - last[0])
                last[0] = now
            if event.finish_reason is not None:
                requests_total.labels(endpoint, event.finish_reason).inc()
            loop.call_soon_threadsafe(events.put_nowait, event)

        req.emit = emit
        engine.submit(req)
        prompt_tokens.inc(len(req.prompt))
        reply = openai_api.Reply(chat, model_name, req)

        async def next_event():
            while True:
                try:
                    return await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if engine.error is not None or await request.is_disconnected():
                        return None

        if not opts["stream"]:
            try:
                while (event := await next_event()) is not None and event.finish_reason is None:
                    pass
            finally:
                req.cancel()  # a no-op once finished; frees the slot if the client left
            if event is None:
                return (error(503, f"the engine stopped: {engine.error}", kind="server_error")
                        if engine.error is not None else Response(status_code=499))
            return reply.body()

        async def sse():
            try:
                first = True
                if chat:
                    yield f"data: {json.dumps(reply.chunk('', first=True))}\n\n"
                    first = False
                finished = False
                while not finished and (event := await next_event()) is not None:
                    # Whatever else arrived meanwhile goes out in the same write: fewer wake-ups and sends
                    # when the engine runs ahead of this event loop.
                    batch = [event]
                    while not events.empty() and batch[-1].finish_reason is None:
                        batch.append(events.get_nowait())
                    out = []
                    for event in batch:
                        if event.text or event.finish_reason:
                            out.append(f"data: {json.dumps(reply.chunk(event.text, event.finish_reason, first))}\n\n")
                            first = False
                        finished = event.finish_reason is not None
                    if out:
                        yield "".join(out)
                if opts["include_usage"]:
                    yield f"data: {json.dumps(reply.chunk(None))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream")

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return api


class UsageError(Exception):
    """Bad flags: printed as one sentence, exit status 2."""


def _check_flags() -> None:
    from mixtral_jax import distributed, sharding

    if FLAGS.max_batch < 1:
        raise UsageError(f"--max_batch must be >= 1, got {FLAGS.max_batch}.")
    if FLAGS.prefill_chunk < 1:
        raise UsageError(f"--prefill_chunk must be >= 1, got {FLAGS.prefill_chunk}.")
    if FLAGS.prefill_batch is not None and FLAGS.prefill_batch < 1:
        raise UsageError(f"--prefill_batch must be >= 1, got {FLAGS.prefill_batch}.")
    if FLAGS.decode_parts is not None and FLAGS.decode_parts < 1:
        raise UsageError(f"--decode_parts must be >= 1, got {FLAGS.decode_parts}.")
    if FLAGS.max_seq_len < 2:
        raise UsageError(f"--max_seq_len must be >= 2, got {FLAGS.max_seq_len}.")
    if not 0 < FLAGS.port < 65536:
        raise UsageError(f"--port must be in [1, 65535], got {FLAGS.port}.")
    try:
        sharding.parse_mesh_spec(FLAGS.mesh)
        distributed.requested(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_model(checkpoint, cfg, seed: int, dtype: str, mesh, quantize: str | None = None, verify: bool = True):
    """The model the server runs and a phrase naming its source: `checkpoint` (its files checked against their
    digests first unless not `verify`), or random weights of `cfg` (quantized as `quantize` says, or as the
    checkpoint is stored)."""
    import mixtral_jax as mj

    if checkpoint:
        model = mj.load(checkpoint, dtype=dtype, mesh=mesh, quantize=quantize, verify=verify)
        source = f"weights from {checkpoint}"
    else:
        model = mj.init_random(cfg, seed=seed, dtype=dtype, mesh=mesh, quantize=quantize)
        source = "RANDOM weights (no --checkpoint): its text is noise, not a real model's output"
    return model, source + (f", quantized {model.quantization}" if model.quantization else "")


def run() -> int:
    """The CLI body: loads the model, warms the engine up, serves until interrupted."""
    _check_flags()
    from mixtral_jax import distributed, plan
    from mixtral_jax.config import load_config

    try:
        cfg = load_config(FLAGS.checkpoint or FLAGS.config)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    if FLAGS.max_seq_len > cfg.max_position_embeddings:
        raise UsageError(f"--max_seq_len {FLAGS.max_seq_len} exceeds {cfg.name}'s {cfg.max_position_embeddings} "
                         "positions.")
    n = plan.mesh_size(FLAGS.mesh)
    if distributed.requested(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
        # A lost peer ends every process with one line (the supervisor's); process 0 serves HTTP and the
        # others run its engine's device calls (Engine.follow).
        distributed.supervise(FLAGS.process_id, FLAGS.num_processes)  # returns in the supervised child only
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif n > 1:
        plan.ensure_virtual_devices(n)  # a no-op on TPU/GPU

    import jax
    import uvicorn

    import mixtral_jax as mj
    from mixtral_jax.engine import Engine

    if FLAGS.mesh and n != jax.device_count():
        raise UsageError(f"--mesh {FLAGS.mesh} needs {n} devices but this host has {jax.device_count()}.")
    dtype = FLAGS.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    mesh = mj.make_mesh(FLAGS.mesh) if FLAGS.mesh else None
    say = lambda msg: print(f"[mixtral_jax] {msg}", file=sys.stderr, flush=True)
    model, source = load_model(FLAGS.checkpoint, cfg, FLAGS.seed, dtype, mesh, FLAGS.quantize, FLAGS.verify_checkpoint)
    tokenizer = mj.load_tokenizer(preset_for(cfg.vocab_size))
    engine = Engine(model, FLAGS.max_batch, FLAGS.max_seq_len, FLAGS.prefill_chunk, tokenizer,
                    prefill_batch=FLAGS.prefill_batch, decode_parts=FLAGS.decode_parts)
    if jax.process_index() != 0:
        engine.follow()
        return 0
    say(f"{cfg.name}: {source}; {dtype} on {jax.device_count()} {jax.default_backend()} device(s) in "
        f"{jax.process_count()} process(es); warming up ...")
    engine.start()
    say(f"serving '{cfg.name}' on http://{FLAGS.host}:{FLAGS.port}/v1 ({FLAGS.max_batch} slots, "
        f"{FLAGS.max_seq_len} positions each)")
    try:
        uvicorn.run(build_app(engine, tokenizer, cfg.name), host=FLAGS.host, port=FLAGS.port, log_level="warning")
    finally:
        engine.stop()
    return 0


def main(argv):
    for name in ("jax._src.xla_bridge",):
        logging.getLogger(name).setLevel(logging.WARNING)
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags look like --port 8000.", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(run())
    except (UsageError, OSError, ValueError) as e:  # ValueError: a damaged or mismatched checkpoint, among others
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _define_flags() -> None:
    # Defined when run as a program only: build_app is imported by the bench and tests, which have flags of
    # their own.
    flags.DEFINE_string("config", "tiny", "Preset (tiny, 8x7b, 8x22b) or a config.json path; ignored with "
                        "--checkpoint.")
    flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory (from mixtral_jax.convert).")
    flags.DEFINE_boolean("verify_checkpoint", True, "Check every checkpoint file against its digest before loading "
                         "(one extra read of the files); --noverify_checkpoint skips it, as sample's.")
    flags.DEFINE_string("mesh", "", "Device mesh, e.g. expert=4,tensor=2 (axes data, expert, tensor).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_integer("max_batch", 16, "Slots: requests decoding together.")
    flags.DEFINE_integer("max_seq_len", 4096, "Positions per request (prompt + new tokens); at most the model's.")
    flags.DEFINE_integer("prefill_chunk", 64, "Prompt tokens prefilled per chunk between decode steps.")
    flags.DEFINE_integer("prefill_batch", None, "Prompts prefilled together in one call at most; default "
                         "min(max_batch, 8).")
    flags.DEFINE_integer("decode_parts", None, "Calls a decode step runs as, each over a run of the layers, so a "
                         "new prompt waits for one part, not a step; default 2 on one CPU device, 1 elsewhere.")
    flags.DEFINE_string("dtype", None, "Parameter dtype; default float32 on CPU, bfloat16 on TPU/GPU.")
    flags.DEFINE_string("quantize", None, "Quantize the weights while loading, as `sample --quantize`: int8, int4, "
                        "int8-experts or int4-experts (a checkpoint written with convert --quantize is served as stored).")
    flags.DEFINE_integer("seed", 0, "Seed of the random weights (without --checkpoint).")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (which serves HTTP).")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
