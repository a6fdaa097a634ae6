import os
import shutil

import pytest

# Without CUDA, Triton kernels run through the interpreter on CPU tensors. Set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# MKL may lower its thread count under load (MKL_DYNAMIC), which changes float rounding between runs; bit-identical
# reload checks (also in subprocesses, which inherit this) need a fixed count.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers with two OpenMP threads each oversubscribe a 2-core machine: the tiny models' many small ops then
    # wait on descheduled threads (measured: a tiny UNet forward 8 ms with 1 thread, 3 s with 2 under load).
    # Subprocesses inherit the variable, so their float results match the worker's.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def hub_cache(tmp_path):
    """``put(folder, repo_id)``: copy a saved model/pipeline folder into a fresh HF hub cache as ``repo_id``'s
    ``main`` snapshot; returns the environment for a subprocess that loads it by repo id with ``HF_HUB_OFFLINE=1``."""
    cache = tmp_path / "hf_home" / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"

    def put(folder, repo_id: str) -> dict:
        repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, repo_dir / "snapshots" / rev)
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text(rev)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(
            HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_OFFLINE="1",
        )  # fmt: skip
        return env

    return put
