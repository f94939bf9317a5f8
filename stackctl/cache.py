"""The pages NGiNX keeps for the app (``[cache]``): fetch a fresh copy of one now, or drop it.

From the app (a wsgi worker)::

    from stackctl import cache
    cache.refresh("/news/")   # after the news changed: the next visitor gets the new page
    cache.purge("/old/")      # gone from the cache: the next visitor's request goes to the app

and from a shell, ``stackctl cache refresh /news/`` or ``stackctl cache purge /old/``.

How, and why so:

* A refresh is a request to NGiNX's own unix socket in the run directory (``cache.sock``),
  which the site's server block listens on too: there every request skips the cached copy,
  and the app's fresh answer is stored in its place when it is cacheable. The permissions of
  the run directory decide who may ask (the stack's user, root, the service user's group):
  no secret is written into a config, and nobody else can make NGiNX pass every request
  to the app (the cache's protection gone). It is the same server block, with HTTPS on it
  when the site has HTTPS, so the app answers as it would to a visitor (scheme, host).
* Open-source NGiNX has no purge: a purge deletes the file NGiNX keeps the page in, named
  after the MD5 of its cache key under the ``levels`` directories. NGiNX then finds no file
  for the key and asks the app. The directories on the way are the service user's: each is
  opened without following a symbolic link, so that root's ``stackctl cache purge`` never
  deletes anything outside the cache.

Which files and sockets: ``cache.json`` in the run directory, rendered with the NGiNX config.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from stackctl.errors import StackError
from stackctl.settings import is_hostname, is_ip_address

CACHE_SOCKET = "cache.sock"
"""In the run directory; as short a name as circus.ctl, which check_socket_paths measures."""
CACHE_FILE = "cache.json"
"""What :func:`refresh` and :func:`purge` need to know of the running stack's cache."""
KEYS_ZONE = "stackctl_pages"
KEYS_ZONE_SIZE = "10m"
"""NGiNX's shared memory for the keys: about 80,000 pages. Fixed: NGiNX cannot resize a
zone on reload."""
LEVELS = (1, 2)
"""Directory levels of the cache: the last hex digit of the key's MD5, then the two before."""
KEY_FORMAT = "$scheme://$http_host$request_uri"
"""The cache key: the scheme, the Host header and the path with its query, as the client sent
them. The Host header as it is, not NGiNX's $host: the app builds its links from the header,
and $host drops its port, its case and a final dot, and is the host of the request line when
one names it ("GET http://site/ HTTP/1.1" with "Host: evil"). A page built for any other
spelling of the host is never served to the site's visitors."""
REFRESH_HEADER_ROOM = 5
"""Seconds a refresh waits beyond server.timeout, the most the app may take."""


@dataclass(frozen=True)
class Target:
    """The running stack's cache, as :func:`refresh` and :func:`purge` reach it."""

    enabled: bool
    socket: str
    tls: bool
    scheme: str
    host: str
    """The host of the site's cache keys unless a call names another: its first server
    name, or the address a client of this host uses when server.names is "_"."""
    port_suffix: str
    """What a visitor's Host header adds to the host: ":8000", or "" on the default port."""
    pages_dir: str
    timeout: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def load_target(run_dir: Path) -> Target:
    path = run_dir / CACHE_FILE
    try:
        target = Target(**json.loads(path.read_text()))
    except FileNotFoundError:
        target = None
    except (OSError, ValueError, TypeError) as e:
        raise StackError(f"{path}: cannot be read: {e}") from None
    if target is None or not target.enabled:
        raise StackError(
            "this stack keeps no pages at NGiNX on this host: set cache.enabled = true in the "
            "profile of a host that runs NGiNX (cluster.roles with front), then "
            "`stackctl reload`"
        )
    return target


def app_target() -> Target:
    """In a worker of the stack: the cache of the stack that runs it."""
    run_dir = os.environ.get("STACKCTL_RUN_DIR")
    if not run_dir:
        raise StackError(
            "STACKCTL_RUN_DIR is not set: stackctl.cache works in the stack's workers (or use "
            "`stackctl cache refresh|purge PATH` in the stack directory)"
        )
    return load_target(Path(run_dir))


