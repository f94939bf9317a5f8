#!/usr/bin/env bash
# Set up everything stackctl needs on a fresh Debian machine (Python and gcc present), then
# run one job:
#   bash scripts/bootstrap.sh demo    the demo stack in ./demo-site, in the foreground
#   bash scripts/bootstrap.sh test    the whole test suite
#   bash scripts/bootstrap.sh bench   the benchmarks
# NGiNX (wrk for the benchmarks, Chromium for the tests) come from apt; everything else goes
# into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"
export PATH="$PATH:/usr/sbin:/sbin"

packages=()
command -v nginx >/dev/null || packages+=(nginx-light)
# Debian's Python makes virtualenvs only with python3-venv; pip compiles uWSGI, which takes
# Python's headers (python3-dev) and a C compiler.
python3 -c "import ensurepip" 2>/dev/null || packages+=(python3-venv)
python3 -c "import pathlib, sys, sysconfig
sys.exit(not (pathlib.Path(sysconfig.get_path('include')) / 'Python.h').is_file())" \
    || packages+=(python3-dev)
command -v gcc >/dev/null || packages+=(gcc)
if [ "$job" = bench ]; then
    command -v wrk >/dev/null || packages+=(wrk)
    command -v h2load >/dev/null || packages+=(nghttp2-client)  # benchmarks/tls.py
fi
# The browser test opens the demo page in headless Chromium; benchmarks/page_load.py too.
if [ "$job" = test ] || [ "$job" = bench ]; then
    command -v chromium >/dev/null || packages+=(chromium)
    # The several-hosts tests build their hosts as network namespaces (tests/netns.py).
    command -v ip >/dev/null && command -v ss >/dev/null || packages+=(iproute2)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "stackctl needs ${packages[*]} from apt; run this as root, or first:" >&2
        echo "    sudo apt-get update && sudo apt-get install -y ${packages[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${packages[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras=test,demo
[ "$job" = bench ] && extras=test,demo,bench
.venv/bin/python -m pip install -q -e ".[$extras]"
export PATH="$PWD/.venv/bin:$PATH"

case "$job" in
    demo)
        [ -f demo-site/stack.toml ] || stackctl init demo-site --demo
        cd demo-site
        # stackctl runs no app as root unless told: on this machine, for the demo on loopback,
        # say so (a server gets a user of its own: see the README's "Production server").
        as_root=()
        [ "$(id -u)" = 0 ] && as_root=(--set server.user=root)
        exec stackctl up "${as_root[@]}"
        ;;
    test)
        ruff check stackctl tests examples benchmarks
        mypy
        exec python -m pytest -p no:cacheprovider
        ;;
    bench)
        # Each runs; the exit status says whether every target was reached.
        status=0
        python benchmarks/bench_http.py || status=1
        python benchmarks/reload.py || status=1
        python benchmarks/reload.py --storm || status=1
        python benchmarks/ws_fanout.py || status=1
        python benchmarks/tls.py || status=1
        python benchmarks/page_load.py || status=1
        exit "$status"
        ;;
    *)
        echo "usage: bash scripts/bootstrap.sh [demo|test|bench]" >&2
        exit 2
        ;;
esac
