"""Resource shares of model actors and statistics tasks: no share can starve the other stage."""
import pytest

from jobs import cluster
from jobs.config import RunConfig


@pytest.mark.parametrize("gpus,models,device,expected", [
    (0, 4, "auto", (0.0, 0.0)),
    (0, 2, "cuda", (1.0, 0.0)),  # an autoscaler sees the demand and starts a GPU worker
    (4, 4, "cpu", (0.0, 0.0)),
    (1, 4, "auto", (0.2, 0.2)),
    (1, 1, "auto", (0.5, 0.25)),
    (2, 4, "auto", (0.3333, 0.25)),
    (4, 4, "auto", (0.5, 0.25)),
    (8, 4, "auto", (1.0, 0.25)),
])
def test_gpu_shares(monkeypatch, gpus, models, device, expected):
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": float(gpus)})
    actor, task = cluster.gpu_shares(RunConfig(device=device), models)
    assert (actor, task) == pytest.approx(expected)
    if gpus:
        # Pack the actors first-fit onto the GPUs as Ray would; a task must still fit on one GPU.
        free = [1.0] * gpus
        for _ in range(models):
            i = next(i for i, f in enumerate(free) if f >= actor - 1e-4)
            free[i] -= actor
        assert max(free) >= task - 1e-4
    assert cluster.actor_resources(RunConfig(device=device), models)["num_cpus"] == 0
