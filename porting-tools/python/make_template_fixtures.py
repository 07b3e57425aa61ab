#!/usr/bin/env python3
"""Render the test chat templates in goldens/templates/ with jinja2 configured like transformers.

The templates (*.jinja, written for lmspec, not copied from models) use what
real Hugging Face chat templates use: whitespace control with trim_blocks
and lstrip_blocks, namespace(), {% break %}/{% continue %}, macros,
raise_exception, tojson (with indent), string methods, tests and filters.
Each case below renders one template with given messages, tools,
add_generation_prompt, bos_token/eos_token and extra context, with the
environment of chat_render.py, and is written with its expected output:

    goldens/templates/
        *.jinja      the templates (inputs; not written by this script)
        cases.json   [{"name", "template", "messages", "tools",
                       "add_generation_prompt", "extra", "bos_token",
                       "eos_token", "expected"} or, for a case that raises,
                      "expected_error" (the message) instead of "expected"]
        meta.json    generator command, versions, environment

No output depends on the date: strftime_now is fixed (FIXED_NOW) and every
case is also rendered with a second date and must give the same text. When
transformers is importable, every case is also rendered by transformers'
own render_jinja_template and must agree.

Usage (from the repository root):

    .venv/bin/python porting-tools/python/make_template_fixtures.py [--dir goldens/templates]
"""

import argparse
import json
import platform
import shlex
import sys
from datetime import datetime
from pathlib import Path

import jinja2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_render import make_environment, render  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "porting-tools/python/make_template_fixtures.py"
PYTHON = ".venv/bin/python"
DEFAULT_DIR = "goldens/templates"

FIXED_NOW = datetime(2025, 1, 2, 3, 4, 5)
OTHER_NOW = datetime(2031, 12, 30, 23, 59, 59)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
# A bare function schema (no "type"/"function" wrapper) and no description.
TIME_TOOL = {
    "name": "get_time",
    "parameters": {
        "type": "object",
        "properties": {"timezone": {"type": "string"}},
    },
}

