"""How to read layers bigger than the page cache into slots (`make bench-read-paths`): three ways, side by side
in one run, under a balloon (`balloon.py`) that leaves ``--leave`` bytes available, with a thread computing
beside the reads as a model would.

- ``buffered``: ``preadv`` of each layer into one slot, the page cache left to itself (what the read tiers did);
- ``handed back``: the same, then ``POSIX_FADV_DONTNEED`` on the bytes read (`files.Stamped.drop`);
- ``O_DIRECT``: 4 threads, 4 MiB aligned reads into bounce buffers, copied into the slot.

Each reads 24 layer-sized spans (436 MiB, one 8B layer in bfloat16, at unaligned offsets as in a
safetensors file) through the checkpoint ``synth.py llama-8b`` writes, page cache emptied before each way,
and reports GB/s over the 24 and the computing thread's iterations per second. Appends JSON lines to
``benchmarks/results/read_paths.jsonl``. Usage: ``.venv/bin/python benchmarks/read_paths.py [--leave 3700MiB]``
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import mmap
import os
import platform
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYER = 436 << 20
CHUNK = 4 << 20


def _compute(stop: threading.Event) -> int:
    import torch

    a, x, n = torch.randn(4096, 4096, dtype=torch.bfloat16), torch.randn(1, 4096, dtype=torch.bfloat16), 0
    while not stop.is_set():
        for _ in range(50):
            x = (x @ a).clamp(-1, 1)
        n += 1
    return n


class Reader:
    def __init__(self, paths: list[Path]) -> None:
        import numpy as np

        self.fds = [os.open(p, os.O_RDONLY) for p in paths]
        self.direct = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
        self.slot = np.ones(LAYER, dtype=np.uint8)  # touched: resident before the runs
        self.view = memoryview(self.slot)
        self.bounces = [mmap.mmap(-1, CHUNK + 8192) for _ in range(4)]  # page-aligned
        self.free, self.lock = list(range(4)), threading.Lock()
        self.pool = cf.ThreadPoolExecutor(4)

    def buffered(self, f: int, at: int) -> None:
        os.preadv(self.fds[f], [self.view], at)

    def handed_back(self, f: int, at: int) -> None:
        os.preadv(self.fds[f], [self.view], at)
        os.posix_fadvise(self.fds[f], at, LAYER, os.POSIX_FADV_DONTNEED)

    def _piece(self, f: int, at: int, a: int, b: int) -> None:
        with self.lock:
            k = self.free.pop()
        try:
            lo, hi = (at + a) // 4096 * 4096, -(-(at + b) // 4096) * 4096
            bounce, got = memoryview(self.bounces[k])[: hi - lo], 0
            while got < hi - lo:
                n = os.preadv(self.direct[f], [bounce[got:]], lo + got)
                if n <= 0:
                    break
                got += n
            skip = at + a - lo
            self.view[a:b] = bounce[skip : skip + b - a]
        finally:
            with self.lock:
                self.free.append(k)

    def o_direct(self, f: int, at: int) -> None:
        jobs = [self.pool.submit(self._piece, f, at, a, min(LAYER, a + CHUNK)) for a in range(0, LAYER, CHUNK)]
        for job in jobs:
            job.result()


def main() -> None:
    sys.path.insert(0, str(HERE))
    from balloon import Balloon, parse_size
    from synth import write

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leave", default="3700MiB", help="bytes the balloon leaves available")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    folder = write("llama-8b")
    paths = sorted(folder.glob("*.safetensors"))
    spans = [(f, at) for f, p in enumerate(paths) for at in range(12345, p.stat().st_size - LAYER, LAYER)][:24]
    reader = Reader(paths)
    (HERE / "results").mkdir(exist_ok=True)
    with Balloon(parse_size(args.leave)), open(HERE / "results" / "read_paths.jsonl", "a") as out:
        for round_ in range(args.rounds):
            for way in ("buffered", "handed back", "O_DIRECT"):
                read = getattr(reader, way.replace(" ", "_").lower())
                for fd in reader.fds:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                stop = threading.Event()
                with cf.ThreadPoolExecutor(1) as side:
                    computing = side.submit(_compute, stop)
                    start = time.perf_counter()
                    for f, at in spans:
                        read(f, at)
                    seconds = time.perf_counter() - start
                    stop.set()
                    iterations = computing.result()
                row = {"way": way, "round": round_, "leave": args.leave, "gb_per_s": len(spans) * LAYER / seconds / 1e9,
                       "compute_iterations_per_s": iterations / seconds,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores"}  # fmt: skip
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
