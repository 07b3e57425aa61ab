#!/usr/bin/env python3
"""Acceptance checks of `lmspec serve` with the official `openai` and `anthropic` clients.

Drives a running server over loopback and runs each check below (one named
function each), printing one line per check: ``ok NAME``, ``FAIL NAME:
reason`` or ``skip NAME: reason``. Exits 1 if any check failed, else 0.

Run (the server started beforehand, e.g. ``target/debug/lmspec serve --port 0``):

    .venv/bin/python tests/server/clients.py --base-url http://127.0.0.1:PORT \\
        --model default [--api-key K] \\
        [--embedding-model ID --embedding-dir DIR --lmspec target/debug/lmspec] \\
        [--max-context 8192] [--only NAME,NAME] [--skip NAME,NAME] [--list]

``--model`` is the id the server serves (``/v1/models``); ``--api-key`` the
key it was started with (the auth checks are skipped without it);
``--embedding-model`` the id of its embedding model and ``--embedding-dir``
the encoder folder that ``lmspec embed --model DIR`` reads for the reference
vectors (the embeddings check is skipped without them); ``--max-context``
the model's context length, exceeded by the too-long-context check.

The checks (greedy means ``temperature: 0``):

* models, health: ``GET /v1/models`` lists --model; ``GET /health`` is 200.
* chat_nonstream: content is text; usage is consistent (prompt_tokens > 0,
  completion_tokens <= max_tokens, total = prompt + completion); a reply cut
  by max_tokens has finish_reason "length" and exactly max_tokens tokens.
* chat_stream: the concatenated deltas equal the non-stream content (greedy)
  and, with ``stream_options.include_usage``, a final chunk carries the same
  usage.
* stop: a word of the greedy reply given as ``stop`` ends the reply just
  before it, finish_reason "stop" (non-stream and stream).
* logprobs: ``logprobs: true, top_logprobs: 3``: one entry per completion
  token, three alternatives each, sorted, the greedy token first, the tokens
  joined equal the content.
* seed: two requests at temperature 0.8 with the same seed give the same text.
* completions, completions_stream: ``/v1/completions`` text, usage, and the
  streamed text equals the non-stream text.
* tool_call: ``tool_choice`` naming get_weather forces a call:
  finish_reason "tool_calls", arguments JSON valid against the tool's
  parameters schema; the follow-up with the assistant's tool_calls and a
  ``role: tool`` message (tools offered, ``tool_choice: "none"``) gets a text
  answer.
* tool_call_stream: the same forced call streamed: ``tool_calls`` deltas
  (index, id, name, argument fragments) assemble into the non-stream call.
* json_schema, json_object: ``response_format`` output parses as JSON and
  validates against the schema (jsonschema) / is a JSON object.
* anthropic, anthropic_stream: ``/v1/messages`` with the anthropic client;
  the stream's events come in the order message_start, content_block_start,
  content_block_delta..., content_block_stop, message_delta (with usage),
  message_stop, and its text equals the non-stream text (greedy).
* embeddings: ``/v1/embeddings`` vectors (float and the client's default
  base64 encoding) have cosine >= 0.99999 with ``lmspec embed``'s.
* bad_*: malformed JSON, ``max_tokens: -1``, ``messages: "x"``,
  ``temperature: "hot"``, a context longer than --max-context, an unknown
  model (404 model_not_found), an unknown path (404), a missing and a wrong
  API key (401 authentication_error): each the expected 4xx with an
  OpenAI-style error body (``{"error": {"message", "type", "param",
  "code"}}``), and a normal request succeeds right after.
* concurrent8: 8 greedy requests with prompts of different lengths, sent at
  once from 8 threads, each equal (text and token count) to the same request
  served alone.
"""

import argparse
import json
import math
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Raw, error_shape_problem, sse  # noqa: E402

import anthropic  # noqa: E402
import jsonschema  # noqa: E402
import openai  # noqa: E402


class Fail(Exception):
    """A check failed; the message says why."""


class Skip(Exception):
    """A check does not apply to this run."""


def expect(condition, message):
    if not condition:
        raise Fail(message)


CHECKS = []


