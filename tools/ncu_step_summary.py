#!/usr/bin/env python3
"""Per-kernel time of one decoding step from `ncu --csv --metrics gpu__time_duration.sum` output
(scripts/gpu_step_profile.sh): kernels grouped by name, sorted by total time, with their share of the step."""
import csv
import sys
from collections import defaultdict


def main(path: str) -> None:
    total = defaultdict(float)
    count = defaultdict(int)
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's own log lines are not CSV
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"]
        name = name[:110] + ("..." if len(name) > 110 else "")
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "ns")
        total[name] += value / 1000.0 if unit in ("ns", "nsecond") else value
        count[name] += 1
    step = sum(total.values())
    print(f"{sum(count.values())} kernels, {step:.1f} us in all (each kernel alone, caches flushed)")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"{us:10.1f} us {100 * us / step:5.1f}% {count[name]:5d}x  {name}")


if __name__ == "__main__":
    main(sys.argv[1])
