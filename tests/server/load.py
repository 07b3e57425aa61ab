#!/usr/bin/env python3
"""Bounded load test of `lmspec serve` (any OpenAI-compatible server) over loopback.

Run (the server started beforehand):

    .venv/bin/python tests/server/load.py --base-url http://127.0.0.1:PORT --model default \\
        [--streams 64] [--requests 200] [--concurrency 16] [--seed 0] \\
        [--pid SERVER_PID] [--timeout 900] [--api-key K]

What it does (all requests greedy, ``temperature: 0``, streamed with
``stream_options.include_usage`` through the official ``openai`` client,
``AsyncOpenAI``):

0. Solo answers: each of K distinct prompts (--prompts, default 8) is sent
   alone with ``max_tokens`` = --max-tokens (48) and ``logprobs: true``; its
   text, token strings, token count and finish_reason are the reference. The
   answer to the first ``n`` tokens is the first ``n`` token strings joined
   (a server without logprobs is checked by text prefix and token count).
1. Phase 1: --streams concurrent streams at once, stream i on prompt i mod K
   with ``max_tokens`` = --phase1-max-tokens (32). Every stream's text must
   equal its solo answer cut to that many tokens, with the same token count
   (usage) and finish_reason; since the prompts' answers differ, a token of
   one stream in another shows up as a mismatch. Chunk ids must be constant
   within a stream and distinct across streams.
2. Phase 2: --requests requests, at most --concurrency in flight, each on a
   random prompt with random ``max_tokens`` in 1..--max-tokens; a fraction
   (--disconnect-rate, 0.3) is closed by the client after a random number of
   chunks (0 included). Every other request must complete and equal its solo
   answer cut to its max_tokens.
3. Final: ``GET /health`` is 200 and a normal request equals its solo answer.
   With --pid: the server's VmRSS (from /proc) after the solo answers
   (baseline) and after the load, polled for up to --settle seconds, must come
   back within --rss-tolerance-mb of the baseline, and the process must still
   be alive.

Prints one JSON object (counts per phase, problems, RSS) and exits 1 on any
problem: a lost request (error or timeout), a mismatch, a failed final check
or memory not back to baseline. The whole run is bounded by --timeout.
"""

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Raw, read_rss_kb  # noqa: E402

import openai  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three fruits that are red.",
    "Explain in one paragraph why the sky is blue.",
    "Give me a name for a pet turtle and say why.",
    "How do I boil an egg? Answer step by step.",
    "Tell me a short joke about computers.",
    "What are the three primary colors? Explain briefly what mixing them gives.",
    "Translate 'good morning' into French, Spanish and German.",
    "Describe a thunderstorm to someone who has never seen one.",
    "Write the opening sentence of a mystery novel.",
    "What is the largest planet in the solar system and how big is it?",
]


class Reference:
    """The solo answer of one prompt."""

    def __init__(self, prompt, text, tokens, count, finish):
        self.prompt = prompt
        self.text = text
        self.tokens = tokens  # token strings, or None without logprobs
        self.count = count    # completion tokens
        self.finish = finish

    def expect(self, max_tokens):
        """(text or None, token count, finish_reason) of the answer cut to max_tokens."""
        if max_tokens >= self.count:
            return self.text, self.count, self.finish
        text = "".join(self.tokens[:max_tokens]) if self.tokens else None
        return text, max_tokens, "length"

    def problem(self, result, max_tokens):
        """None if a completed stream matches this answer cut to max_tokens."""
        text, count, finish = self.expect(max_tokens)
        got = result["text"]
        if text is not None and got != text:
            return f"text {got!r} != expected {text!r}"
        if text is None and not self.text.startswith(got):
            return f"text {got!r} is not a prefix of the solo answer {self.text!r}"
        if result["usage"] is None:
            return "no usage chunk"
        if result["usage"] != count:
            return f"completion_tokens {result['usage']} != expected {count}"
        if result["finish"] != finish:
            return f"finish_reason {result['finish']!r} != expected {finish!r}"
        return None


async def stream(client, model, prompt, max_tokens, close_after=None, logprobs=False):
    """One streamed chat request. close_after: close the stream after that
    many chunks (a client disconnect). Returns what was received."""
    result = {"text": "", "tokens": [], "usage": None, "finish": None, "ids": set(),
              "chunks": 0, "closed": False}
    response = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        **({"logprobs": True} if logprobs else {}))
    try:
        if close_after == 0:
            result["closed"] = True
            return result
        pieces = []
        async for chunk in response:
            result["ids"].add(chunk.id)
            if chunk.usage:
                result["usage"] = chunk.usage.completion_tokens
            for choice in chunk.choices or []:
                if choice.delta and choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    result["finish"] = choice.finish_reason
                if logprobs and choice.logprobs and choice.logprobs.content:
                    result["tokens"].extend(getattr(e, "token", None)
                                            for e in choice.logprobs.content)
            result["chunks"] += 1
            if close_after is not None and result["chunks"] >= close_after:
                result["closed"] = True
                break
        result["text"] = "".join(pieces)
        return result
    finally:
        await response.close()


