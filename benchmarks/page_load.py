"""Seed 000's table, today: a page of 196 small resources over HTTP/1.1 and over HTTP/2.

    python benchmarks/page_load.py [--runs 7] [--latency-ms 100]

In 2012 a Django view with 196 associated resources, behind Jetty, loaded in 7.63 s over
HTTP/1.1 and 1.71 s over SPDY/3 (1.55 s with server push), at 100 ms of round-trip delay. Here
the same shape of page: the app (through the stack's uWSGI workers) renders the HTML, which
names 140 images, 28 stylesheets and 28 scripts under /static/ (NGiNX serves them, the text
ones from the .gz that `up` wrote). `stackctl up --profile prod` with a self-signed certificate
serves it over TLS; headless Chromium, driven through the tests' DevTools client, loads it with
100 ms of latency added to every request (Network.emulateNetworkConditions).

HTTP/1.1 and HTTP/2 are the same stack, the same certificate and the same browser: only
Chromium's --disable-http2 switch differs, so that ALPN settles on http/1.1 and the browser
opens its usual 6 connections per host. (Switching the stack's config instead would change
more than the protocol.) Each run starts a new browser with a new profile: an empty cache, no
open connection, no TLS session to resume. The load time is the page's own
loadEventEnd (Navigation Timing); a run counts only if all 196 resources came from the network
over the protocol it claims. The second visit of each run, in the same browser with its cache,
shows what far-future cache headers (static.immutable) leave to do. The median of the runs is
reported, and the last line is

    page load: HTTP/1.1 <s> s, HTTP/2 <s> s, ratio <x>

with exit status 1 when the ratio is under the seed's 4.5.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import statistics
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.browser

from common import free_port, stackctl_stack, workdir  # noqa: E402

from tests.browser import Browser, chromium_binary  # noqa: E402

SEED = {"HTTP/1.1": 7.63, "SPDY/3": 1.71, "SPDY/3 with push": 1.55}
TARGET = 4.5
IMAGES, STYLESHEETS, SCRIPTS = 140, 28, 28
RESOURCES = IMAGES + STYLESHEETS + SCRIPTS  # 196, as in the seed
PROTOCOLS = {"HTTP/1.1": ("http/1.1", ("--disable-http2",)), "HTTP/2": ("h2", ())}
LOAD_TIMEOUT = 120.0

PAGE_APP = """
PAGE = {page!r}


def page(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(PAGE)))])
    return [PAGE]
"""

# What one visit tells: its load time, the protocol of the page, and its resources.
FACTS = """(() => {
    const page = performance.getEntriesByType('navigation')[0];
    const resources = performance.getEntriesByType('resource');
    return {load_ms: page.loadEventEnd, protocol: page.nextHopProtocol,
            resources: resources.length,
            from_network: resources.filter(r => r.transferSize > 0).length,
            protocols: [...new Set(resources.map(r => r.nextHopProtocol))]};
})()"""


@dataclass(frozen=True)
class Visit:
    seconds: float
    protocol: str
    resources: int
    from_network: int
    protocols: list[str]


# --- the page ----------------------------------------------------------------------------------


def png(rng: random.Random, side: int = 24) -> bytes:
    """A small valid PNG (noisy, so that it stays about 1-2 kB, like a thumbnail or icon)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    base = [rng.randrange(256) for _ in range(3)]
    rows = b"".join(
        b"\0" + bytes(min(255, c + rng.randrange(48)) for _ in range(side) for c in base)
        for _ in range(side)
    )
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))  # fmt: skip


def stylesheet(n: int, rng: random.Random) -> bytes:
    rules = [
        f".s{n}-{k} {{ color: #{rng.randrange(0x1000000):06x}; margin: {k % 9}px; "
        f"padding: {rng.randrange(20)}px {rng.randrange(20)}px; }}"
        for k in range(60)
    ]
    return "\n".join(rules).encode()


def script(n: int, rng: random.Random) -> bytes:
    table = ", ".join(str(rng.randrange(10**6)) for _ in range(300))
    return (f"window.loadedScripts = (window.loadedScripts || 0) + 1;\n"
            f"window.table{n} = [{table}];\n").encode()  # fmt: skip


def fingerprinted(directory: str, stem: str, extension: str, content: bytes) -> str:
    """A name as Django's ManifestStaticFilesStorage gives it: static.immutable's default."""
    return f"{directory}/{stem}.{hashlib.md5(content).hexdigest()[:12]}.{extension}"


def page_and_files(seed: int = 196) -> tuple[bytes, dict[str, bytes]]:
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    kinds = [("css", "s", "css", STYLESHEETS, stylesheet), ("js", "j", "js", SCRIPTS, script)]
    for directory, prefix, extension, count, make in kinds:
        for n in range(count):
            content = make(n, rng)
            files[fingerprinted(directory, f"{prefix}{n}", extension, content)] = content
    for n in range(IMAGES):
        content = png(rng)
        files[fingerprinted("img", f"i{n}", "png", content)] = content
    head = [
        f'<link rel="stylesheet" href="/static/{name}">' for name in files if name.endswith(".css")
    ]
    images = [f'<img src="/static/{name}" width="24" height="24" alt="">' for name in files
              if name.endswith(".png")]  # fmt: skip
    scripts = [f'<script src="/static/{name}" defer></script>' for name in files
               if name.endswith(".js")]  # fmt: skip
    page = "\n".join([
        "<!doctype html>", '<html><head><meta charset="utf-8">',
        '<link rel="icon" href="data:,">',  # no /favicon.ico request: 196 resources exactly
        f"<title>{RESOURCES} resources</title>", *head, "</head><body>",
        f"<h1>A page with {RESOURCES} resources</h1>", *images, *scripts, "</body></html>",
    ])  # fmt: skip
    return page.encode(), files