CASES = [
    {
        "name": "chatml_default_system",
        "template": "chatml.jinja",
        "messages": [{"role": "user", "content": "Hello!"}],
        "add_generation_prompt": True,
    },
    {
        "name": "chatml_system_multi_turn",
        "template": "chatml.jinja",
        "messages": [
            {"role": "system", "content": "  You answer in one word.\n"},
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "  And grass?  "},
        ],
        "add_generation_prompt": False,
    },
    {
        "name": "chatml_extra_default_system_non_ascii",
        "template": "chatml.jinja",
        "messages": [
            {"role": "user", "content": "Traduis « bonjour » en japonais, s'il te plaît. Привет, 世界! 🌊"},
            {"role": "assistant", "content": "こんにちは (konnichiwa)."},
        ],
        "add_generation_prompt": True,
        "extra": {"default_system": "Tu es un traducteur précis."},
    },
    {
        "name": "tools_call_and_result",
        "template": "tools.jinja",
        "messages": [
            {"role": "system", "content": "You are a weather bot.\n"},
            {"role": "user", "content": "  Weather in Zürich and the time there?  "},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Zürich", "unit": "celsius"}}},
                    {"type": "function", "function": {"name": "get_time",
                                                      "arguments": {"timezone": "Europe/Zurich"}}},
                ],
            },
            {"role": "tool", "name": "get_weather", "content": "{\"temp\": 3, \"sky\": \"grey\"}"},
            {"role": "tool", "content": "09:41"},
            {"role": "assistant", "content": "It is 3 °C and grey; the time is 09:41."},
        ],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "add_generation_prompt": False,
    },
    {
        "name": "tools_string_arguments_and_think",
        "template": "tools.jinja",
        "messages": [
            {"role": "user", "content": "What's the weather in 東京?"},
            {
                "role": "assistant",
                "content": "<think>I should call the tool.</think>\n\nLet me check.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather",
                                                      "arguments": "{\"city\": \"東京\"}"}},
                ],
            },
            {"role": "tool", "name": "get_weather", "content": "sunny"},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": True,
    },
    {
        "name": "tools_none_content_parts",
        "template": "tools.jinja",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Describe this picture:"},
                {"type": "image", "url": "https://example.invalid/cat.png"},
                {"type": "text", "text": "briefly."},
            ]},
            {"role": "assistant", "content": "A cat on a mat."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": None,
        "add_generation_prompt": True,
    },
    {
        "name": "tools_bad_role_raises",
        "template": "tools.jinja",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "narrator", "content": "Meanwhile..."},
        ],
        "tools": None,
        "add_generation_prompt": False,
    },
    {
        "name": "thinking_off_generation_prompt",
        "template": "thinking.jinja",
        "messages": [{"role": "user", "content": "  Is 17 prime?  "}],
        "add_generation_prompt": True,
        "extra": {"enable_thinking": False, "date_string": "26 Jul 2024"},
    },
    {
        "name": "thinking_on_multi_turn",
        "template": "thinking.jinja",
        "messages": [
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "<think>\nTrivial sum.\n</think>\n\n4"},
            {"role": "user", "content": "Times 3?"},
            {"role": "assistant", "content": "12\n", "reasoning_content": "  4 * 3 = 12.  "},
        ],
        "add_generation_prompt": False,
        "extra": {"enable_thinking": True, "date_string": "01 Jan 2025"},
    },
    {
        "name": "thinking_default_inline_think_after_last_user",
        "template": "thinking.jinja",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "<think>Any colour works.</think>\nRed."},
        ],
        "add_generation_prompt": True,
        "extra": {"date_string": "15 Mar 2026"},
    },
    {
        "name": "inst_multi_turn",
        "template": "inst.jinja",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "  Hello! How can I help?  "},
            {"role": "user", "content": "Tell me a joke."},
        ],
        "add_generation_prompt": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
    },
    {
        "name": "inst_system",
        "template": "inst.jinja",
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Good morning"},
            {"role": "assistant", "content": "Bonjour"},
        ],
        "add_generation_prompt": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
    },
    {
        "name": "inst_system_goes_to_last_user",
        "template": "inst.jinja",
        "messages": [
            {"role": "system", "content": "Keep it short."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
        "add_generation_prompt": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
    },
    {
        "name": "inst_alternation_raises",
        "template": "inst.jinja",
        "messages": [
            {"role": "user", "content": "One"},
            {"role": "user", "content": "Two"},
        ],
        "add_generation_prompt": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
    },
]

# bos_token/eos_token of cases that do not set them (transformers passes the
# tokenizer's special tokens to every template).
DEFAULT_BOS = "<|begin|>"
DEFAULT_EOS = "<|end_of_text|>"


def render_case(template, case, fixed_now):
    """(text, None) or (None, error message) for one case."""
    env = make_environment(fixed_now=fixed_now)
    try:
        text = render(template, case["messages"], tools=case["tools"],
                      add_generation_prompt=case["add_generation_prompt"], env=env,
                      bos_token=case["bos_token"], eos_token=case["eos_token"], **case["extra"])
        return text, None
    except jinja2.exceptions.TemplateError as error:
        return None, str(error)


def render_with_transformers(template, case):
    """The same case through transformers' render_jinja_template, or an exception."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[case["messages"]], tools=case["tools"], chat_template=template,
            add_generation_prompt=case["add_generation_prompt"],
            bos_token=case["bos_token"], eos_token=case["eos_token"], **case["extra"])
        return rendered[0], None
    except jinja2.exceptions.TemplateError as error:
        return None, str(error)


def repo_relative(path):
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(Path(path).resolve())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", default=DEFAULT_DIR,
                        help=f"folder with the templates; cases.json and meta.json go there "
                        f"(default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    folder = Path(args.dir)
    if not folder.is_absolute():
        folder = REPO_ROOT / folder

    try:
        import transformers
        transformers_version = transformers.__version__
    except Exception:  # pragma: no cover - optional cross-check
        transformers_version = None

    names = set()
    results = []
    agreed_with_transformers = 0
    for spec in CASES:
        case = {
            "name": spec["name"],
            "template": spec["template"],
            "messages": spec["messages"],
            "tools": spec.get("tools"),
            "add_generation_prompt": spec["add_generation_prompt"],
            "extra": spec.get("extra", {}),
            "bos_token": spec.get("bos_token", DEFAULT_BOS),
            "eos_token": spec.get("eos_token", DEFAULT_EOS),
        }
        if case["name"] in names:
            raise SystemExit(f"duplicate case name {case['name']}")
        names.add(case["name"])
        template = (folder / case["template"]).read_text(encoding="utf-8")
        text, error = render_case(template, case, FIXED_NOW)
        if render_case(template, case, OTHER_NOW) != (text, error):
            raise RuntimeError(f"{case['name']}: the output depends on the date")
        if transformers_version is not None:
            if render_with_transformers(template, case) != (text, error):
                raise RuntimeError(f"{case['name']}: transformers renders it differently")
            agreed_with_transformers += 1
        if error is None:
            case["expected"] = text
        else:
            case["expected_error"] = error
        results.append(case)
        print(f"--- {case['name']} ({case['template']})")
        print(text if error is None else f"[error] {error}", end="" if error is None else "\n")

    with open(folder / "cases.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
        f.write("\n")
    parts = [PYTHON, SCRIPT]
    if repo_relative(folder) != DEFAULT_DIR:
        parts += ["--dir", repo_relative(folder)]
    meta = {
        "generator": " ".join(shlex.quote(p) for p in parts),
        "jinja2_version": jinja2.__version__,
        "transformers_version": transformers_version,
        "python_version": platform.python_version(),
        "environment": "jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, "
                       "extensions=[jinja2.ext.loopcontrols]); filter tojson(x, ensure_ascii=False, "
                       "indent=None, separators=None, sort_keys=False) = json.dumps(...); globals "
                       "raise_exception(message) -> TemplateError(message), strftime_now(format); "
                       "render(messages=, tools=, documents=None, add_generation_prompt=, bos_token=, "
                       "eos_token=, **extra)",
        "strftime_now_fixed": FIXED_NOW.isoformat(),
        "date_independent": f"every case renders the same with strftime_now fixed at {OTHER_NOW.isoformat()}",
        "transformers_cross_check": (
            f"{agreed_with_transformers} of {len(results)} cases equal transformers' render_jinja_template "
            "(text or error message)" if transformers_version else "transformers unavailable: skipped"),
        "templates": sorted({c["template"] for c in results}),
        "cases": len(results),
    }
    with open(folder / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"\nwrote {repo_relative(folder)}/cases.json ({len(results)} cases) and meta.json; "
          f"{meta['transformers_cross_check']}")


if __name__ == "__main__":
    main(sys.argv[1:])
