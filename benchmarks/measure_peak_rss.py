"""Run `mmgem-convert` (same arguments) in this process and report its wall time and peak resident memory.

    python -m benchmarks.measure_peak_rss --vision-model ... --language-model ... --output-dir ...

Peak RSS is the kernel's high-water mark of the conversion process (`getrusage(RUSAGE_SELF).ru_maxrss`). The reload
check that loads the written folder in a fresh interpreter reports its own (VmHWM) in the "Reload check passed" line;
`RUSAGE_CHILDREN` cannot be used for it, as a child started by fork/exec inherits the parent's high-water mark.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from mmgem.conversion.convert_mmgem import main


def run(argv: list[str] | None = None) -> dict[str, float]:
    start = time.perf_counter()
    status = main(argv, prog="python -m benchmarks.measure_peak_rss")
    elapsed = time.perf_counter() - start
    kib = 1024.0 * 1024.0  # ru_maxrss is in KiB on Linux
    report = {
        "exit_status": status,
        "wall_seconds": round(elapsed, 1),
        "peak_rss_conversion_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, 2),
    }
    print(json.dumps(report), file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(run()["exit_status"])
