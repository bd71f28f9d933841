"""One ICMP echo (raw socket, root) to argv[1]; exit status 0 when the reply came within 5 s.

Run as ``nsenter --net=NS python tests/slurm_ping.py ADDR`` by slurm_netns.py (the image has no
ping(8)). Standard library only."""
import os
import socket
import struct
import sys
import time


def csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff


def ping(dst: str) -> bool:
    ident = os.getpid() & 0xffff
    pkt = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"slurmtest"
    pkt = pkt[:2] + struct.pack("!H", csum(pkt)) + pkt[4:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(1.0)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        s.sendto(pkt, (dst, 0))
        try:
            while True:
                data, addr = s.recvfrom(2048)
                icmp = data[(data[0] & 15) * 4:]
                if addr[0] == dst and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                    return True
        except socket.timeout:
            pass
    return False


if __name__ == "__main__":
    sys.exit(0 if ping(sys.argv[1]) else 1)
