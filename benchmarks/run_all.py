"""`make bench`: run every benchmark in turn; results land in benchmarks/results/*.json."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_registration.py", "bench_speed.py", "bench_prototype.py"]

if __name__ == "__main__":
    for bench in BENCHES:
        print(f"== {bench}", flush=True)
        subprocess.run([sys.executable, str(HERE / bench)], check=True, cwd=HERE.parent)