# --- the browser -------------------------------------------------------------------------------


def spki_hash(cert_pem: Path) -> str:
    """What --ignore-certificate-errors-spki-list takes: base64 of the SHA-256 of the
    certificate's public key. Chromium then treats this certificate as valid (and caches what
    it serves, which it does not for a certificate error it was told to ignore)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = x509.load_pem_x509_certificate(cert_pem.read_bytes()).public_key()
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def visit(browser: Browser, url: str) -> Visit:
    browser.open("about:blank")
    browser.wait_for("location.href === 'about:blank'")
    browser.open(url)
    loaded = (f"location.href === {json.dumps(url)} && document.readyState === 'complete' && "
              "performance.getEntriesByType('navigation')[0].loadEventEnd > 0")  # fmt: skip
    browser.wait_for(loaded, timeout=LOAD_TIMEOUT)
    facts = browser.evaluate(FACTS)
    return Visit(facts["load_ms"] / 1000, facts["protocol"], facts["resources"],
                 facts["from_network"], facts["protocols"])  # fmt: skip


def one_run(
    binary: str, url: str, protocol: str, spki: str, latency_ms: int
) -> tuple[Visit, Visit]:
    """A new browser: the first visit (empty cache) and a second one (its cache)."""
    wanted, flags = PROTOCOLS[protocol]
    with Browser(binary, (f"--ignore-certificate-errors-spki-list={spki}", *flags)) as browser:
        browser.call("Network.enable")
        browser.call("Network.emulateNetworkConditions", offline=False, latency=latency_ms,
                     downloadThroughput=-1, uploadThroughput=-1)  # fmt: skip
        first = visit(browser, url)
        again = visit(browser, url)
    if (first.protocol, first.protocols, first.from_network) != (wanted, [wanted], RESOURCES):
        raise RuntimeError(
            f"{protocol}: this run does not measure what it says: page over {first.protocol}, "
            f"resources over {first.protocols}, {first.from_network} of {RESOURCES} from the "
            "network"
        )
    return first, again


# --- the table ---------------------------------------------------------------------------------


def chromium_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or "Chromium"


def table(today: dict[str, float]) -> str:
    h1, h2 = today["HTTP/1.1"], today["HTTP/2"]
    rows = [
        ("", "seed 000 (2012: Jetty, SPDY)", "today (stackctl: NGiNX, HTTP/2)"),
        ("HTTP/1.1", f"{SEED['HTTP/1.1']:.2f} s", f"{h1:.2f} s"),
        ("SPDY/3", f"{SEED['SPDY/3']:.2f} s", "-"),
        ("SPDY/3 with push", f"{SEED['SPDY/3 with push']:.2f} s", "-"),
        ("HTTP/2", "-", f"{h2:.2f} s"),
        ("ratio", f"{SEED['HTTP/1.1'] / SEED['SPDY/3']:.2f} "
                  f"({SEED['HTTP/1.1'] / SEED['SPDY/3 with push']:.2f} with push)",
         f"{h1 / h2:.2f}"),
    ]  # fmt: skip
    return "\n".join(f"  {a:<18} {b:<32} {c}" for a, b, c in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per protocol (default 7)")
    parser.add_argument("--latency-ms", type=int, default=100, help="added to every request")
    args = parser.parse_args()
    binary = chromium_binary()
    if not binary:
        print("page_load: Chromium is needed: apt-get install -y chromium", file=sys.stderr)
        return 2
    page, files = page_and_files()
    size = sum(map(len, files.values())) / len(files) / 1000
    print(f"{RESOURCES} resources ({IMAGES} images, {STYLESHEETS} stylesheets, {SCRIPTS} "
          f"scripts; {size:.1f} kB each on average), {args.latency_ms} ms of latency per "
          f"request, {args.runs} runs each, {chromium_version(binary)}")  # fmt: skip
    cold: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    warm: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    with workdir() as run:
        tls_port = free_port()
        tls = ["--set", "tls.certificate=self-signed", "--set", f"tls.listen=127.0.0.1:{tls_port}"]
        with stackctl_stack(run, "page", 2, *tls, static=files,
                            apps=PAGE_APP.format(page=page)) as server:  # fmt: skip
            assert server.stack_dir is not None
            spki = spki_hash(server.stack_dir / ".stackctl" / "tls" / "cert.pem")
            url = f"https://127.0.0.1:{tls_port}/"
            for n in range(1, args.runs + 1):
                line = []
                for name in PROTOCOLS:  # alternated, so that the machine's noise hits both
                    first, again = one_run(binary, url, name, spki, args.latency_ms)
                    cold[name].append(first.seconds)
                    warm[name].append(again.seconds)
                    line.append(f"{name} {first.seconds:.2f} s (again: {again.seconds:.2f} s, "
                                f"{again.from_network} from the network)")  # fmt: skip
                print(f"run {n}: " + ";  ".join(line), flush=True)
    today = {name: statistics.median(times) for name, times in cold.items()}
    again = {name: statistics.median(times) for name, times in warm.items()}
    h1, h2 = today["HTTP/1.1"], today["HTTP/2"]
    ratio = h1 / h2
    print(f"\nmedian load time of {args.runs} runs, first visit (empty cache):")
    print(table(today))
    print(f"repeat visit (its cache on): HTTP/1.1 {again['HTTP/1.1']:.2f} s, HTTP/2 "
          f"{again['HTTP/2']:.2f} s")  # fmt: skip
    print(f"target: ratio >= {TARGET} (the seed's) " + ("ok" if ratio >= TARGET else "MISSED"))
    print(f"page load: HTTP/1.1 {h1:.2f} s, HTTP/2 {h2:.2f} s, ratio {ratio:.2f}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
