"""Run MMSB's benchmark suite: the same command as ``mmsb bench``.

    python benchmarks/run.py --smoke
    python benchmarks/run.py --check-targets --out benchmarks/results/latest.json
    python benchmarks/run.py --categories delta,replay --compare benchmarks/results/baseline.json

``--help`` lists every option; ``benchmarks/README.md`` explains the method.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from mmsb.bench.command import bench_command
except ImportError:  # a checkout without `pip install -e .`: use its src/ directly
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from mmsb.bench.command import bench_command

if __name__ == "__main__":
    bench_command(prog_name="benchmarks/run.py")
