"""Requests per second and p99 through the stack, against peers measured in the same run.

    python benchmarks/bench_http.py [--seconds 10] [--connections 64]

A trivial app and an app that sleeps 20 ms per request, each behind:
  ceiling   NGiNX answering `return 200` itself (trivial app only)
  uwsgi     hand-written NGiNX -> uWSGI --master, same process count, unix socket
  gunicorn  NGiNX -> gunicorn, same number of sync workers
  stackctl  `stackctl up`: NGiNX -> Circus-held socket -> master-less uWSGI pool
then a burst of 256 concurrent connections at the stack, which must get no errors.
Then one large stylesheet (the size of Wagtail's admin core.css) served by the stack's NGiNX:
  plain         to a client that takes no gzip
  on the fly    gzipped on every request (static.compress = false, as before gzip_static)
  gzip_static   the .gz file stackctl wrote once at `up`, sent as is
and the time `up`'s compression takes over a large static tree, the first time and after.
Then a page the app renders (a 400-row table, 20 kB) on a stack with cache.enabled:
  cached        NGiNX answers from its cache (X-Cache-Status: HIT)
  uncached      the same page for a visitor with a session cookie: the app renders it each time
Machines here are noisy, so the ratios (same run) are the figures to read, not the rates.

    python benchmarks/bench_http.py --static-only    # just the static part
    python benchmarks/bench_http.py --cache-only     # just the cached page
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    APPS,
    Result,
    nginx_alone,
    nginx_gunicorn,
    nginx_uwsgi,
    stackctl_stack,
    workdir,
    wrk,
)

from stackctl.compress import compress_tree  # noqa: E402
from stackctl.stack import usable_cpus  # noqa: E402

SLEEP_SECONDS = 0.020
Figure = tuple[str, float, float | None]
"""A ratio measured in this run: what it compares, its value, and its target if it has one."""
CSS_SIZE = 200_000  # bytes: about Wagtail's admin core.css, minified
ACCEPT_GZIP = ("Accept-Encoding: gzip",)
TREE_FILES = 4000  # a large collectstatic: Django admin, Wagtail and an app's own
TREE_CHANGED = 40


def row(result: Result) -> str:
    return (
        f"  {result.name:<22} {result.rps:>10.0f} req/s   p99 {result.p99_ms:>7.1f} ms   "
        f"{result.requests:>8} requests   {result.errors} errors"
    )


def measure(run: Path, app: str, workers: int, connections: int, seconds: int) -> dict[str, Result]:
    results: dict[str, Result] = {}
    peers = [("uwsgi", nginx_uwsgi), ("gunicorn", nginx_gunicorn), ("stackctl", stackctl_stack)]
    if app == "hello":
        with nginx_alone(run) as server:
            url = f"http://127.0.0.1:{server.port}/"
            results["ceiling"] = wrk("nginx return 200", url, connections, seconds)
            print(row(results["ceiling"]), flush=True)
    for name, peer in peers:
        with peer(run, app, workers) as server:
            url = f"http://127.0.0.1:{server.port}/"
            wrk(name, url, connections, 2)  # warm-up
            results[name] = wrk(f"{name} ({app})", url, connections, seconds)
            print(row(results[name]), flush=True)
    return results


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"  (target >= {target})  " + ("ok" if ratio >= target else "BELOW TARGET")


def stylesheet(size: int, seed: int = 9) -> bytes:
    """Minified CSS of about ``size`` bytes, as repetitive as a real framework's (BEM class
    names, a palette, the same properties over and over): it gzips about as well."""
    rng = random.Random(seed)
    blocks = ["button", "panel", "nav", "menu", "form", "field", "tab", "modal", "card", "list"]
    parts = ["header", "body", "footer", "title", "icon", "label", "item", "link", "input"]
    states = ["", "--active", "--disabled", "--secondary", "--small", "--large"]
    properties = [
        "display:flex", "display:none", "align-items:center", "justify-content:space-between",
        "font-weight:600", "font-size:.875rem", "line-height:1.5", "position:relative",
        "border-radius:.3125rem", "transition:color .1s ease-in-out", "overflow:hidden",
        "text-decoration:none", "cursor:pointer", "white-space:nowrap", "width:100%",
    ]  # fmt: skip
    out: list[str] = []
    while sum(map(len, out)) < size:
        selector = f".w-{rng.choice(blocks)}__{rng.choice(parts)}{rng.choice(states)}"
        chosen = rng.sample(properties, rng.randint(2, 6))
        chosen.append(f"color:#{rng.randrange(0x1000000):06x}")
        chosen.append(f"margin:{rng.randint(0, 40) / 8:g}rem {rng.randint(0, 40) / 8:g}rem")
        out.append(f"{selector}{{{';'.join(chosen)}}}")
    return "".join(out).encode()


def fetched(url: str, headers: tuple[str, ...]) -> tuple[str, int]:
    """The Content-Encoding and size of one answer, to check that a run measures what it says."""
    request = urllib.request.Request(url, headers=dict(h.split(": ", 1) for h in headers))
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers.get("Content-Encoding", "identity"), len(response.read())


def measure_static(run: Path, workers: int, connections: int, seconds: int) -> dict[str, Result]:
    css = stylesheet(CSS_SIZE)
    print(f"a {len(css) / 1000:.0f} kB stylesheet ({len(gzip.compress(css, 9)) / 1000:.0f} kB "
          "gzipped), from the stack's NGiNX:")  # fmt: skip
    results: dict[str, Result] = {}
    cases = [
        ("plain", (), "identity", ()),
        ("on the fly", ACCEPT_GZIP, "gzip", ("--set", "static.compress=false")),
        ("gzip_static", ACCEPT_GZIP, "gzip", ()),
    ]
    for name, headers, encoding, options in cases:
        with stackctl_stack(run, "hello", workers, *options, static={"core.css": css}) as server:
            url = f"http://127.0.0.1:{server.port}/static/core.css"
            got, size = fetched(url, headers)
            if got != encoding:
                raise RuntimeError(f"{name}: expected Content-Encoding {encoding}, got {got}")
            wrk(name, url, connections, 2, headers=headers)  # warm-up
            results[name] = wrk(name, url, connections, seconds, headers=headers)
            print(row(results[name]) + f"   {size / 1000:.0f} kB each", flush=True)
    return results


def measure_compress_once(run: Path) -> tuple[float, float, float]:
    """Seconds of up's compression over a large static tree: first, unchanged, a few changed."""
    static = Path(tempfile.mkdtemp(prefix="tree-", dir=run)) / "static"
    css = stylesheet(12_000)
    for i in range(TREE_FILES):
        path = static / f"app{i % 40}" / f"file{i}.{('css', 'js', 'svg', 'json')[i % 4]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(css[: 2000 + (i * 131) % 10_000] + str(i).encode())
    first = compress_tree(static.parent, static)
    unchanged = compress_tree(static.parent, static)
    for i in range(0, TREE_FILES, TREE_FILES // TREE_CHANGED):
        path = next((static / f"app{i % 40}").glob(f"file{i}.*"))
        os.utime(path, ns=(time.time_ns(), time.time_ns()))
    changed = compress_tree(static.parent, static)
    assert (first.compressed, unchanged.compressed, changed.compressed) == (
        TREE_FILES, 0, TREE_CHANGED), (first, unchanged, changed)  # fmt: skip
    print(f"compressing a {TREE_FILES}-file static tree: first time {first.seconds:.2f} s, "
          f"unchanged {unchanged.seconds:.2f} s, {TREE_CHANGED} changed "
          f"{changed.seconds:.2f} s")  # fmt: skip
    return first.seconds, unchanged.seconds, changed.seconds


def static_figures(
    run: Path, workers: int, connections: int, seconds: int
) -> tuple[list[Figure], int]:
    """The static part's ratios, and its error count."""
    static = measure_static(run, workers, connections, seconds)
    first, unchanged, _ = measure_compress_once(run)
    fly, precompressed = static["on the fly"].rps, static["gzip_static"].rps
    figures: list[Figure] = [
        ("gzip_static / on the fly, stylesheet", precompressed / fly, 4.0),
        ("gzip_static / plain, stylesheet", precompressed / static["plain"].rps, 0.8),
        ("compression time, first pass / unchanged tree", first / unchanged, 10.0),
    ]
    return figures, sum(r.errors for r in static.values())


PAGE_APP = APPS + """
def page(environ, start_response):
    rows = "".join(
        f"<tr><td>{i}</td><td>item {i * 7919 % 1000}</td><td>{i * 0.37:.2f}</td></tr>"
        for i in range(400)
    )
    body = f"<html><body><table>{rows}</table></body></html>".encode()
    start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(body))),
                              ("Cache-Control", "public, max-age=60")])
    return [body]
"""
SESSION = ("Cookie: sessionid=bench",)
"""A logged-in visitor's request: never answered from the cache."""


def cache_status(url: str, headers: tuple[str, ...]) -> str:
    request = urllib.request.Request(url, headers=dict(h.split(": ", 1) for h in headers))
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
        return str(response.headers.get("X-Cache-Status"))


def cache_figures(
    run: Path, workers: int, connections: int, seconds: int
) -> tuple[list[Figure], int]:
    """The cached page against the same page rendered by the app, on one stack."""
    print("a rendered page, from a stack with cache.enabled:")
    results: dict[str, Result] = {}
    options = ("--set", "cache.enabled=true")
    with stackctl_stack(run, "page", workers, *options, apps=PAGE_APP) as server:
        url = f"http://127.0.0.1:{server.port}/"
        for name, headers, status in (("cached", (), "HIT"), ("uncached", SESSION, "BYPASS")):
            cache_status(url, headers)  # the first GET fills the cache
            got = cache_status(url, headers)
            if got != status:
                raise RuntimeError(f"{name}: expected X-Cache-Status {status}, got {got}")
            wrk(name, url, connections, 2, headers=headers)  # warm-up
            results[name] = wrk(name, url, connections, seconds, headers=headers)
            print(row(results[name]), flush=True)
    ratio = results["cached"].rps / results["uncached"].rps
    figures: list[Figure] = [("cached page / same page uncached", ratio, 3.0)]
    return figures, sum(r.errors for r in results.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--static-only", action="store_true", help="only the static files part")
    parser.add_argument("--cache-only", action="store_true", help="only the cached page part")
    args = parser.parse_args()
    workers = 2 * usable_cpus()
    print(
        f"{workers} workers (2 x {usable_cpus()} CPUs), {args.connections} connections, "
        f"{args.seconds} s per run"
    )

    if args.static_only:
        with workdir() as run:
            return report(*static_figures(run, workers, args.connections, args.seconds))
    if args.cache_only:
        with workdir() as run:
            return report(*cache_figures(run, workers, args.connections, args.seconds))

    with workdir() as run:
        print("trivial app:")
        hello = measure(run, "hello", workers, args.connections, args.seconds)
        print("app sleeping 20 ms per request:")
        sleepy = measure(run, "sleepy", workers, args.connections, args.seconds)
        with stackctl_stack(run, "hello", workers) as server:
            url = f"http://127.0.0.1:{server.port}/"
            burst = wrk("stackctl burst 256", url, 256, 5, threads=2)
        print(row(burst))
        static, static_errors = static_figures(run, workers, args.connections, args.seconds)
        cached, cache_errors = cache_figures(run, workers, args.connections, args.seconds)

    stack, ceiling = hello["stackctl"], workers / SLEEP_SECONDS
    figures: list[Figure] = [
        ("stack / gunicorn, trivial app", stack.rps / hello["gunicorn"].rps, 2.0),
        ("stack / hand-written uWSGI, trivial app", stack.rps / hello["uwsgi"].rps, 0.95),
        ("stack / NGiNX ceiling, trivial app", stack.rps / hello["ceiling"].rps, None),
        ("stack / gunicorn, sleep app", sleepy["stackctl"].rps / sleepy["gunicorn"].rps, None),
        ("stack / uWSGI, sleep app", sleepy["stackctl"].rps / sleepy["uwsgi"].rps, None),
        (f"stack / sleep ceiling ({ceiling:.0f} req/s)", sleepy["stackctl"].rps / ceiling, 0.97),
        *static,
        *cached,
    ]
    stack_runs = [hello["stackctl"], sleepy["stackctl"], burst]
    return report(figures, sum(r.errors for r in stack_runs) + static_errors + cache_errors)


def report(figures: list[Figure], errors: int) -> int:
    print("\nratios (same run):")
    failed = False
    for label, ratio, target in figures:
        print(f"  {label:<44} {ratio:6.2f}{verdict(ratio, target)}")
        failed |= target is not None and ratio < target
    print(f"  stack errors, all its runs (and the 256-connection burst): {errors}  (target 0)")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
