"""``python -m mmsb.bench``: the same command as ``mmsb bench``."""

from .command import bench_command

if __name__ == "__main__":
    bench_command(prog_name="python -m mmsb.bench")
