"""Start Redis or Sentinel on a redis host: ``python -m stackctl.seed --kind redis|sentinel --seed S
--conf C --password-file P -- SERVER``.

Both rewrite their config file as they learn: Sentinel, the primary of the moment, the
replicas and the other Sentinels, the epoch of the last failover; Redis, whose replica it is
now (Sentinel tells it, and has it write that down). So the file is theirs, in the service
directory, written by their own user: this runs as that user, makes the file from the
rendered seed plus the password (which no rendered file holds) when there is none or the
seed changed, and then becomes the server. A restarted Redis thus comes back as what
Sentinel last made it, not as the primary it was at first.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

SEED_MARK = ".seed"
"""Beside the config: the digest of the seed it was made from."""


def password_lines(kind: str, seed: str, password: str) -> list[str]:
    """What each server needs of the password: to ask for it, and to give it to its peers."""
    if kind == "sentinel":
        return [f"sentinel auth-pass {master_name(seed)} {password}", f"requirepass {password}"]
    return [f"requirepass {password}", f"masterauth {password}"]


def master_name(seed: str) -> str:
    for line in seed.splitlines():
        words = line.split()
        if words[:2] == ["sentinel", "monitor"] and len(words) > 2:
            return words[2]
    raise ValueError("the seed names no master (no `sentinel monitor` line)")


def prepare(kind: str, seed_path: Path, conf: Path, password_file: Path) -> None:
    """Make ``conf`` from the seed unless it was made from this very seed already."""
    seed = seed_path.read_text()
    digest = hashlib.sha256(seed.encode()).hexdigest()
    mark = conf.with_name(conf.name + SEED_MARK)
    password = password_file.read_text().splitlines()[0].strip()
    if conf.is_file() and mark.is_file() and mark.read_text().strip() == digest:
        # The server's own rewrites of it are what it learned since: keep them, but with
        # the password of the file, which may have been changed on every host since.
        learned = [line for line in conf.read_text().splitlines() if not is_password(line)]
        write_private(conf, [*learned, *password_lines(kind, seed, password)])
        return
    write_private(conf, [seed.rstrip(), *password_lines(kind, seed, password)])
    mark.write_text(digest + "\n")


PASSWORD_LINES = ("requirepass ", "masterauth ", "primaryauth ", "user default ",
                  "sentinel auth-pass ")  # fmt: skip
"""How the lines that hold the password, or its hash, begin as the server rewrites them:
Valkey writes masterauth as primaryauth, and the default user's password as a hash on a
`user default` line, which would keep the old password in force whatever requirepass says."""


def is_password(line: str) -> bool:
    return (" ".join(line.split()) + " ").startswith(PASSWORD_LINES)


def write_private(conf: Path, lines: list[str]) -> None:
    """Replace ``conf`` at once with ``lines``, readable by this user only: it holds the
    password."""
    staged = conf.with_name(conf.name + ".new")
    staged.unlink(missing_ok=True)
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(staged, conf)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stackctl.seed")
    parser.add_argument("--kind", choices=["redis", "sentinel"], required=True)
    parser.add_argument("--seed", type=Path, required=True)
    parser.add_argument("--conf", type=Path, required=True)
    parser.add_argument("--password-file", type=Path, required=True)
    parser.add_argument("server", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    server = [word for word in args.server if word != "--"]
    prepare(args.kind, args.seed, args.conf, args.password_file)
    mode = ["--sentinel"] if args.kind == "sentinel" else []
    os.execv(server[0], [server[0], str(args.conf), *mode])


if __name__ == "__main__":
    main()
