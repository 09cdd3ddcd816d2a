"""Make RAM short for real, without touching the machine's settings: a child process that allocates and
touches anonymous memory until the kernel's ``MemAvailable`` is about ``leave`` bytes.

There is no swap here, so those pages cannot be reclaimed: the page cache and every other process share
what is left. The child exits when told, when its parent goes (its stdin closes), or on any signal; it never
changes cgroups, sysctls or other processes. Its own ``oom_score_adj`` is lowered as far as this user may
(so that a row that overruns is the process the kernel kills, not the balloon); the rows raise theirs.

Used by `scale_bench.py`; by hand: ``python benchmarks/balloon.py --leave 8GiB`` holds until Ctrl-C.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CHILD = r"""
import ctypes, mmap, os, sys
try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")
except OSError:
    pass
hold, chunk, blocks = int(sys.argv[1]), 256 << 20, []
libc = ctypes.CDLL(None)
while hold > 0:
    n = min(chunk, hold)
    block = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(block))
    libc.memset(ctypes.c_void_p(address), 1, ctypes.c_size_t(n))  # every page touched: resident, not reclaimable
    blocks.append(block)
    hold -= n
print("ready", flush=True)
sys.stdin.read()  # until the parent says so or goes away
"""

FLOOR = 1 << 30  # the least a run is left: below it the balloon refuses to start


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


class Balloon:
    """``with Balloon(leave):`` MemAvailable is about ``leave`` bytes inside the block (checked after filling:
    within 2% or 64 MiB), and back when it ends, also on an exception or Ctrl-C."""

    def __init__(self, leave: int, floor: int = FLOOR) -> None:
        if leave < floor:
            raise SystemExit(f"balloon: leaving {leave >> 20} MiB is below the floor of {floor >> 20} MiB for a run")
        self.leave, self.child, self.held = leave, None, 0

    def __enter__(self) -> Balloon:
        available = mem_available()
        self.held = available - self.leave
        if self.held <= 0:
            print(f"balloon: {available >> 20} MiB available already, not above {self.leave >> 20} MiB: nothing held",
                  file=sys.stderr)  # fmt: skip
            return self
        self.child = subprocess.Popen([sys.executable, "-c", CHILD, str(self.held)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            if self.child.stdout.readline().strip() != "ready":
                raise RuntimeError("balloon: the child did not fill (killed by the kernel?)")
            time.sleep(1)  # the kernel settles its counters
            now = mem_available()
            if abs(now - self.leave) > max(0.02 * self.leave, 64 << 20):
                print(f"balloon: asked to leave {self.leave >> 20} MiB, MemAvailable is {now >> 20} MiB",
                      file=sys.stderr)  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.child is not None:
            self.child.stdin.close()
            try:
                self.child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
            self.child = None


def parse_size(text: str) -> int:
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def main() -> None:
    parser = argparse.ArgumentParser(description="hold anonymous memory until MemAvailable is about --leave")
    parser.add_argument("--leave", required=True, help="bytes to leave available, e.g. 8GiB")
    args = parser.parse_args()
    with Balloon(parse_size(args.leave)) as balloon:
        print(f"holding {balloon.held >> 20} MiB; MemAvailable {mem_available() >> 20} MiB; Ctrl-C to release")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
