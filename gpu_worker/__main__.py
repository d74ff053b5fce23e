"""`python -m gpu_worker`: the same as `ftune worker`."""

from gpu_worker.worker import run_worker
from service.settings import Settings

if __name__ == "__main__":
    run_worker(Settings.from_env())
