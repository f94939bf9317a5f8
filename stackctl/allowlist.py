"""Which hosts may connect to a TCP socket of the stack: a packet filter on the socket itself.

An app host serves its wsgi and ws sockets to the front hosts over the private network. The
socket carries a classic BPF filter (``SO_ATTACH_FILTER``) that lets a packet in only when its
source address is one of the allowed addresses or networks, and drops it otherwise. A dropped
SYN is never answered, so a host that is not listed sees a connect timeout, as behind a
firewall, and its attempts never take a place in the socket's queues. The filter lives on the
socket, not in the host's firewall: stackctl never rewrites the firewall, and the filter
travels with the socket's fd to every worker Circus hands it to. A connection accepted from
the socket keeps the filter it was born with.

The program reads the source address from the IP header (``SKF_NET_OFF``: the filter of a TCP
socket sees the packet from its TCP header on). It checks the IP version first, so that a
dual-stack IPv6 socket filters the IPv4 packets it receives against the IPv4 entries.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from contextlib import closing
from typing import NamedTuple

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Linux's socket options and classic BPF opcodes (linux/filter.h, asm-generic/socket.h).
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_LD_B_ABS = 0x00 | 0x10 | 0x20  # BPF_LD | BPF_B | BPF_ABS
BPF_LD_MEM = 0x00 | 0x60  # BPF_LD | BPF_MEM
BPF_ST = 0x02
BPF_TAX = 0x07 | 0x00  # BPF_MISC | BPF_TAX
BPF_TXA = 0x07 | 0x80  # BPF_MISC | BPF_TXA
BPF_AND_K = 0x04 | 0x50 | 0x00  # BPF_ALU | BPF_AND | BPF_K
BPF_JA = 0x05 | 0x00  # BPF_JMP | BPF_JA
BPF_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
SKF_NET_OFF = -0x100000
"""Added to an offset, it counts from the IP header instead of the transport header."""
BPF_MAXINSNS = 4096
"""The longest program the kernel takes."""

ACCEPT = 0xFFFFFFFF  # keep the whole packet
DROP = 0
IPV4_SOURCE = 12  # offset of the source address in the IPv4 header
IPV6_SOURCE = 8  # and in the IPv6 header: four 32-bit words
VERSION_MASK = 0xF0
IPV4_VERSION = 0x40
IPV6_VERSION = 0x60
EXPECTED = "IP addresses or networks separated by spaces, such as 198.18.0.10 198.18.0.0/24 fd00::1"


class Instruction(NamedTuple):
    """One ``struct sock_filter``."""

    code: int
    jt: int
    jf: int
    k: int


def parse(text: str) -> tuple[Network, ...]:
    """The addresses and networks of an allow list; an empty list allows every host.

    Raises ValueError naming the word that is not an address or network.
    """
    return tuple(_network(word) for word in text.split())


def _network(word: str) -> Network:
    bare = word
    if word.startswith("["):  # [fd00::1], as IPv6 addresses are written in URLs
        bare = word[1:].replace("]", "", 1)
    try:
        return ipaddress.ip_network(bare, strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            loose = ipaddress.ip_network(bare, strict=False)
            raise ValueError(
                f"{word!r} has address bits set beyond its /{loose.prefixlen} prefix: "
                f"did you mean {loose}?"
            ) from None
        raise ValueError(f"{word!r} is not an IP address or network; expected {EXPECTED}") from None


def describe(allowed: Sequence[Network]) -> str:
    """The allow list as it reads in a log line."""
    return " ".join(str(n) for n in allowed) if allowed else "every host"


def program(allowed: Sequence[Network]) -> list[Instruction]:
    """The filter that accepts a packet only from ``allowed``; no program (``[]``) when the
    list is empty, which allows every host.

    Raises ValueError when the list makes a program longer than the kernel takes.
    """
    if not allowed:
        return []
    v4, v6 = _by_family(allowed)
    v4_block = [*_ipv4_checks(v4), _ret(DROP)]
    v6_block = [*_ipv6_checks(v6), _ret(DROP)]
    head = [
        _load(BPF_LD_B_ABS, 0),
        Instruction(BPF_AND_K, 0, 0, VERSION_MASK),
        Instruction(BPF_JEQ_K, 0, 1, IPV4_VERSION),
        Instruction(BPF_JA, 0, 0, 3),  # to the IPv4 block, just past this head
        Instruction(BPF_JEQ_K, 0, 1, IPV6_VERSION),
        Instruction(BPF_JA, 0, 0, 1 + len(v4_block)),  # to the IPv6 block
        _ret(DROP),  # neither IPv4 nor IPv6
    ]
    code = head + v4_block + v6_block
    if len(code) > BPF_MAXINSNS:
        raise ValueError(
            f"{len(allowed)} entries make a filter of {len(code)} instructions, more than "
            f"the {BPF_MAXINSNS} the kernel takes; group the hosts into networks"
        )
    return code


def _by_family(
    allowed: Iterable[Network],
) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]:
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for net in allowed:
        mapped = net.network_address.ipv4_mapped if net.version == 6 else None
        if isinstance(net, ipaddress.IPv6Network) and mapped is not None and net.prefixlen >= 96:
            # ::ffff:198.18.0.10 is how a dual-stack socket names an IPv4 client.
            v4.append(ipaddress.IPv4Network((mapped, net.prefixlen - 96)))
        elif isinstance(net, ipaddress.IPv6Network):
            v6.append(net)
        else:
            v4.append(net)
    return list(ipaddress.collapse_addresses(v4)), list(ipaddress.collapse_addresses(v6))


# The source address is read from the packet once, into X (IPv4) or the scratch words M[0..3]
# (IPv6), and compared from there: the kernel turns each read from the packet into a call
# and keeps a program within net.core.optmem_max, which the reads would quickly fill.


def _ipv4_checks(nets: Iterable[ipaddress.IPv4Network]) -> list[Instruction]:
    code = [_load(BPF_LD_W_ABS, IPV4_SOURCE), Instruction(BPF_TAX, 0, 0, 0)]
    for net in nets:
        mask = int(net.netmask)
        code.append(Instruction(BPF_TXA, 0, 0, 0))
        if mask != 0xFFFFFFFF:
            code.append(Instruction(BPF_AND_K, 0, 0, mask))
        code += [Instruction(BPF_JEQ_K, 0, 1, int(net.network_address)), _ret(ACCEPT)]
    return code


def _ipv6_checks(nets: Iterable[ipaddress.IPv6Network]) -> list[Instruction]:
    code: list[Instruction] = []
    for word in range(4):
        code += [_load(BPF_LD_W_ABS, IPV6_SOURCE + 4 * word), Instruction(BPF_ST, 0, 0, word)]
    for net in nets:
        entry: list[Instruction] = []
        misses: list[int] = []  # where the comparisons that skip to the next entry are
        for word, mask, value in _words(net):
            entry.append(Instruction(BPF_LD_MEM, 0, 0, word))
            if mask != 0xFFFFFFFF:
                entry.append(Instruction(BPF_AND_K, 0, 0, mask))
            misses.append(len(entry))
            entry.append(Instruction(BPF_JEQ_K, 0, 0, value))
        entry.append(_ret(ACCEPT))
        for at in misses:  # a mismatch skips the rest of the entry, its ACCEPT included
            entry[at] = entry[at]._replace(jf=len(entry) - at - 1)
        code += entry
    return code


def _words(net: ipaddress.IPv6Network) -> list[tuple[int, int, int]]:
    """(index, mask, value) of each 32-bit word of the address that the prefix covers."""
    mask, value = int(net.netmask), int(net.network_address)
    words = []
    for word in range(4):
        shift = 32 * (3 - word)
        word_mask = (mask >> shift) & 0xFFFFFFFF
        if word_mask:
            words.append((word, word_mask, (value >> shift) & 0xFFFFFFFF))
    return words


def _load(code: int, offset: int) -> Instruction:
    return Instruction(code, 0, 0, (SKF_NET_OFF + offset) & 0xFFFFFFFF)


def _ret(verdict: int) -> Instruction:
    return Instruction(BPF_RET_K, 0, 0, verdict)


def attach(sock: socket.socket, allowed: Sequence[Network]) -> None:
    """Filter ``sock`` to ``allowed`` (every host when empty); replaces the filter it had, at
    once for every packet that follows, on a listening socket as on one not bound yet."""
    code = program(allowed)
    if not code:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: it had no filter
                raise
        return
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in code))
    fprog = struct.pack("HP", len(code), ctypes.addressof(filters))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def check(allowed: Sequence[Network]) -> None:
    """Raise ValueError when the kernel would refuse the filter for ``allowed`` (a program
    longer than it takes, or larger than net.core.optmem_max lets a socket hold)."""
    with closing(socket.socket()) as probe:
        try:
            attach(probe, allowed)
        except OSError as e:
            raise ValueError(
                f"the kernel refused the filter for {len(allowed)} entries ({e.strerror}); "
                "group the hosts into networks"
            ) from None