def check(function):
    CHECKS.append(function)
    return function


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
SHORT = "What is the capital of France?"
LONG = "Write a long story about a dragon who learns to bake bread."


class Context:
    """What every check uses: the arguments and the three clients."""

    def __init__(self, args):
        self.args = args
        self.model = args.model
        self.raw = Raw(args.base_url, args.api_key, timeout=args.timeout)
        base = self.raw.url()
        key = args.api_key or "unused"
        self.openai = openai.OpenAI(base_url=base + "/v1", api_key=key,
                                    timeout=args.timeout, max_retries=0)
        self.anthropic = anthropic.Anthropic(base_url=base, api_key=key,
                                             timeout=args.timeout, max_retries=0)

    def chat(self, content, max_tokens=24, **extra):
        """A non-stream chat completion of one user message (greedy unless told)."""
        extra.setdefault("temperature", 0)
        return self.openai.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens, **extra)

    def chat_stream(self, content, max_tokens=24, **extra):
        """(text, chunks) of a streamed chat completion."""
        extra.setdefault("temperature", 0)
        stream = self.openai.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens, stream=True, **extra)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks

    def still_serving(self):
        """A normal request after a bad one must succeed."""
        try:
            reply = self.chat("Say hi.", max_tokens=2)
        except openai.APIError as error:
            raise Fail(f"the next normal request failed: {error}")
        expect(reply.choices and reply.usage, "the next normal request got no reply/usage")


def check_usage(usage, max_tokens, where):
    expect(usage is not None, f"{where}: no usage")
    expect(usage.prompt_tokens > 0, f"{where}: prompt_tokens {usage.prompt_tokens}")
    expect(0 <= usage.completion_tokens <= max_tokens,
           f"{where}: completion_tokens {usage.completion_tokens} vs max_tokens {max_tokens}")
    expect(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
           f"{where}: total_tokens {usage.total_tokens} != "
           f"{usage.prompt_tokens} + {usage.completion_tokens}")


# --------------------------------------------------------------------------
# Surface


@check
def models(ctx):
    ids = [m.id for m in ctx.openai.models.list().data]
    expect(ctx.model in ids, f"{ctx.model!r} not in /v1/models ids {ids}")


@check
def health(ctx):
    status, body = ctx.raw.request("GET", "/health")
    expect(status == 200, f"GET /health: HTTP {status} {body!r}")