async def solo_answers(client, model, prompts, max_tokens):
    references = []
    for prompt in prompts:
        r = await stream(client, model, prompt, max_tokens, logprobs=True)
        # completion_tokens may count a final EOS token that has no text and
        # no logprobs entry.
        usage = r["usage"] or 0
        fits = len(r["tokens"]) == usage or (r["finish"] == "stop" and len(r["tokens"]) == usage - 1)
        tokens = r["tokens"] if fits else None
        if tokens is not None and not all(isinstance(t, str) for t in tokens):
            tokens = None  # logprobs without token strings
        if (tokens and r["finish"] == "stop" and "".join(tokens) != r["text"]
                and "".join(tokens[:-1]) == r["text"]):
            tokens = tokens[:-1]  # a logprobs entry for the EOS token, not in the text
        if tokens is not None and "".join(tokens) != r["text"]:
            tokens = None  # token strings do not join into the text (split characters)
        references.append(Reference(prompt, r["text"], tokens, r["usage"] or 0, r["finish"]))
    return references


async def phase1(client, args, refs, deadline):
    async def one(i):
        ref = refs[i % len(refs)]
        r = await stream(client, args.model, ref.prompt, args.phase1_max_tokens)
        return i, ref, r

    tasks = [asyncio.ensure_future(one(i)) for i in range(args.streams)]
    report = {"streams": args.streams, "completed": 0, "mismatched": 0, "lost": 0}
    problems = []
    done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
    for task in pending:
        task.cancel()
    report["lost"] += len(pending)
    if pending:
        problems.append(f"phase 1: {len(pending)} streams unfinished at the time limit")
    seen_ids = {}
    for task in done:
        if task.exception():
            report["lost"] += 1
            problems.append(f"phase 1: {type(task.exception()).__name__}: {task.exception()}")
            continue
        i, ref, r = task.result()
        report["completed"] += 1
        problem = ref.problem(r, args.phase1_max_tokens)
        if len(r["ids"]) != 1:
            problem = problem or f"{len(r['ids'])} distinct chunk ids in one stream"
        for chunk_id in r["ids"]:
            if chunk_id in seen_ids:
                problem = problem or f"chunk id {chunk_id!r} also used by stream {seen_ids[chunk_id]}"
            seen_ids[chunk_id] = i
        if problem:
            report["mismatched"] += 1
            problems.append(f"phase 1 stream {i}: {problem}")
    return report, problems


async def phase2(client, args, refs, deadline, rng):
    plan = []
    for i in range(args.requests):
        ref = rng.choice(refs)
        max_tokens = rng.randint(1, args.max_tokens)
        close_after = None
        if rng.random() < args.disconnect_rate:
            close_after = rng.randint(0, max(0, max_tokens - 1))
        plan.append((i, ref, max_tokens, close_after))
    gate = asyncio.Semaphore(args.concurrency)

    async def one(i, ref, max_tokens, close_after):
        async with gate:
            return i, ref, max_tokens, close_after, await stream(
                client, args.model, ref.prompt, max_tokens, close_after)

    tasks = [asyncio.ensure_future(one(*p)) for p in plan]
    report = {"requests": args.requests, "completed": 0, "disconnected": 0, "mismatched": 0,
              "lost": 0}
    problems = []
    done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
    for task in pending:
        task.cancel()
    report["lost"] += len(pending)
    if pending:
        problems.append(f"phase 2: {len(pending)} requests unfinished at the time limit")
    for task in done:
        if task.exception():
            report["lost"] += 1
            problems.append(f"phase 2: {type(task.exception()).__name__}: {task.exception()}")
            continue
        i, ref, max_tokens, close_after, r = task.result()
        if r["closed"]:
            report["disconnected"] += 1
            continue
        report["completed"] += 1
        problem = ref.problem(r, max_tokens)
        if problem:
            report["mismatched"] += 1
            problems.append(f"phase 2 request {i} (max_tokens {max_tokens}): {problem}")
    return report, problems


def settle_rss(pid, baseline_kb, tolerance_kb, seconds):
    """Poll VmRSS until it is within tolerance of the baseline or time runs out."""
    deadline = time.monotonic() + seconds
    rss = read_rss_kb(pid)
    while rss is not None and rss > baseline_kb + tolerance_kb and time.monotonic() < deadline:
        time.sleep(0.5)
        rss = read_rss_kb(pid)
    return rss


