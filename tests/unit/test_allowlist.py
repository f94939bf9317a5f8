"""The allow list's filter program, run on packets by a small classic-BPF interpreter, and
the program circusd's sockets hold, read back from the kernel.

The kernel runs the same program on real packets in tests/e2e/test_allowlist.py; here each
list is checked against many sources without a connection."""

from __future__ import annotations

import ipaddress
import struct
from contextlib import closing

import pytest

from stackctl import allowlist
from stackctl.allowlist import Instruction
from stackctl.circusd import AllowListError, StackSocket, allowed_hosts
from tests.allowlist_probe import attached

NET = allowlist.SKF_NET_OFF & 0xFFFFFFFF
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def ipv4_packet(source: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                       ipaddress.IPv4Address(source).packed, bytes(4))  # fmt: skip


def ipv6_packet(source: str) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, 20, 6, 64,
                       ipaddress.IPv6Address(source).packed, bytes(16))  # fmt: skip


def packet(source: str) -> bytes:
    address: Address = ipaddress.ip_address(source)
    return ipv4_packet(source) if address.version == 4 else ipv6_packet(source)


def run(code: list[Instruction], ip_header: bytes) -> int:
    """What the kernel's filter returns for a packet whose IP header is ``ip_header`` (the
    filter of a TCP socket reads it through SKF_NET_OFF; offset 0 would be the TCP header)."""
    a, x, pc, steps = 0, 0, 0, 0
    mem = [0] * 16
    while True:
        steps += 1
        assert steps <= len(code), "the program loops"  # classic BPF only jumps forward
        op = code[pc]
        pc += 1
        if op.code in (allowlist.BPF_LD_W_ABS, allowlist.BPF_LD_B_ABS):
            assert op.k >= NET, "reads outside the IP header"
            size = 4 if op.code == allowlist.BPF_LD_W_ABS else 1
            offset = op.k - NET
            if offset + size > len(ip_header):
                return 0  # the kernel drops a packet the program reads past
            a = int.from_bytes(ip_header[offset : offset + size], "big")
        elif op.code == allowlist.BPF_LD_MEM:
            a = mem[op.k]
        elif op.code == allowlist.BPF_ST:
            mem[op.k] = a
        elif op.code == allowlist.BPF_TAX:
            x = a
        elif op.code == allowlist.BPF_TXA:
            a = x
        elif op.code == allowlist.BPF_AND_K:
            a &= op.k
        elif op.code == allowlist.BPF_JEQ_K:
            pc += op.jt if a == op.k else op.jf
        elif op.code == allowlist.BPF_JA:
            pc += op.k
        elif op.code == allowlist.BPF_RET_K:
            return op.k
        else:
            raise AssertionError(f"unexpected opcode {op.code:#x}")
        assert pc < len(code), "jumps past the end"


def accepts(allow: str, source: str) -> bool:
    return run(allowlist.program(allowlist.parse(allow)), packet(source)) != 0


CASES = [
    ("198.18.0.10", ["198.18.0.10"], ["198.18.0.11", "198.18.0.9", "10.0.0.1", "fd00::1"]),
    ("198.18.0.10 198.18.0.12/32", ["198.18.0.10", "198.18.0.12"], ["198.18.0.11"]),
    ("198.18.0.0/24", ["198.18.0.0", "198.18.0.255"], ["198.18.1.0", "198.19.0.1"]),
    ("198.18.0.0/15", ["198.19.255.255", "198.18.0.1"], ["198.20.0.1", "198.17.255.255"]),
    ("fd00::1", ["fd00::1"], ["fd00::2", "fd01::1", "::1", "253.0.0.0"]),
    ("fd00::/64", ["fd00::1", "fd00::ffff:ffff:ffff:ffff"], ["fd00:0:0:1::1", "fe80::1"]),
    ("2001:2::/48 198.18.0.10", ["2001:2::1", "2001:2:0:ffff::1", "198.18.0.10"],
     ["2001:3::1", "198.18.0.11"]),
    ("2001:2::/33", ["2001:2::1", "2001:2:7fff::1"], ["2001:2:8000::1", "2001:3::"]),
    ("fd00::1 198.18.0.10 fd00::/8 [fd00::5]", ["fd12::7", "198.18.0.10"], ["fe00::1"]),
    ("::ffff:198.18.0.10", ["198.18.0.10"], ["198.18.0.11", "::ffff:198.18.0.11"]),
    ("0.0.0.0/0", ["1.2.3.4", "198.18.0.10"], ["fd00::1"]),
    ("::/0", ["fd00::1", "::1"], ["1.2.3.4"]),
]  # fmt: skip


@pytest.mark.parametrize(("allow", "accepted", "dropped"), CASES, ids=[c[0] for c in CASES])
def test_the_program_accepts_only_the_listed_sources(
    allow: str, accepted: list[str], dropped: list[str]
) -> None:
    for source in accepted:
        assert accepts(allow, source), f"{allow}: {source} should be accepted"
    for source in dropped:
        assert not accepts(allow, source), f"{allow}: {source} should be dropped"


