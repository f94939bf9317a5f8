"""Profiles: TOML files validated, once, into one typed :class:`Profile`.

Precedence, lowest first (each layer replaces keys of the ones before it):

1. the defaults in :mod:`stackctl.settings`;
2. the stack file, ``stack.toml`` (what the app is: its WSGI callable, static directory...);
3. the profile's ``extends`` chain, base first, then the profile itself (how this host runs it);
4. the command line (``--set KEY=VALUE``, ``--workers``, ``--listen``...).

Profiles are looked up in the stack's ``profiles/`` directory, then among the shipped ones. A
stack's own ``profiles/prod.toml`` may say ``extends = "prod"``: that names the shipped ``prod``,
so a host file can adjust a shipped profile without copying it.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackctl import background, cluster, resources
from stackctl.errors import StackError
from stackctl.settings import (
    BY_KEY,
    REQUIRED,
    SECTION_TYPES,
    SECTIONS,
    SETTINGS,
    AppConfig,
    CacheConfig,
    ClusterConfig,
    HeadersConfig,
    Invalid,
    LimitsConfig,
    LogsConfig,
    MediaConfig,
    MetricsConfig,
    PathsConfig,
    RedisConfig,
    ServerConfig,
    StaticConfig,
    TlsConfig,
    WsConfig,
    WsgiConfig,
)
from stackctl.settings import (
    Listen as Listen,  # re-exported: a Profile's server.listen is one
)

STACK_FILE = "stack.toml"
PROFILE_NAME = re.compile(r"[\w-][\w.-]{0,99}")
DEFAULT_PROFILE = "dev"


@dataclass(frozen=True)
class Profile:
    """Everything the renderers and the supervisor need to know, validated."""

    name: str
    reason: str
    stack_dir: Path
    server: ServerConfig
    app: AppConfig
    wsgi: WsgiConfig
    ws: WsConfig
    static: StaticConfig
    media: MediaConfig
    redis: RedisConfig
    paths: PathsConfig
    logs: LogsConfig
    tls: TlsConfig
    headers: HeadersConfig
    limits: LimitsConfig
    cluster: ClusterConfig
    cache: CacheConfig
    metrics: MetricsConfig
    watchers: tuple[background.WatcherConfig, ...] = ()
    """The [watchers.NAME] programs, by name."""
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Which file (or the command line, or the defaults) gave each key its value."""

    def source(self, key: str) -> str:
        return self.sources.get(key, "defaults")

    def value(self, key: str) -> Any:
        if background.is_key(key):
            return background.value(self.watchers, key)
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)

    def where(self, key: str) -> str:
        """How an error names a key: the file that set it, the key and its value."""
        value = self.value(key)
        return f"{self.source(key)}: {key}: {str(value) if isinstance(value, Listen) else value!r}"


@dataclass(frozen=True)
class Layer:
    """Validated values from one source, named so that errors can point at it."""

    source: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str


# --- reading files ---------------------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise StackError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise StackError(f"{path}: not valid TOML: {e}") from None


def _unknown(source: str, what: str, name: str, known: Iterable[str]) -> StackError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; allowed: {', '.join(sorted(known))}"
    return StackError(f"{source}: {name}: unknown {what}{hint}")


def validate(source: str, flat: Mapping[str, Any]) -> Layer:
    """Check each key and value; the error names the source, the key, the value, the rule."""
    values: dict[str, Any] = {}
    for key, raw in flat.items():
        if background.is_key(key):
            values[key] = background.parse(source, key, raw)
            continue
        setting = BY_KEY.get(key)
        if setting is None:
            raise _unknown(source, "key", key, BY_KEY)
        try:
            values[key] = setting.parse(raw)
        except Invalid as e:
            raise StackError(f"{source}: {key}: {e}") from None
    return Layer(source, values)


