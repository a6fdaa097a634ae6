"""Run every effalg benchmark in sequence (``bash scripts/dev.sh bench``, which also installs the peers of
``requirements-bench.txt``: torchao, optimum-quanto; without them ``w8a8_pixart.py`` and ``mixdq_unet.py`` skip
those rows)."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ["w8a8_pixart.py", "mixdq_unet.py", "mixdq_quality.py", "moa_speed.py", "moa_quality.py", "band_attention.py",
              "ditfastattn_speed.py", "ditfastattn_quality.py", "weight_only_decode.py", "mbq_decode.py", "mbq_quality.py",
              "usf_quality.py", "oms_quality.py", "real_size.py"]

if __name__ == "__main__":
    for script in BENCHMARKS:
        print(f"=== {script}", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, script), *sys.argv[1:]], check=True)