def test_a_packet_neither_ipv4_nor_ipv6_is_dropped() -> None:
    code = allowlist.program(allowlist.parse("0.0.0.0/0 ::/0"))
    assert run(code, b"\x50" + bytes(39)) == 0
    assert run(code, ipv4_packet("1.2.3.4")) == allowlist.ACCEPT


def test_an_empty_list_is_no_filter() -> None:
    assert allowlist.parse("") == ()
    assert allowlist.parse("  \t ") == ()
    assert allowlist.program(()) == []


def test_many_hosts_fit_with_short_jumps() -> None:
    hosts = [f"fd00::{i:x}:1" for i in range(200)] + [f"198.18.{i}.1" for i in range(200)]
    code = allowlist.program(allowlist.parse(" ".join(hosts)))
    assert all(0 <= i.jt <= 255 and 0 <= i.jf <= 255 for i in code)
    for source in (hosts[0], hosts[199], hosts[200], hosts[-1]):
        assert run(code, packet(source)) == allowlist.ACCEPT, source
    assert run(code, packet("fd00::c8:1")) == 0
    assert run(code, packet("198.18.200.1")) == 0


def test_adjacent_networks_are_merged() -> None:
    merged = allowlist.program(allowlist.parse("198.18.0.0/25 198.18.0.128/25"))
    assert merged == allowlist.program(allowlist.parse("198.18.0.0/24"))


def test_a_list_too_long_for_the_kernel_is_refused() -> None:
    many = " ".join(f"fd00::{i:x}:1" for i in range(500))  # 9 instructions each
    with pytest.raises(ValueError, match="more than the 4096 the kernel takes; group the hosts"):
        allowlist.program(allowlist.parse(many))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("198.18.0.10 198.18.0.999", "'198.18.0.999' is not an IP address or network; expected"),
        ("localhost", "'localhost' is not an IP address or network"),
        ("198.18.0.10,198.18.0.11", "'198.18.0.10,198.18.0.11' is not an IP address"),
        ("198.18.0.1/24", "'198.18.0.1/24' has address bits set beyond its /24 prefix: did you "
                          "mean 198.18.0.0/24?"),
        ("fd00::/129", "'fd00::/129' is not an IP address or network"),
    ],
)  # fmt: skip
def test_a_word_that_is_not_an_address_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        allowlist.parse(text)
    assert message in str(raised.value)


def test_brackets_around_an_ipv6_address_are_read() -> None:
    assert allowlist.parse("[fd00::1] [fd00::]/64") == (
        ipaddress.ip_network("fd00::1"),
        ipaddress.ip_network("fd00::/64"),
    )


# --- circusd's sockets (stackctl.circusd.StackSocket), read back from the kernel --------------


def stack_socket(**options: str) -> StackSocket:
    return StackSocket.load_from_config({"name": "wsgi", "host": "127.0.0.1", "port": "0",
                                         **options})  # fmt: skip


def test_circusd_s_socket_is_filtered_before_it_is_bound() -> None:
    allow = "198.18.0.10 198.18.0.12/32 fd00::1"
    with closing(stack_socket(stackctl_allow=allow)) as sock:
        assert sock.getsockname() == ("0.0.0.0", 0)  # not bound yet
        assert attached(sock) == allowlist.program(allowlist.parse(allow))


def test_a_socket_without_a_list_is_left_unfiltered() -> None:
    with closing(stack_socket()) as sock, closing(stack_socket(stackctl_allow=" ")) as empty:
        assert attached(sock) == attached(empty) == []


def test_a_new_list_replaces_the_filter_and_an_empty_one_removes_it() -> None:
    with closing(stack_socket(stackctl_allow="198.18.0.10")) as sock:
        sock.allow(allowlist.parse("198.18.0.0/24"))
        assert attached(sock) == allowlist.program(allowlist.parse("198.18.0.0/24"))
        sock.allow(())
        assert attached(sock) == []
        sock.allow(())  # removing no filter is no error
        assert sock.allowed == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stackctl_allow": "198.18.0.10 198.18.0.300"},
         "/etc/c.ini: [socket:wsgi] stackctl_allow = '198.18.0.10 198.18.0.300': "
         "'198.18.0.300' is not an IP address or network; expected IP addresses or networks "
         "separated by spaces, such as 198.18.0.10 198.18.0.0/24 fd00::1"),
        ({"stackctl_allow": "198.18.0.10", "path": "/run/w.sock"},
         "/etc/c.ini: [socket:wsgi] stackctl_allow = '198.18.0.10': an allow list applies to "
         "a TCP socket (host and port), not to a Unix socket path"),
        ({"stackctl_allow": " ".join(f"fd00::{i:x}:1" for i in range(500))},
         "fd00::12:1 fd00::1...': 500 entries make a filter of 4519 instructions, more "
         "than the 4096 the kernel takes; group the hosts into networks"),
    ],
)  # fmt: skip
def test_circusd_refuses_a_list_naming_the_file_the_socket_and_the_value(
    options: dict[str, str], message: str
) -> None:
    with pytest.raises(AllowListError) as raised:
        allowed_hosts({"name": "wsgi", "host": "127.0.0.1", "port": "8001", **options},
                      "/etc/c.ini")  # fmt: skip
    assert message in str(raised.value)
