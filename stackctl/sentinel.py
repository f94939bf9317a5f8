"""Start Sentinel on a redis host: ``python -m stackctl.sentinel --seed S --conf C -- SERVER``.

Sentinel rewrites its config file as it learns (the primary of the moment, the replicas and
the other Sentinels, the epoch of the last failover), so the file is Sentinel's, in the
service directory, and written by Sentinel's own user: this runs as that user, makes the file
from the rendered seed (plus the password, which no rendered file holds) when there is none or
the seed changed (other redis hosts, another master name), and then becomes Sentinel.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

SEED_MARK = ".seed"
"""Beside the config: the digest of the seed it was made from."""


def config_text(seed: str, master: str, password: str) -> str:
    """The seed and the password lines Sentinel needs: to talk to Redis, and to be talked to."""
    return (
        f"{seed.rstrip()}\n"
        f"sentinel auth-pass {master} {password}\n"
        f"requirepass {password}\n"
    )


def master_name(seed: str) -> str:
    for line in seed.splitlines():
        words = line.split()
        if words[:2] == ["sentinel", "monitor"] and len(words) > 2:
            return words[2]
    raise ValueError("the seed names no master (no `sentinel monitor` line)")


def prepare(seed_path: Path, conf: Path, password_file: Path) -> None:
    """Make ``conf`` from the seed unless it was made from this very seed already."""
    seed = seed_path.read_text()
    digest = hashlib.sha256(seed.encode()).hexdigest()
    mark = conf.with_name(conf.name + SEED_MARK)
    if conf.is_file() and mark.is_file() and mark.read_text().strip() == digest:
        return  # Sentinel's own rewrites of it are what it knows since: keep them
    password = password_file.read_text().splitlines()[0].strip()
    staged = conf.with_name(conf.name + ".new")
    staged.unlink(missing_ok=True)
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(config_text(seed, master_name(seed), password))
    os.replace(staged, conf)
    mark.write_text(digest + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stackctl.sentinel")
    parser.add_argument("--seed", type=Path, required=True)
    parser.add_argument("--conf", type=Path, required=True)
    parser.add_argument("--password-file", type=Path, required=True)
    parser.add_argument("server", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    server = [word for word in args.server if word != "--"]
    prepare(args.seed, args.conf, args.password_file)
    os.execv(server[0], [server[0], str(args.conf), "--sentinel"])


if __name__ == "__main__":
    main()