async def run(args):
    started = time.monotonic()
    deadline = started + args.timeout
    rng = random.Random(args.seed)
    raw = Raw(args.base_url, args.api_key, timeout=args.request_timeout)
    client = openai.AsyncOpenAI(base_url=raw.url() + "/v1", api_key=args.api_key or "unused",
                                timeout=args.request_timeout, max_retries=0)
    report = {"model": args.model, "seed": args.seed}
    problems = []
    prompts = PROMPTS[: args.prompts]
    refs = await asyncio.wait_for(solo_answers(client, args.model, prompts, args.max_tokens),
                                  timeout=max(1.0, deadline - time.monotonic()))
    texts = [r.text for r in refs]
    report["solo"] = {"prompts": len(refs), "distinct_answers": len(set(texts)),
                      "tokens": [r.count for r in refs],
                      "token_strings": all(r.tokens is not None for r in refs),
                      "seconds": round(time.monotonic() - started, 2)}
    if len(set(texts)) != len(texts):
        problems.append("solo answers are not pairwise distinct: cross-stream mixing could hide")
    rss = {}
    if args.pid:
        rss["baseline_kb"] = read_rss_kb(args.pid)

    t = time.monotonic()
    report["phase1"], p = await phase1(client, args, refs, deadline)
    report["phase1"]["seconds"] = round(time.monotonic() - t, 2)
    problems += p
    if args.pid:
        rss["after_phase1_kb"] = read_rss_kb(args.pid)

    t = time.monotonic()
    report["phase2"], p = await phase2(client, args, refs, deadline, rng)
    report["phase2"]["seconds"] = round(time.monotonic() - t, 2)
    problems += p
    if args.pid:
        rss["after_phase2_kb"] = read_rss_kb(args.pid)

    final = {}
    status, body = raw.request("GET", "/health", timeout=30)
    final["health"] = status
    if status != 200:
        problems.append(f"final GET /health: HTTP {status} {body!r}")
    try:
        r = await asyncio.wait_for(stream(client, args.model, refs[0].prompt, args.max_tokens),
                                   timeout=max(5.0, deadline - time.monotonic() + 30))
        problem = refs[0].problem(r, args.max_tokens)
        final["request"] = "ok" if problem is None else problem
        if problem:
            problems.append(f"final request: {problem}")
    except Exception as error:
        final["request"] = f"{type(error).__name__}: {error}"
        problems.append(f"final request failed: {final['request']}")
    report["final"] = final

    if args.pid:
        if not os.path.exists(f"/proc/{args.pid}"):
            problems.append(f"server process {args.pid} is gone")
        elif rss.get("baseline_kb"):
            tolerance = int(args.rss_tolerance_mb * 1024)
            rss["settled_kb"] = settle_rss(args.pid, rss["baseline_kb"], tolerance, args.settle)
            rss["tolerance_kb"] = tolerance
            grown = (rss["settled_kb"] or 0) - rss["baseline_kb"]
            rss["back_to_baseline"] = grown <= tolerance
            if grown > tolerance:
                problems.append(f"server RSS {rss['settled_kb']} kB after the load, baseline "
                                f"{rss['baseline_kb']} kB (+{grown} kB > {tolerance} kB)")
        report["rss"] = rss
    await client.close()
    report["seconds"] = round(time.monotonic() - started, 2)
    report["problems"] = problems[:30]
    report["problem_count"] = len(problems)
    report["ok"] = not problems
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--streams", type=int, default=64, help="phase 1 concurrent streams")
    parser.add_argument("--requests", type=int, default=200, help="phase 2 requests")
    parser.add_argument("--concurrency", type=int, default=16, help="phase 2 requests in flight")
    parser.add_argument("--prompts", type=int, default=8, help=f"distinct prompts (<= {len(PROMPTS)})")
    parser.add_argument("--max-tokens", type=int, default=48,
                        help="solo answers' max_tokens and phase 2's largest (default 48)")
    parser.add_argument("--phase1-max-tokens", type=int, default=32)
    parser.add_argument("--disconnect-rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pid", type=int, help="the server's process id (for RSS and liveness)")
    parser.add_argument("--rss-tolerance-mb", type=float, default=64)
    parser.add_argument("--settle", type=float, default=10, help="seconds to wait for RSS to drop")
    parser.add_argument("--timeout", type=float, default=900, help="bound of the whole run (s)")
    parser.add_argument("--request-timeout", type=float, default=300)
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in 1..{len(PROMPTS)}")
    if args.phase1_max_tokens > args.max_tokens:
        parser.error("--phase1-max-tokens must not exceed --max-tokens")
    try:
        report = asyncio.run(asyncio.wait_for(run(args), timeout=args.timeout + 60))
    except asyncio.TimeoutError:
        report = {"ok": False, "problems": [f"the run exceeded --timeout {args.timeout} s"]}
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