# What a path may hold: RFC 3986's path and query characters, percent-escapes complete. No
# space, control character, "#" or non-ASCII letter; it starts with one "/" (not "//", which
# a client would read as another host).
_PATH = re.compile(r"/(?!/)(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
MAX_PATH = 4096


def check_path(path: object) -> str:
    """The path as NGiNX's $request_uri will hold it, or StackError saying what is allowed."""
    if not isinstance(path, str) or len(path) > MAX_PATH or not _PATH.fullmatch(path):
        shown = repr(path)[:200]
        raise StackError(
            f"cache: {shown} is not a path of the site: expected one starting with a single "
            '"/", such as "/news/?page=2", of letters, digits and - . _ ~ ! $ & \' ( ) * + , ; '
            '= : @ / ? or %XX escapes (no scheme or host, no space or line break, no "#")'
        )
    return path


def check_host(host: object) -> str:
    if not isinstance(host, str) or not (is_hostname(host) or is_ip_address(host)):
        raise StackError(
            f"cache: host {host!r}: expected a host name or an IP address, such as "
            '"example.com"'
        )
    return host.lower().rstrip(".")


def key_host(host: str) -> str:
    """The host as NGiNX's $host holds it: an IPv6 address keeps its brackets."""
    return f"[{host}]" if ":" in host else host


def host_headers(target: Target, host: str | None = None) -> list[str]:
    """The Host headers visitors of ``host`` send: as a browser does, with the site's port;
    on a port other than the default, also without it, as a load balancer in front does."""
    name = key_host(host or target.host)
    return [name + target.port_suffix, name] if target.port_suffix else [name]


def cache_key(target: Target, path: str, host_header: str | None = None) -> str:
    return f"{target.scheme}://{host_header or host_headers(target)[0]}{path}"


def cache_file(
    target: Target, path: str, host_header: str | None = None
) -> tuple[list[str], str]:
    """The directories under pages_dir, and the file name, of the page at ``path``."""
    digest = hashlib.md5(cache_key(target, path, host_header).encode(), usedforsecurity=False)
    name = digest.hexdigest()
    dirs, end = [], len(name)
    for width in LEVELS:
        dirs.append(name[end - width : end])
        end -= width
    return dirs, name


def refresh_at(target: Target, path: str, host: str | None = None) -> int:
    """Ask NGiNX for ``path`` past the cache; the app's answer replaces the kept copy when
    it is cacheable, and drops it when not (a page taken down answers 404: nobody may get
    the old copy until its max-age ends), unless the app failed (5xx: the kept copy is what
    visitors get meanwhile). Returns the answer's HTTP status (the worst, when a copy kept
    under the Host header without the port was refreshed too)."""
    path = check_path(path)
    name = check_host(host) if host else target.host
    first, *others = host_headers(target, name)
    statuses = [_refresh_one(target, path, name, first)]
    for header in others:  # only a copy that is there: no page is fetched for nobody
        if _page_id(target, *cache_file(target, path, header)) is not None:
            statuses.append(_refresh_one(target, path, name, header))
    return max(statuses)


def _refresh_one(target: Target, path: str, name: str, host_header: str) -> int:
    page = cache_file(target, path, host_header)
    before = _page_id(target, *page)
    status = _ask(target, path, name, host_header)
    # NGiNX writes a kept page to a new file and renames it into place: the same file
    # after the answer means the answer was not kept, and the old copy is outdated.
    if before is not None and status < 500 and _page_id(target, *page) == before:
        _unlink_page(target, *page)
    return status


def _ask(target: Target, path: str, name: str, host_header: str) -> int:
    connection = _SocketConnection(target, name)
    try:
        connection.request("GET", path, headers={"Host": host_header})
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as e:
        raise StackError(
            f"cache: NGiNX did not answer the refresh of {path!r} at {target.socket}: {e} "
            "(is the stack running?)"
        ) from None
    finally:
        connection.close()


def purge_at(target: Target, path: str, host: str | None = None) -> bool:
    """Drop the kept copies of ``path`` (under each Host header of its visitors); False when
    there was none."""
    path = check_path(path)
    headers = host_headers(target, check_host(host) if host else None)
    files = [cache_file(target, path, header) for header in headers]
    return [_unlink_page(target, dirs, name) for dirs, name in files].count(True) > 0


def _unlink_page(target: Target, dirs: list[str], name: str) -> bool:
    directory = _open_page_dir(target, dirs)
    if directory is None:
        return False
    try:
        os.unlink(name, dir_fd=directory)  # a link there is removed itself, not followed
    except FileNotFoundError:
        return False
    finally:
        os.close(directory)
    return True


def _page_id(target: Target, dirs: list[str], name: str) -> tuple[int, int] | None:
    """The kept page's file (device and inode); None when there is none, or when this user
    may not look (a refresh needs no access to the pages: NGiNX writes them)."""
    try:
        directory = _open_page_dir(target, dirs)
    except StackError:
        return None
    if directory is None:
        return None
    try:
        found = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(directory)
    return found.st_dev, found.st_ino


def _open_page_dir(target: Target, dirs: list[str]) -> int | None:
    """The directory a page file is in; None if absent. From the run directory down, each
    directory is opened without following a link (the run directory's own path may hold
    links of the operator's, such as a stack directory under a linked /srv). O_PATH: the
    service user may pass through root's nginx-cache without reading it."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
    run_dir = Path(target.socket).parent
    pages = Path(target.pages_dir)
    below: tuple[str, ...] = ()
    start = pages
    if pages.is_relative_to(run_dir):  # always, as rendered
        start, below = run_dir, pages.relative_to(run_dir).parts
    try:
        directory = os.open(start, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StackError(f"cache: cannot open {start}: {e.strerror}") from None
    for part in [*below, *dirs]:
        try:
            inner = os.open(part, flags, dir_fd=directory)
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: a symbolic link, never followed
            raise StackError(
                f"cache: {target.pages_dir}: {part!r} on the way to the page is not a "
                f"directory of the cache ({e.strerror}); nothing was deleted"
            ) from None
        finally:
            os.close(directory)
        directory = inner
    return directory


def refresh(path: str, host: str | None = None) -> int:
    """From the app: fetch a fresh copy of ``path`` into the cache now; its HTTP status.

    ``host``: the site's name the page is cached under, when not the first of server.names."""
    return refresh_at(app_target(), path, host)


def purge(path: str, host: str | None = None) -> bool:
    """From the app: drop the cached copy of ``path``; False when there was none."""
    return purge_at(app_target(), path, host)


class _SocketConnection(http.client.HTTPConnection):
    """HTTP (or HTTPS, as the site) over NGiNX's unix socket for refreshes."""

    def __init__(self, target: Target, server_name: str) -> None:
        super().__init__("localhost", timeout=target.timeout + REFRESH_HEADER_ROOM)
        self._target = target
        self._server_name = server_name

    def connect(self) -> None:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            raw.settimeout(self.timeout)
            raw.connect(self._target.socket)
            if self._target.tls:
                # NGiNX's own socket, in a directory only the stack reaches: whose certificate
                # it is needs no checking (a self-signed one names no authority).
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sni = None if is_ip_address(self._server_name) else self._server_name
                raw = context.wrap_socket(raw, server_hostname=sni)
        except OSError:
            with suppress(OSError):
                raw.close()
            raise
        self.sock = raw