def flatten(source: str, document: Mapping[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    """Turn ``{"wsgi": {"workers": 4}}`` into ``{"wsgi.workers": 4}``, rejecting stray keys.

    ``extra`` names the top-level keys the file kind allows besides the setting sections
    (``extends`` in a profile, ``hosts`` in the stack file); the caller reads those itself.
    """
    flat: dict[str, Any] = {}
    for section, table in document.items():
        if section in extra:
            continue
        if section == background.SECTION:
            flat.update(background.flatten(source, table))
            continue
        if section not in SECTIONS:
            raise _unknown(source, "section", section, [*SECTIONS, background.SECTION, *extra])
        if not isinstance(table, dict):
            raise StackError(f"{source}: {section}: expected a table of settings, got {table!r}")
        for name, value in table.items():
            flat[f"{section}.{name}"] = value
    return flat


# --- the stack file and profiles ---------------------------------------------------------------


@dataclass(frozen=True)
class StackFile:
    path: Path
    layer: Layer
    hosts: dict[str, str]


def load_stack_file(stack_dir: Path) -> StackFile:
    path = stack_dir / STACK_FILE
    if not path.is_file():
        raise StackError(
            f"{path}: no stack file here; run `stackctl init` in {stack_dir} first "
            "(or pass --stack DIR)"
        )
    document = read_toml(path)
    hosts = document.get("hosts", {})
    if not isinstance(hosts, dict) or not all(isinstance(v, str) for v in hosts.values()):
        raise StackError(
            f'{path}: hosts: expected a table of "host-name pattern" = "profile name", '
            f"got {hosts!r}"
        )
    layer = validate(str(path), flatten(str(path), document, extra=("hosts",)))
    return StackFile(path, layer, dict(hosts))


def profile_dirs(stack_dir: Path) -> list[Path]:
    return [stack_dir / "profiles", resources.bundled_profiles_dir()]


def find_profile(name: str, stack_dir: Path, skip: Path | None = None) -> Path | None:
    for directory in profile_dirs(stack_dir):
        candidate = directory / f"{name}.toml"
        if candidate.is_file() and (skip is None or candidate.resolve() != skip.resolve()):
            return candidate
    return None


def available_profiles(stack_dir: Path) -> list[str]:
    names = {p.stem for d in profile_dirs(stack_dir) if d.is_dir() for p in d.glob("*.toml")}
    return sorted(names)


def load_profile_chain(name: str, stack_dir: Path) -> list[Layer]:
    """The profile and the ones it extends, base first."""
    chain: list[Layer] = []
    seen: list[Path] = []
    wanted, skip, referrer = name, None, "profile"
    while True:
        if not PROFILE_NAME.fullmatch(wanted):
            # A name is a file name in profiles/, and it is written into every rendered config.
            raise StackError(
                f"{referrer}: {wanted!r} is not a profile name: letters, digits, '.', '_' "
                "and '-', not starting with '.'"
            )
        path = find_profile(wanted, stack_dir, skip)
        if path is None:
            known = ", ".join(available_profiles(stack_dir))
            raise StackError(f"{referrer}: no profile named {wanted!r}; known profiles: {known}")
        if path.resolve() in seen:
            raise StackError(f"{path}: extends: the chain loops back on itself")
        seen.append(path.resolve())
        document = read_toml(path)
        chain.insert(0, validate(str(path), flatten(str(path), document, extra=("extends",))))
        parent = document.get("extends")
        if parent is None:
            return chain
        if not isinstance(parent, str) or not parent:
            raise StackError(f"{path}: extends: expected a profile name, got {parent!r}")
        wanted, skip, referrer = parent, path, f"{path}: extends"


def choose_profile(
    explicit: str | None,
    hosts: Mapping[str, str],
    hostnames: list[str],
    exists: Callable[[str], bool],
) -> Choice:
    """Pick the profile for this host and say why.

    In order: ``--profile``; the first pattern of the stack file's ``[hosts]`` that matches
    one of this host's names; a profile named after the host; else ``dev``.
    """
    if explicit:
        return Choice(explicit, "given with --profile")
    for pattern, name in hosts.items():
        for hostname in hostnames:
            if fnmatch.fnmatchcase(hostname.lower(), pattern.lower()):
                return Choice(name, f"host {hostname!r} matches {pattern!r} in [hosts]")
    for hostname in hostnames:
        if exists(hostname):
            return Choice(hostname, f"a profile is named after host {hostname!r}")
    return Choice(DEFAULT_PROFILE, f"no [hosts] pattern or profile matches host {hostnames[0]!r}")


# --- the command line ----------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``wsgi.workers=4`` → ``("wsgi.workers", 4)``; the value is read as TOML when it parses."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise StackError(f"command line: --set {text}: expected KEY=VALUE, e.g. wsgi.workers=4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def command_line_layer(overrides: Iterable[tuple[str, Any]]) -> Layer:
    return validate("command line", dict(overrides))


# --- assembling the model ------------------------------------------------------------------------


def defaults_layer() -> Layer:
    """The declared defaults, parsed like any other layer: a default that skipped its parser
    (server.listen as a plain string) crashed `up` for a profile that did not set it."""
    return validate("defaults", {s.key: s.default for s in SETTINGS if s.default is not REQUIRED})


def merge(layers: Iterable[Layer]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer.values)
    return merged


def build(name: str, reason: str, stack_dir: Path, layers: list[Layer],
          addresses: Callable[[], set[str]] = cluster.local_addresses) -> Profile:  # fmt: skip
    """The profile of ``layers``; ``addresses``: this host's IP addresses, asked only when
    cluster.address must be found among them."""
    values = merge(layers)
    sources = {key: layer.source for layer in layers for key in layer.values}
    for setting in SETTINGS:
        if setting.key not in values:
            flag = f" or pass {setting.flag}" if setting.flag else ""
            raise StackError(
                f"{stack_dir / STACK_FILE}: {setting.key}: required; set it there{flag} "
                f"({setting.help})"
            )
    sections = {
        section: cls(
            **{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(f"{section}.")}
        )
        for section, cls in SECTION_TYPES.items()
    }
    watchers = background.build(values, sources)
    built = Profile(name=name, reason=reason, stack_dir=stack_dir, sources=sources,
                    watchers=watchers, **sections)  # fmt: skip
    built = cluster.with_address(built, addresses)
    check_url_prefixes(built)
    check_tls_settings(built)
    cluster.check(built)
    return built


SAVED = "the settings the running stack was started with"


def saved_values(profile: Profile) -> dict[str, Any]:
    """Every key's value as a profile file would write it, for :func:`from_saved_values`."""

    def plain(value: Any) -> Any:
        if value is None:  # a setting turned off ("")
            return ""
        return list(value) if isinstance(value, tuple) else value if isinstance(
            value, bool | int | str) else str(value)  # fmt: skip

    return {**{s.key: plain(profile.value(s.key)) for s in SETTINGS},
            **background.saved_values(profile.watchers)}  # fmt: skip


def from_saved_values(stack_dir: Path, name: str, values: Mapping[str, Any]) -> Profile:
    """The profile a stack was started with, from :func:`saved_values`, checked again: to
    stop or inspect a stack whose profile files were since edited into something invalid."""
    return build(name, SAVED, stack_dir.resolve(), [defaults_layer(), validate(SAVED, values)])


CLIENT_PREFIX = "/_stackctl/"
"""Where NGiNX serves stackctl's browser client, realtime.js."""


def url_prefixes(profile: Profile) -> dict[str, str]:
    """Each URL prefix NGiNX routes on its own, by the key that sets it."""
    prefixes = {
        "ws.prefix": profile.ws.prefix,
        "ws.sse_prefix": profile.ws.sse_prefix,
        "ws.poll_prefix": profile.ws.poll_prefix,
    }
    if profile.static.dir:  # without a static directory, static.url routes nothing
        prefixes["static.url"] = profile.static.url
    if profile.media.dir:
        prefixes["media.url"] = profile.media.url
    return prefixes


def check_url_prefixes(profile: Profile) -> None:
    """NGiNX sends a request to the location of its longest matching prefix: two equal
    prefixes make `nginx -t` fail, and one inside another hides part of the outer one's
    URLs (static.url = /ws/static/ would serve files where channels were expected)."""
    prefixes = url_prefixes(profile)
    # Of two equal prefixes, the error names first the one that was set, not a default.
    for key in sorted(prefixes, key=lambda k: profile.source(k) == "defaults"):
        prefix = prefixes[key]
        where = profile.where(key)
        if prefix.startswith(CLIENT_PREFIX) or CLIENT_PREFIX.startswith(prefix):
            raise StackError(
                f"{where} overlaps {CLIENT_PREFIX}, where stackctl serves its browser client; "
                "choose another prefix"
            )
        for other, other_prefix in prefixes.items():
            if other != key and prefix.startswith(other_prefix):
                relation = "is the same as" if prefix == other_prefix else "lies inside"
                raise StackError(
                    f"{where} {relation} {other} ({other_prefix!r}, from "
                    f"{profile.source(other)}); each URL prefix needs its own, and none may "
                    "start with another: change one of them"
                )


def check_tls_settings(profile: Profile) -> None:
    """The certificate and key settings go together; HTTPS needs a port of its own."""
    from stackctl.tls import profile_problem

    problem = profile_problem(profile.tls.certificate, profile.tls.key)
    if problem:
        # Name the file that set the key, or, when none did, the one that set the certificate.
        key = "tls.key" if profile.tls.key else "tls.certificate"
        raise StackError(f"{profile.source(key)}: {problem}")
    plain, secure = profile.server.listen, profile.tls.listen
    if profile.tls.certificate and plain.port == secure.port:
        raise StackError(
            f"{profile.where('tls.listen')} uses the port of "
            f"server.listen ({plain}, from {profile.source('server.listen')}); HTTPS needs a "
            'port of its own, such as "0.0.0.0:443" beside "0.0.0.0:80"'
        )


def load(
    stack_dir: Path,
    explicit: str | None = None,
    overrides: Iterable[tuple[str, Any]] = (),
    hostnames: list[str] | None = None,
    addresses: Callable[[], set[str]] = cluster.local_addresses,
) -> Profile:
    """Read the stack file, choose and read a profile, apply the command line: one Profile."""
    stack_dir = stack_dir.resolve()
    stack = load_stack_file(stack_dir)
    cli = command_line_layer(overrides)
    choice = choose_profile(
        explicit,
        stack.hosts,
        hostnames or host_names(),
        lambda n: find_profile(n, stack_dir) is not None,
    )
    chain = load_profile_chain(choice.name, stack_dir)
    layers = [defaults_layer(), stack.layer, *chain, cli]
    return build(choice.name, choice.reason, stack_dir, layers, addresses)


def host_names() -> list[str]:
    """This host's short name and its fully qualified name, for [hosts] patterns."""
    import socket

    names = [socket.gethostname()]
    fqdn = socket.getfqdn()
    if fqdn not in names:
        names.append(fqdn)
    short = names[0].split(".", 1)[0]
    if short not in names:
        names.insert(0, short)
    return names