@check
def chat_nonstream(ctx):
    reply = ctx.chat(SHORT, max_tokens=48)
    choice = reply.choices[0]
    expect(isinstance(choice.message.content, str) and choice.message.content,
           f"content {choice.message.content!r}")
    expect(choice.message.role == "assistant", f"role {choice.message.role!r}")
    expect(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
    check_usage(reply.usage, 48, "short reply")
    cut = ctx.chat(LONG, max_tokens=8)
    check_usage(cut.usage, 8, "cut reply")
    expect(cut.choices[0].finish_reason == "length",
           f"cut reply: finish_reason {cut.choices[0].finish_reason!r} (expected 'length')")
    expect(cut.usage.completion_tokens == 8,
           f"cut reply: completion_tokens {cut.usage.completion_tokens}, expected 8")


@check
def chat_stream(ctx):
    reply = ctx.chat(LONG, max_tokens=24)
    text, chunks = ctx.chat_stream(LONG, max_tokens=24, stream_options={"include_usage": True})
    expect(text == reply.choices[0].message.content,
           f"stream {text!r} != non-stream {reply.choices[0].message.content!r}")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    expect(finishes == [reply.choices[0].finish_reason],
           f"stream finish_reasons {finishes}, non-stream {reply.choices[0].finish_reason!r}")
    usage = [c.usage for c in chunks if c.usage]
    expect(usage, "no chunk with usage although include_usage was set")
    expect(chunks[-1].usage is not None, "the usage chunk is not the last")
    expect(not chunks[-1].choices, f"the usage chunk has choices {chunks[-1].choices}")
    last = usage[-1]
    expect((last.prompt_tokens, last.completion_tokens, last.total_tokens)
           == (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens),
           f"stream usage {last} != non-stream usage {reply.usage}")


@check
def stop(ctx):
    full = ctx.chat(LONG, max_tokens=32).choices[0].message.content
    words = full.split()
    expect(len(words) >= 4, f"the greedy reply is too short to pick a stop word: {full!r}")
    word = next((w for w in words[2:] if len(w) >= 3 and full.index(w) > 0), None)
    expect(word is not None, f"no stop word found in {full!r}")
    expected = full[: full.index(word)]
    reply = ctx.chat(LONG, max_tokens=32, stop=[word])
    choice = reply.choices[0]
    expect(choice.message.content == expected,
           f"stop {word!r}: {choice.message.content!r}, expected {expected!r}")
    expect(choice.finish_reason == "stop", f"stop {word!r}: finish_reason {choice.finish_reason!r}")
    text, _ = ctx.chat_stream(LONG, max_tokens=32, stop=word)
    expect(text == expected, f"streamed, stop {word!r}: {text!r}, expected {expected!r}")


@check
def logprobs(ctx):
    reply = ctx.chat(LONG, max_tokens=8, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    expect(choice.logprobs is not None and choice.logprobs.content is not None,
           "no choices[0].logprobs.content")
    entries = choice.logprobs.content
    expect(len(entries) == reply.usage.completion_tokens,
           f"{len(entries)} logprob entries for {reply.usage.completion_tokens} completion tokens")
    for i, entry in enumerate(entries):
        expect(isinstance(entry.token, str), f"entry {i}: token {entry.token!r}")
        expect(isinstance(entry.logprob, (int, float)) and entry.logprob <= 1e-6,
               f"entry {i}: logprob {entry.logprob!r}")
        top = entry.top_logprobs
        expect(top is not None and len(top) == 3, f"entry {i}: {len(top or [])} top_logprobs")
        values = [t.logprob for t in top]
        expect(values == sorted(values, reverse=True), f"entry {i}: top_logprobs unsorted {values}")
        expect(top[0].token == entry.token and math.isclose(top[0].logprob, entry.logprob,
                                                             abs_tol=1e-4),
               f"entry {i}: greedy token {entry.token!r} ({entry.logprob}) is not the top "
               f"alternative {top[0].token!r} ({top[0].logprob})")
    joined = "".join(e.token for e in entries)
    expect(joined == choice.message.content,
           f"tokens joined {joined!r} != content {choice.message.content!r}")


@check
def seed(ctx):
    first = ctx.chat(LONG, max_tokens=24, temperature=0.8, seed=1234)
    second = ctx.chat(LONG, max_tokens=24, temperature=0.8, seed=1234)
    a, b = first.choices[0].message.content, second.choices[0].message.content
    expect(a == b, f"same seed, different text: {a!r} vs {b!r}")


@check
def completions(ctx):
    reply = ctx.openai.completions.create(model=ctx.model, prompt="The capital of France is",
                                          max_tokens=12, temperature=0)
    expect(isinstance(reply.choices[0].text, str) and reply.choices[0].text,
           f"text {reply.choices[0].text!r}")
    check_usage(reply.usage, 12, "completions")


@check
def completions_stream(ctx):
    prompt = "Once upon a time"
    reply = ctx.openai.completions.create(model=ctx.model, prompt=prompt, max_tokens=16,
                                          temperature=0)
    stream = ctx.openai.completions.create(model=ctx.model, prompt=prompt, max_tokens=16,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text or "" for c in chunks if c.choices)
    expect(text == reply.choices[0].text, f"stream {text!r} != non-stream {reply.choices[0].text!r}")
    usage = [c.usage for c in chunks if c.usage]
    expect(usage and usage[-1].completion_tokens == reply.usage.completion_tokens,
           f"stream usage {usage[-1] if usage else None} vs {reply.usage}")


# --------------------------------------------------------------------------
# Tools and structured output


def forced_call(ctx):
    return ctx.openai.chat.completions.create(
        model=ctx.model, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_tokens=64, temperature=0)


def validate_call(name, arguments):
    expect(name == "get_weather", f"function name {name!r}")
    expect(isinstance(arguments, str), f"arguments is {type(arguments).__name__}, not a string")
    try:
        parsed = json.loads(arguments)
    except ValueError:
        raise Fail(f"arguments are not JSON: {arguments!r}")
    try:
        jsonschema.validate(parsed, WEATHER_TOOL["function"]["parameters"])
    except jsonschema.ValidationError as error:
        raise Fail(f"arguments {parsed!r} do not validate: {error.message}")
    return parsed


@check
def tool_call(ctx):
    reply = forced_call(ctx)
    choice = reply.choices[0]
    expect(choice.finish_reason == "tool_calls", f"finish_reason {choice.finish_reason!r}")
    calls = choice.message.tool_calls
    expect(calls, f"no tool_calls; content {choice.message.content!r}")
    call = calls[0]
    expect(call.type == "function" and call.id, f"call type {call.type!r}, id {call.id!r}")
    arguments = validate_call(call.function.name, call.function.arguments)
    check_usage(reply.usage, 64, "tool call")
    follow = ctx.openai.chat.completions.create(
        model=ctx.model,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": choice.message.content,
             "tool_calls": [{"id": call.id, "type": "function",
                             "function": {"name": call.function.name,
                                          "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id,
             "content": json.dumps({"city": arguments.get("city"), "sky": "sunny",
                                    "temperature_c": 21})},
        ],
        tools=[WEATHER_TOOL], tool_choice="none", max_tokens=32, temperature=0)
    answer = follow.choices[0]
    expect(not answer.message.tool_calls, f"the follow-up called tools again: {answer.message.tool_calls}")
    expect(isinstance(answer.message.content, str) and answer.message.content.strip(),
           f"the follow-up has no text: {answer.message.content!r}")
    expect(answer.finish_reason in ("stop", "length"), f"follow-up finish_reason {answer.finish_reason!r}")


@check
def tool_call_stream(ctx):
    reply = forced_call(ctx)
    stream = ctx.openai.chat.completions.create(
        model=ctx.model, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_tokens=64, temperature=0, stream=True)
    calls, finish, saw_delta = {}, [], False
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.finish_reason:
            finish.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            saw_delta = True
            entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                entry["id"] = delta.id
            if delta.function and delta.function.name:
                entry["name"] += delta.function.name
            if delta.function and delta.function.arguments:
                entry["arguments"] += delta.function.arguments
    expect(saw_delta, "no tool_calls deltas in the stream")
    expect(finish == ["tool_calls"], f"finish_reasons {finish}")
    expect(sorted(calls) == list(range(len(calls))), f"tool call indices {sorted(calls)}")
    first = calls[0]
    expect(first["id"], "the streamed call has no id")
    validate_call(first["name"], first["arguments"])
    want = reply.choices[0].message.tool_calls
    expect(want and json.loads(first["arguments"]) == json.loads(want[0].function.arguments),
           f"streamed arguments {first['arguments']!r} != non-stream "
           f"{want[0].function.arguments if want else None!r}")


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@check
def json_schema(ctx):
    reply = ctx.chat("Invent a person. Answer in JSON with name, age and city.", max_tokens=160,
                     response_format={"type": "json_schema",
                                      "json_schema": {"name": "person", "schema": PERSON_SCHEMA,
                                                      "strict": True}})
    content = reply.choices[0].message.content
    try:
        value = json.loads(content)
    except (TypeError, ValueError):
        raise Fail(f"content is not JSON (finish_reason {reply.choices[0].finish_reason!r}): "
                   f"{content!r}"[:400])
    try:
        jsonschema.validate(value, PERSON_SCHEMA)
    except jsonschema.ValidationError as error:
        raise Fail(f"{value!r} does not validate: {error.message}")


@check
def json_object(ctx):
    # A prompt the small default model answers with a flat object: with
    # "Describe a cat as a JSON object." it nests objects until max_tokens.
    reply = ctx.chat('Return a JSON object with two keys: "name" (a string) and "age" (a number).',
                     max_tokens=160,
                     response_format={"type": "json_object"})
    content = reply.choices[0].message.content
    try:
        value = json.loads(content)
    except (TypeError, ValueError):
        raise Fail(f"content is not JSON (finish_reason {reply.choices[0].finish_reason!r}): "
                   f"{content!r}"[:400])
    expect(isinstance(value, dict), f"not a JSON object: {value!r}")


# --------------------------------------------------------------------------
# Anthropic


# The pinned anthropic client has no `temperature` argument: it goes in the
# body (the Messages API field) through extra_body.
ANTHROPIC_ARGS = {
    "max_tokens": 24,
    "system": "You are a helpful assistant.",
    "messages": [{"role": "user", "content": LONG}],
    "extra_body": {"temperature": 0},
}


@check
def anthropic_nonstream(ctx):
    message = ctx.anthropic.messages.create(model=ctx.model, **ANTHROPIC_ARGS)
    expect(message.type == "message" and message.role == "assistant",
           f"type {message.type!r}, role {message.role!r}")
    expect(message.content and message.content[0].type == "text" and message.content[0].text,
           f"content {message.content!r}")
    expect(message.stop_reason in ("end_turn", "max_tokens", "stop_sequence"),
           f"stop_reason {message.stop_reason!r}")
    usage = message.usage
    expect(usage.input_tokens > 0 and 0 < usage.output_tokens <= ANTHROPIC_ARGS["max_tokens"],
           f"usage {usage}")


@check
def anthropic_stream(ctx):
    message = ctx.anthropic.messages.create(model=ctx.model, **ANTHROPIC_ARGS)
    raw = {"message_start", "content_block_start", "content_block_delta", "content_block_stop",
           "message_delta", "message_stop"}
    events = []
    with ctx.anthropic.messages.stream(model=ctx.model, **ANTHROPIC_ARGS) as stream:
        for event in stream:
            if event.type in raw:
                events.append(event)
        text = stream.get_final_text()
    kinds = [e.type for e in events]
    squeezed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    expect(squeezed == ["message_start", "content_block_start", "content_block_delta",
                        "content_block_stop", "message_delta", "message_stop"],
           f"event sequence {squeezed}")
    delta = next(e for e in events if e.type == "message_delta")
    expect(delta.usage is not None and delta.usage.output_tokens > 0,
           f"message_delta usage {delta.usage}")
    expect(delta.delta.stop_reason == message.stop_reason,
           f"stream stop_reason {delta.delta.stop_reason!r} != {message.stop_reason!r}")
    expect(text == message.content[0].text,
           f"stream text {text!r} != non-stream {message.content[0].text!r}")


# --------------------------------------------------------------------------
# Embeddings


EMBED_TEXTS = ["A sentence about the sea.", "Another one, about mountains and snow.", "x"]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@check
def embeddings(ctx):
    args = ctx.args
    if not args.embedding_model:
        raise Skip("no --embedding-model given")
    if not args.embedding_dir:
        raise Skip("no --embedding-dir given (the folder for lmspec embed)")
    run = subprocess.run([args.lmspec, "embed", "--model", args.embedding_dir, *EMBED_TEXTS],
                         capture_output=True, text=True, timeout=args.timeout)
    expect(run.returncode == 0, f"lmspec embed failed: {run.stderr[-400:]}")
    want = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    expect(len(want) == len(EMBED_TEXTS), f"lmspec embed printed {len(want)} vectors")
    for encoding in ("float", None):
        extra = {"encoding_format": encoding} if encoding else {}
        reply = ctx.openai.embeddings.create(model=args.embedding_model, input=EMBED_TEXTS, **extra)
        data = sorted(reply.data, key=lambda d: d.index)
        expect([d.index for d in data] == list(range(len(EMBED_TEXTS))),
               f"indices {[d.index for d in reply.data]}")
        for text, got, ref in zip(EMBED_TEXTS, data, want):
            vector = list(got.embedding)
            expect(len(vector) == len(ref), f"{text!r}: {len(vector)} dims, lmspec embed {len(ref)}")
            similarity = cosine(vector, ref)
            expect(similarity >= 0.99999,
                   f"{text!r} ({encoding or 'client default'} encoding): cosine {similarity}")
        expect(reply.usage is not None and reply.usage.prompt_tokens > 0, f"usage {reply.usage}")
    single = ctx.openai.embeddings.create(model=args.embedding_model, input=EMBED_TEXTS[0],
                                          encoding_format="float")
    expect(len(single.data) == 1 and cosine(single.data[0].embedding, want[0]) >= 0.99999,
           "a single string input does not give the batch's first vector")


# --------------------------------------------------------------------------
# Bad input


def expect_error(ctx, status, body, want_status, want_type=None, want_code=None):
    expect(status == want_status, f"HTTP {status} (expected {want_status}): {str(body)[:300]}")
    problem = error_shape_problem(body)
    expect(problem is None, problem)
    if want_type:
        expect(body["error"]["type"] == want_type,
               f"error.type {body['error']['type']!r} (expected {want_type!r})")
    if want_code:
        expect(body["error"]["code"] == want_code,
               f"error.code {body['error']['code']!r} (expected {want_code!r})")
    ctx.still_serving()


def chat_body(ctx, **fields):
    body = {"model": ctx.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    body.update(fields)
    return body


@check
def bad_malformed_json(ctx):
    status, body = ctx.raw.request("POST", "/v1/chat/completions", b'{"model": "x", "messages": [')
    expect_error(ctx, status, body, 400, "invalid_request_error")


@check
def bad_negative_max_tokens(ctx):
    status, body = ctx.raw.request("POST", "/v1/chat/completions", chat_body(ctx, max_tokens=-1))
    expect_error(ctx, status, body, 400, "invalid_request_error")


@check
def bad_messages_type(ctx):
    status, body = ctx.raw.request("POST", "/v1/chat/completions", chat_body(ctx, messages="x"))
    expect_error(ctx, status, body, 400, "invalid_request_error")


@check
def bad_temperature_type(ctx):
    status, body = ctx.raw.request("POST", "/v1/chat/completions",
                                   chat_body(ctx, temperature="hot"))
    expect_error(ctx, status, body, 400, "invalid_request_error")


@check
def bad_context_too_long(ctx):
    words = ctx.args.max_context + 256  # " hello" is one token in common BPE vocabularies
    content = "hello" + " hello" * words
    # Refused before any work: a short timeout (a server that runs the prompt
    # would take minutes on a CPU).
    status, body = ctx.raw.request("POST", "/v1/chat/completions",
                                   chat_body(ctx, messages=[{"role": "user", "content": content}],
                                             max_tokens=1), timeout=ctx.args.refusal_timeout)
    expect_error(ctx, status, body, 400, "invalid_request_error")


@check
def bad_unknown_model(ctx):
    status, body = ctx.raw.request("POST", "/v1/chat/completions",
                                   chat_body(ctx, model="no-such-model-xyz"))
    expect_error(ctx, status, body, 404, "invalid_request_error", "model_not_found")
    expect(body["error"]["param"] == "model", f"error.param {body['error']['param']!r}")


@check
def bad_unknown_path(ctx):
    status, body = ctx.raw.request("POST", "/v1/no/such/path", chat_body(ctx))
    expect_error(ctx, status, body, 404)


@check
def bad_missing_key(ctx):
    if not ctx.args.api_key:
        raise Skip("no --api-key given")
    status, body = ctx.raw.request("POST", "/v1/chat/completions", chat_body(ctx), auth=False)
    expect_error(ctx, status, body, 401, "authentication_error")


@check
def bad_wrong_key(ctx):
    if not ctx.args.api_key:
        raise Skip("no --api-key given")
    status, body = ctx.raw.request("POST", "/v1/chat/completions", chat_body(ctx), auth=False,
                                   headers={"Authorization": "Bearer wrong-" + ctx.args.api_key})
    expect_error(ctx, status, body, 401, "authentication_error")
    try:
        openai.OpenAI(base_url=ctx.raw.url() + "/v1", api_key="wrong", max_retries=0,
                      timeout=ctx.args.timeout).models.list()
        raise Fail("the openai client with a wrong key was not refused")
    except openai.AuthenticationError:
        pass


# --------------------------------------------------------------------------
# Batching


CONCURRENT_PROMPTS = [
    "Hi.",
    "Name a color.",
    "What is two plus two? Answer briefly.",
    "Tell me one fact about the moon and one fact about the sun.",
    "Describe a busy market in the morning: the sounds, the smells, the people and the goods.",
    "I am planning a trip to the mountains next week. What should I pack if the weather "
    "is cold and wet, and I will be hiking for three days and sleeping in huts?",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 12) + " Summarize this text.",
    " ".join([f"Item {i}: a box of {i} apples." for i in range(1, 31)]) + " How many items?",
]


@check
def concurrent8(ctx):
    max_tokens = 16
    alone = [ctx.chat(p, max_tokens=max_tokens) for p in CONCURRENT_PROMPTS]
    together = [None] * len(CONCURRENT_PROMPTS)
    barrier = threading.Barrier(len(CONCURRENT_PROMPTS))

    def worker(i):
        barrier.wait()
        try:
            together[i] = ctx.chat(CONCURRENT_PROMPTS[i], max_tokens=max_tokens)
        except Exception as error:  # reported below
            together[i] = error

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(CONCURRENT_PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lengths = sorted({a.usage.prompt_tokens for a in alone})
    expect(len(lengths) == len(CONCURRENT_PROMPTS), f"prompt lengths not distinct: {lengths}")
    problems = []
    for i, (a, b) in enumerate(zip(alone, together)):
        if isinstance(b, Exception):
            problems.append(f"#{i}: {b}")
            continue
        ta, tb = a.choices[0].message.content, b.choices[0].message.content
        if ta != tb or a.usage.completion_tokens != b.usage.completion_tokens:
            problems.append(f"#{i} ({a.usage.prompt_tokens} prompt tokens): alone {ta!r}, "
                            f"batched {tb!r}")
    expect(not problems, f"{len(problems)}/8 differ: " + "; ".join(problems))


# --------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--base-url", help="e.g. http://127.0.0.1:8080 (required)")
    parser.add_argument("--model", help="the served model id (required)")
    parser.add_argument("--api-key")
    parser.add_argument("--embedding-model", help="the served embedding model id")
    parser.add_argument("--embedding-dir", help="the encoder folder, for lmspec embed")
    parser.add_argument("--lmspec", default="target/debug/lmspec", help="the lmspec binary")
    parser.add_argument("--max-context", type=int, default=8192,
                        help="the model's context length (default 8192, SmolLM2's)")
    parser.add_argument("--timeout", type=float, default=300, help="per-request timeout (s)")
    parser.add_argument("--refusal-timeout", type=float, default=30,
                        help="timeout (s) of the too-long-context request, to be refused at once")
    parser.add_argument("--only", help="comma-separated check names")
    parser.add_argument("--skip", help="comma-separated check names not to run")
    parser.add_argument("--list", action="store_true", help="list the check names")
    args = parser.parse_args(argv)

    if args.list:
        print("\n".join(c.__name__ for c in CHECKS))
        return 0
    if not args.base_url or not args.model:
        parser.error("--base-url and --model are required")
    selected = CHECKS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {c.__name__ for c in CHECKS})
        if unknown:
            parser.error(f"unknown checks {unknown}")
        selected = [c for c in CHECKS if c.__name__ in names]
    if args.skip:
        names = {n.strip() for n in args.skip.split(",") if n.strip()}
        unknown = sorted(names - {c.__name__ for c in CHECKS})
        if unknown:
            parser.error(f"unknown checks {unknown}")
        selected = [c for c in selected if c.__name__ not in names]
    if args.embedding_model and not args.embedding_dir:
        args.embedding_dir = args.embedding_model
    ctx = Context(args)
    failed = 0
    for function in selected:
        name = function.__name__
        started = time.monotonic()
        try:
            function(ctx)
            line = f"ok {name}"
        except Skip as why:
            line = f"skip {name}: {why}"
        except Fail as why:
            failed += 1
            line = f"FAIL {name}: {why}"
        except (openai.APIError, anthropic.APIError) as error:
            failed += 1
            body = getattr(error, "body", None)
            line = f"FAIL {name}: {type(error).__name__}: {error}" + (
                f" body={str(body)[:300]}" if body and str(body) not in str(error) else "")
        except Exception as error:  # a crash in a check is that check's failure
            failed += 1
            where = traceback.extract_tb(error.__traceback__)[-1]
            line = (f"FAIL {name}: {type(error).__name__}: {error} "
                    f"({Path(where.filename).name}:{where.lineno})")
        print(line.replace("\n", " "), flush=True)
        print(f"  ({name}: {time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    print(f"{len(selected) - failed}/{len(selected)} checks passed or skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
