"""Memory that sequences of one token take: loads MODEL, feeds one token into each of N
sequence slots, and prints how much the process grew (VmRSS). With transparent huge pages
set to "always", a cache mapping not kept out of them grows by most of a full context per
sequence.

    python benchmarks/cache_pages.py MODEL [N] [LOAD_JSON]"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import neocore  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


count = int(sys.argv[2]) if len(sys.argv) > 2 else 8
model = neocore.load(sys.argv[1], threads=2, **(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}))
model.append([1, 2, 3])  # the step's scratch, touched once
model.reset()
logits = np.empty((1, model.config.vocab_size), np.float32)
before = rss_bytes()
for slot in range(1, count + 1):
    model.step(np.array([5], np.int32), np.array([slot], np.int32), np.ones(1, np.uint8), logits)
grown = rss_bytes() - before
with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
    thp = f.read().strip()
print(f"THP {thp}: {count} sequences of one token: +{grown / 2**20:.1f} MiB "
      f"(a full {model.context_length}-token sequence: {model.cache_bytes(model.context_length) / 2**20:.1f} MiB)")
