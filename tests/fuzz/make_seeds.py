#!/usr/bin/env python3
"""Writes the seed corpora (tests/fuzz/seeds/<target>/): small well-formed
inputs in each target's input format (see tests/src/fuzz/*.rs), so the
fuzzer starts from inputs that reach deep: a balloon driver's init and
inflate/deflate/stats/report chains, API request sessions, a tiny ELF and
bzImage with initrds, valid layouts. Run from anywhere; rewrites the seeds."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
u8 = lambda v: struct.pack("<B", v & 0xFF)
u16 = lambda v: struct.pack("<H", v & 0xFFFF)
u32 = lambda v: struct.pack("<I", v & 0xFFFFFFFF)
u64 = lambda v: struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- balloon
# Ops (tests/src/fuzz/balloon.rs): 4 init, 5 desc, 6 publish, 7 notify,
# 8 PFN array, 9 target, 10 stats request, 11 stats buffer.
def init(features=19, queues=4, ok=True):
    return u8(4) + u8(features) + u8(1) + u8(queues) + u8(0) + u8(1 if ok else 0)


def pfns(at, ps):
    b = u8(8) + u16(at) + u8(len(ps))
    for p in ps:
        b += u8(1) + u16(p)
    return b


def desc(q, i, off, length, flags=0, nxt=0):
    # kind 0: address BUFS + off, length mode 0: u16 length.
    return u8(5) + u8(q) + u16(i) + u8(0) + u64(off) + u16(length) + u8(flags) + u16(nxt)


def publish(q, heads):
    return u8(6) + u8(q) + u8(len(heads)) + b"".join(u16(h) for h in heads)


def notify(q):
    return u8(7) + u8(q)


inflate = list(range(0x300, 0x310))
write("balloon_mmio", "inflate",
      u8(7) + init() + pfns(0, inflate) + desc(0, 0, 0, 4 * len(inflate))
      + publish(0, [0]) + notify(0))
write("balloon_mmio", "inflate_deflate",
      u8(7) + init() + pfns(0, inflate) + desc(0, 0, 0, 64) + publish(0, [0]) + notify(0)
      + pfns(64, inflate[:8]) + desc(1, 0, 256, 32) + publish(1, [0]) + notify(1))
stats = u8(11) + u16(0x400) + u8(3) + b"".join(u16(t) + u64(v) for t, v in [(0, 1), (4, 2), (5, 3)])
write("balloon_mmio", "stats",
      u8(7) + init() + stats + desc(2, 0, 0x400, 30) + publish(2, [0]) + notify(2)
      + u8(10) + u8(9) + u32(256))
write("balloon_mmio", "report",
      u8(7) + init() + u8(5) + u8(3) + u16(0) + u8(1) + u64(0x300000) + u16(0x8000)
      + u8(2) + u16(0) + publish(3, [0]) + notify(3))
write("balloon_mmio", "chain",
      u8(7) + init() + pfns(0, inflate) + desc(0, 0, 0, 16, 1, 1) + desc(0, 1, 16, 48)
      + publish(0, [0]) + notify(0))

# ---------------------------------------------------------------- api
def http(method, path, body=None):
    r = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
    if body is not None:
        r += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    r += "\r\n" + (body or "")
    return r.encode()


write("api", "get_all", b"\x00" + b"".join(http("GET", p) for p in [
    "/", "/version", "/machine-config", "/balloon", "/balloon/statistics", "/vm/config", "/memory"]))
write("api", "configure", b"\x00" + b"".join([
    http("PUT", "/machine-config", '{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}'),
    http("PATCH", "/machine-config", '{"mem_size_mib": 128, "huge_pages": "2M"}'),
    http("PUT", "/balloon", '{"amount_mib": 64, "deflate_on_oom": true, '
         '"stats_polling_interval_s": 1, "free_page_reporting": true}'),
    http("PATCH", "/balloon", '{"amount_mib": 32}'),
    http("PATCH", "/balloon/statistics", '{"stats_polling_interval_s": 5}'),
    http("PUT", "/boot-source", '{"kernel_image_path": "vmlinux", "initrd_path": "initrd", '
         '"boot_args": "console=ttyS0"}'),
    http("PUT", "/metrics", '{"metrics_path": "metrics"}'),
    http("PUT", "/logger", '{"log_path": "log", "level": "Info", "show_level": true}'),
    http("PUT", "/actions", '{"action_type": "InstanceStart"}'),
    http("PATCH", "/vm", '{"state": "Paused"}'),
    http("PUT", "/actions", '{"action_type": "FlushMetrics"}'),
]))
write("api", "bad", b"\x00" + http("PUT", "/actions", '{"action_type": "Reboot"}')
      + http("PUT", "/machine-config", '{"vcpu_count": 1}') + http("DELETE", "/balloon")
      + b"GET / HTTP/1.1\r\nContent-Length: 99\r\n\r\n{")


def call(m, p, body):
    return u8(m) + u8(p) + u16(len(body)) + body


write("api", "calls", b"\x01"
      + call(1, 2, b'{"vcpu_count": 4, "mem_size_mib": 512}')
      + call(1, 4, b'{"amount_mib": 16, "deflate_on_oom": false}')
      + call(2, 4, b'{"amount_mib": 8}')
      + call(0, 9, b"") + call(1, 6, b'{"action_type": "SendCtrlAltDel"}')
      + call(1, 10, b'{"metrics_path": "m"}') + call(1, 11, b'{"level": "debug"}'))

# ---------------------------------------------------------------- loader
EHDR, PHDR = 64, 56


def loader(kind, klen, shift=0, initrd=b"", initrd_kind=1, sparse=0, cmdline=b"console=ttyS0",
           mem_mib_minus_8=24, vcpus=2, devices=1):
    b = u8(2 | 1 << 3) + u8(mem_mib_minus_8) + u8(vcpus - 1) + u8(devices)
    for i in range(devices):
        b += u64(0xd000_0000 + 0x1000 * i) + u64(0x1000) + u32(5 + i)
    b += u8(len(cmdline)) + cmdline + u8(kind)
    b += u16(klen) + (u8(shift) if kind % 3 == 1 else b"")
    b += u8(0)  # no patches
    b += u8(initrd_kind) + u8(len(initrd)) + initrd + u32(sparse)
    return b


write("loader", "elf", loader(1, 4096))
write("loader", "elf_pvh", loader(130, 4096))  # 130 % 3 == 1 with bit 7: the ELF with a PVH note
write("loader", "elf_initrd", loader(1, 4096, initrd=b"\x07" * 200))
write("loader", "elf_sparse_initrd", loader(1, 64, 4, initrd=b"07070", initrd_kind=2, sparse=1 << 20))
write("loader", "bzimage", loader(2, 4096, initrd=b"initrd" * 10))
write("loader", "bzimage_vcpus", loader(2, 512, vcpus=32, devices=2, mem_mib_minus_8=8))
write("loader", "garbage", u8(2) + u8(8) + u8(0) + u8(0) + u8(4) + b"ro q" + u8(0) + u8(0)
      + u8(0) + u8(0) + u32(0) + b"#!/bin/sh\necho hi\n")

# ---------------------------------------------------------------- layout
write("layout", "256m_2cpus", u8(3 | 1 << 2) + u16(256) + u8(2) + u8(0))
write("layout", "16m_1cpu", u8(3 | 1 << 2) + u16(16) + u8(1) + u8(7))
write("layout", "3g_32cpus", u8(3 | 1 << 2) + u16(3072) + u8(32) + u8(3))
write("layout", "bad", u8(0) + u64(0x9fc00) + u32(33) + u8(1))

# ---------------------------------------------------------------- legacy_io
# Ops (tests/src/fuzz/legacy.rs): 0 out (port, length - 1, bytes), 1 in
# (port, length - 1), 2 host input, 3 Ctrl-Alt-Del, 4 check the counts.
# Ports: 0-7 the console's registers, 8 i8042 data, 10 i8042 command,
# 16 then a u16: any port.
def out(sel, *bs):
    return u8(0) + u8(sel) + u8(len(bs) - 1) + b"".join(u8(b) for b in bs)


def inb(sel, n=1):
    return u8(1) + u8(sel) + u8(n - 1)


def host(data):
    return u8(2) + u8(len(data)) + data


# Accesses of `size` bytes per element (length byte bits 3-4: 1, 2, 4, or
# 3, a size KVM never reports).
SIZE_BITS = {1: 0, 2: 1, 4: 2, 3: 3}


def outs(sel, size, *bs):
    return u8(0) + u8(sel) + u8(SIZE_BITS[size] << 3 | (len(bs) - 1)) + b"".join(u8(b) for b in bs)


def ins(sel, size, n):
    return u8(1) + u8(sel) + u8(SIZE_BITS[size] << 3 | (n - 1))


# A driver's UART set-up (divisor latch, 8N1, modem lines, interrupts),
# a line of output, then typed input read back.
write(
    "legacy_io",
    "uart_console",
    out(3, 0x80) + out(0, 0x01) + out(1, 0x00) + out(3, 0x03) + out(4, 0x0B)
    + out(1, 0x01) + inb(2) + inb(5)
    + b"".join(out(0, c) for c in b"Linux\n")
    + u8(0) + u8(0) + u8(4) + b"boot\n"
    + host(b"ls\n") + inb(5) + inb(0) + inb(0) + inb(0) + inb(5) + inb(0)
    + out(7, 0x5A) + inb(7) + inb(3) + inb(4) + u8(4),
)
# Linux 8250 autoconfig's loopback test, then loopback off and input.
write(
    "legacy_io",
    "uart_loopback",
    out(4, 0x1F) + out(0, 0x55) + inb(5) + inb(0) + inb(6) + host(b"x")
    + out(4, 0x0B) + host(b"yz") + inb(0) + inb(0) + inb(0, 4)
    + b"".join(out(0, 0x41) for _ in range(2)) + u8(4),
)
# Linux's i8042 probe: read and write the control byte, enable the
# keyboard (acknowledged), Ctrl-Alt-Del read back, then the reset command.
write(
    "legacy_io",
    "i8042_probe_and_reset",
    out(10, 0x20) + inb(10) + inb(8) + out(10, 0x60) + out(8, 0x47)
    + out(10, 0xD0) + inb(8) + out(10, 0xD1) + out(8, 0x03) + out(10, 0xD0) + inb(8)
    + out(8, 0xF4) + inb(10) + inb(8) + u8(3) + inb(10)
    + inb(8) + inb(8) + inb(8) + inb(8) + inb(8) + inb(10) + u8(4)
    + out(10, 0xFE) + u8(4),
)
# Ctrl-Alt-Del while nobody reads: the buffer fills and says so; keyboard
# interrupt off and on; ports nobody claims.
write(
    "legacy_io",
    "i8042_full_and_unclaimed",
    u8(3) * 5 + u8(4) + out(10, 0x60) + out(8, 0x04) + u8(3) + u8(4)
    + u8(1) + u8(16) + u16(0x80) + u8(1) + u8(0) + u8(16) + u16(0x80) + u8(0) + u8(0x12)
    + u8(1) + u8(16) + u16(0x70) + u8(3) + inb(12) + inb(13) + inb(14) + inb(15)
    + out(13, 0x20) + out(10, 0xFE, 0x20) + inb(8) + u8(4),
)
# Wide and string accesses, split into bytes at port, port + 1, ... as a
# PC's bus does: outw to the data register (THR, then IER), inw back (RBR,
# IER), rep insb from RBR (two received bytes), outl/inw on the i8042's
# ports and their unclaimed neighbours, and a size of 3.
write(
    "legacy_io",
    "wide_and_string_io",
    outs(0, 2, 0x41, 0x05) + host(b"hi!") + ins(0, 2, 2) + ins(0, 1, 2) + ins(5, 2, 2)
    + outs(8, 4, 0xF4, 0x00, 0x11, 0x22) + ins(10, 2, 2) + ins(8, 4, 8)
    + outs(0, 3, 0x42, 0x43, 0x44) + ins(0, 3, 3) + u8(4),
)
