"""``make bench``: every benchmark in turn; each writes its raw JSON under benchmarks/results/."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    ["-m", "benchmarks.demo_quality", "--methods", "bam_ia", "simsiam"],
    ["-m", "benchmarks.mvp_teacher_share", "--fit"],
]


def main() -> None:
    for args in BENCHMARKS:
        print("+ python", " ".join(args), flush=True)
        subprocess.run([sys.executable, *args], check=True)


if __name__ == "__main__":
    main()
