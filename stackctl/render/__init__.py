"""Pure rendering: a :class:`~stackctl.stack.Stack` in, a list of :class:`File` out.

Each rendered artifact has its own module (``circus``, ``nginx``, ``uwsgi``, ``redis``) that
prepares plain values for a logic-free template. Nothing here touches the disk except to read
templates; writing is :func:`stackctl.generation.write` 's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from stackctl.errors import StackError


@dataclass(frozen=True)
class File:
    name: str
    content: str


def _reject(value: str, forbidden: str, target: str) -> str:
    for char in forbidden:
        if char in value:
            raise StackError(
                f"{value!r} cannot be written into the {target} config: it contains {char!r}"
            )
    return value


def nginx_quote(value: Any) -> str:
    """A double-quoted NGiNX string. ``$`` would start a variable there, so it is refused."""
    text = _reject(str(value), "$\n\r\0", "NGiNX")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# A location regex is not expanded (no variables), so "$" is its end anchor; every other
# character outside this set is refused rather than escaped.
_NGINX_REGEX = re.compile(r"[\w.~/\-\[\]()|?*+^{},:\\$]*")


def nginx_regex(value: Any) -> str:
    """A regular expression for an NGiNX ``location ~``, double-quoted (NGiNX needs quotes
    around a regex with braces). ``stackctl.settings.file_name_pattern`` has checked what
    the profile gives; this refuses what no location regex stackctl writes may hold."""
    text = str(value)
    if not _NGINX_REGEX.fullmatch(text):
        raise StackError(
            f"{text!r} cannot be written into the NGiNX config as a regular expression: only "
            "letters, digits and . ~ / - [ ] ( ) | ? * + ^ { } , : \\ $ may appear in one"
        )
    return '"' + text.replace("\\", "\\\\") + '"'


def ini_value(value: Any) -> str:
    """A Circus ini value: it runs to the end of the line, so a line break is refused."""
    return _reject(str(value), "\n\r\0", "Circus")


def ini_env(env: dict[str, str]) -> str:
    return "\n".join(f"{ini_value(k)} = {ini_value(v)}" for k, v in env.items())


def uwsgi_value(value: Any) -> str:
    """A uWSGI ini value. uWSGI expands ``%`` and ``$(...)`` in its config, so both are refused."""
    return _reject(str(value), "%$\n\r\0", "uWSGI")


def redis_value(value: Any) -> str:
    text = _reject(str(value), "\n\r\0", "Redis")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def environment() -> Any:
    """The Jinja environment of every renderer: a typo in a template fails, never renders empty."""
    import jinja2

    from stackctl import resources

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        nginx=nginx_quote,
        nginx_regex=nginx_regex,
        ini=ini_value,
        ini_env=ini_env,
        uwsgi=uwsgi_value,
        redis=redis_value,
    )
    return env


def render_template(name: str, **values: Any) -> str:
    return str(environment().get_template(name).render(**values))
