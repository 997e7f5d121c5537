"""Run one `losa ...` command in this process and record its peak resident memory.

Used by run_all.py so that every benchmark cell gets its own process (peak memory per cell).
Usage: python benchmarks/_cell.py RESULT.json -- losa-args...
"""

import json
import resource
import sys
import time

from losa.cli import main

if __name__ == "__main__":
    result_path, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    start = time.perf_counter()
    code = main(argv)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open(result_path, "w") as f:
        json.dump({"returncode": code, "wall_s": time.perf_counter() - start, "peak_rss_mib": peak_kib / 1024}, f)
    sys.exit(code)
