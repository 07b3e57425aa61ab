"""Render chat templates with jinja2 the way transformers' apply_chat_template does.

Shared by smollm2_reference.py and make_template_fixtures.py. The
environment matches the one transformers 5.x compiles chat templates in
(transformers/utils/chat_template_utils.py):

* jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
  lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]);
* the ``tojson`` filter replaced by
  json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
  sort_keys=sort_keys) (jinja2's own escapes HTML characters and sorts keys);
* globals ``raise_exception(message)`` (raises jinja2.TemplateError with the
  message) and ``strftime_now(format)`` (datetime.now().strftime(format),
  or a fixed date when one is given, so outputs can be reproduced);
* the template sees ``messages``, ``tools``, ``documents``,
  ``add_generation_prompt`` and the extra keyword arguments (transformers
  passes the tokenizer's special tokens, ``bos_token``, ``eos_token``, ...,
  and any extra context such as ``enable_thinking``).

Left out: transformers' ``{% generation %}`` tag (assistant-token masks), its
``namespace``/``dict`` wrappers that refuse underscore-prefixed names (jinja2's
own ``namespace`` and ``dict`` behave the same otherwise), and its
conversion of rich objects in the inputs to plain JSON data.
"""

import json
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def make_environment(fixed_now=None):
    """A jinja2 environment configured like transformers' chat templates.

    fixed_now: a datetime used by strftime_now instead of the current time.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])

    def strftime_now(format):
        return (fixed_now or datetime.now()).strftime(format)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render(template, messages, tools=None, documents=None, add_generation_prompt=False,
           env=None, **extra):
    """The template rendered like apply_chat_template(..., tokenize=False)."""
    env = env or make_environment()
    return env.from_string(template).render(
        messages=messages,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )
