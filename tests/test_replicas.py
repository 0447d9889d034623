"""--replicas without Ray: parsing, the GPU assignment (cost rule, free slot, memory floor), the
fluid cost model, and gathering neuron samples from several replicas."""
from types import SimpleNamespace

import numpy as np
import pytest

from jobs import replicas as rp
from jobs.config import RunConfig, build_config
from jobs.errors import UsageError
from jobs.manifest import SPEED_SETTINGS, differing_settings

# The four GPT-2 sizes' real shapes.
SIZES = [SimpleNamespace(name="gpt2", n_params=124_000_000, n_layer=12, n_embd=768),
         SimpleNamespace(name="gpt2-medium", n_params=355_000_000, n_layer=24, n_embd=1024),
         SimpleNamespace(name="gpt2-large", n_params=774_000_000, n_layer=36, n_embd=1280),
         SimpleNamespace(name="gpt2-xl", n_params=1_558_000_000, n_layer=48, n_embd=1600)]
NAMES = [m.name for m in SIZES]
COSTS = {m.name: m.n_params for m in SIZES}
H100 = 80e9


@pytest.mark.parametrize("text,expected", [("auto", "auto"), ("3", 3), (" 2 ", 2), ('{"gpt2-xl": 3}', {"gpt2-xl": 3}), ("{}", {})])
def test_parse_replicas(text, expected):
    assert rp.parse_replicas(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5", "[1]", '{"gpt2": 0}', '{"gpt2": "2"}', '{"gpt2": true}', '{"gpt2": 1.0}', ""])
def test_bad_replicas_are_one_line(text):
    with pytest.raises(UsageError, match="--replicas") as e:
        RunConfig(replicas=text)
    assert "\n" not in str(e.value)


def test_yaml_and_flag_forms_and_resume_may_change_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("replicas:\n  gpt2-xl: 3\n")
    assert rp.parse_replicas(build_config({}, str(cfg)).replicas) == {"gpt2-xl": 3}
    cfg.write_text("replicas: 2\n")
    assert build_config({}, str(cfg)).replicas == "2"
    assert build_config({"replicas": "4"}, str(cfg)).replicas == "4"  # the flag wins
    cfg.write_text("replicas: true\n")
    with pytest.raises(UsageError, match="--replicas"):
        build_config({}, str(cfg))
    assert "replicas" in SPEED_SETTINGS
    old = RunConfig(run_id="r", out="o").to_dict()
    assert differing_settings(old, RunConfig(run_id="r", out="o", replicas="3").to_dict()) == []


def test_json_naming_an_unknown_model_is_refused():
    assert rp.requested_counts(NAMES, {"gpt2-xl": 3}) == {"gpt2": 1, "gpt2-medium": 1, "gpt2-large": 1, "gpt2-xl": 3}
    with pytest.raises(UsageError, match=r"--replicas names \['gpt2-xxl'\]"):
        rp.requested_counts(NAMES, {"gpt2-xxl": 3})


def test_cpu_auto_is_one_actor_per_model_and_n_json_are_taken_as_given():
    assert rp.plan_replicas(SIZES, 0, "auto") == {n: [0.0] for n in NAMES}
    assert rp.plan_replicas(SIZES, 0, 2) == {n: [0.0, 0.0] for n in NAMES}
    assert {n: len(v) for n, v in rp.plan_replicas(SIZES, 0, {"gpt2-xl": 3}).items()} == {**{n: 1 for n in NAMES}, "gpt2-xl": 3}
    assert rp.task_share(rp.plan_replicas(SIZES, 0, "auto")) == 0.0


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_gpu_auto_is_proportional_keeps_a_free_slot_and_the_memory_floor(gpus):
    shares = rp.plan_replicas(SIZES, gpus, "auto", gpu_memory=H100, batch_chunks=26)
    counts = {n: len(v) for n, v in shares.items()}
    slot = {s for v in shares.values() for s in v}
    assert len(slot) == 1  # one uniform slot: Ray can put any actor in any free slot
    (slot,) = slot
    k = round(1 / slot)
    assert sum(counts.values()) == gpus * k - 1  # every slot but one holds an actor: the free one is the tasks'
    assert rp.task_share(shares) == pytest.approx(min(0.25, slot)) and rp.task_share(shares) <= slot  # fits the free slot
    for m in SIZES:  # never less memory than the model needs for the run's batch
        assert slot * H100 >= rp.memory_need(m, "float32", 1024, 26)
    # Proportional: cost per replica is balanced to within one replica (D'Hondt), largest model most.
    per = {n: COSTS[n] / counts[n] for n in NAMES}
    assert all(per[n] <= COSTS[m] / (counts[m] - 1) for n in NAMES for m in NAMES if counts[m] > 1)
    assert counts["gpt2-xl"] == max(counts.values())
    base = rp.predicted_makespan(COSTS, {n: 1 for n in NAMES}, gpus)
    new = rp.predicted_makespan(COSTS, counts, gpus)
    ideal = sum(COSTS.values()) / gpus  # work-conserving lower bound
    assert new <= base + 1e-6 and new <= ideal * 1.06
    if gpus >= 2:
        assert new < 0.8 * base  # one actor per model leaves gpt2-xl the straggler


def test_makespan_model():
    # One GPU is work-conserving: replicas cannot beat the total work.
    assert rp.predicted_makespan({"a": 3.0, "b": 1.0}, {"a": 1, "b": 1}, 1) == pytest.approx(4.0)
    assert rp.predicted_makespan({"a": 3.0, "b": 1.0}, {"a": 3, "b": 1}, 1) == pytest.approx(4.0)
    # Two GPUs, one actor each: a is alone on GPU 0 and is the straggler; three replicas of a share the load.
    assert rp.predicted_makespan({"a": 3.0, "b": 1.0}, {"a": 1, "b": 1}, 2) == pytest.approx(3.0)
    assert rp.predicted_makespan({"a": 3.0, "b": 1.0}, {"a": 3, "b": 1}, 2) == pytest.approx(2.0)
    assert rp.dhondt({"a": 3.0, "b": 1.0}, 4) == {"a": 3, "b": 1}


def test_memory_floor_lowers_the_slots_and_refuses_what_cannot_fit():
    small = 16 * 2**30
    shares = rp.plan_replicas(SIZES, 4, "auto", gpu_memory=small, batch_chunks=1)
    (slot,) = {s for v in shares.values() for s in v}
    assert all(slot * small >= rp.memory_need(m, "float32", 1024, 1) for m in SIZES)
    roomy = rp.plan_replicas(SIZES, 4, "auto", gpu_memory=H100, batch_chunks=1)
    assert sum(map(len, shares.values())) < sum(map(len, roomy.values()))
    with pytest.raises(UsageError, match="gpt2-xl needs"):
        rp.plan_replicas(SIZES, 1, 4, gpu_memory=small)  # 16 actors on one 16 GiB GPU
    with pytest.raises(UsageError, match="needs"):
        rp.plan_replicas(SIZES, 1, "auto", gpu_memory=8 * 2**30)  # even one per model does not fit
    # bfloat16 weights take 2 bytes a parameter instead of 4; activations are budgeted in float32 either way.
    assert rp.memory_need(SIZES[3], "float32", 1024, 1) - rp.memory_need(SIZES[3], "bfloat16", 1024, 1) == 2 * SIZES[3].n_params


def test_explicit_counts_on_gpus_use_todays_slot_rule():
    shares = rp.plan_replicas(SIZES, 2, {"gpt2-xl": 3}, gpu_memory=H100)
    assert {n: len(v) for n, v in shares.items()} == {"gpt2": 1, "gpt2-medium": 1, "gpt2-large": 1, "gpt2-xl": 3}
    assert {s for v in shares.values() for s in v} == {0.25}  # ceil((6 + 1) / 2) = 4 slots per GPU
    assert rp.plan_replicas(SIZES, 1, 1, gpu_memory=H100) == {n: [0.2] for n in NAMES}  # as before replicas


def test_split_by_owner_and_gather_rows():
    owner = np.array([0, 1, 1, -1, 2, 0, 2])
    parts = rp.split_by_owner(owner, [0, 1])  # replica 2 died: its keys and the unknown one go to replica 0
    assert {r: p.tolist() for r, p in parts.items()} == {0: [0, 3, 4, 5, 6], 1: [1, 2]}
    parts = rp.split_by_owner(owner, [1, 2])  # replica 0 died: replica 1 is "replica 0" now
    assert {r: p.tolist() for r, p in parts.items()} == {1: [0, 1, 2, 3, 5], 2: [4, 6]}
    assert list(rp.split_by_owner(np.array([-1, -1]), [0, 1])) == [0]
    full = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    positions = [np.array([0, 3, 4, 5, 6]), np.array([1, 2])]
    got = rp.gather_rows(positions, [full[p] for p in positions])
    np.testing.assert_array_equal(got, full)
    assert got.dtype == np.float32
    with pytest.raises(ValueError, match="exactly once"):
        rp.gather_rows([np.array([0, 1]), np.array([1])], [full[:2], full[1:2]])


def test_replicas_of_a_pinned_model_need_its_resources_each(monkeypatch):
    from jobs import cluster

    cfg = RunConfig(run_id="r", out="o", device="cpu", actor_resources={"tiny-b": {"node_b": 1}}, replicas='{"tiny-b": 2}')
    assert cluster.wanted_resources(cfg) == {"node_b": 1.0}
    assert cluster.wanted_resources(cfg, {"tiny-a": 3, "tiny-b": 2}) == {"node_b": 2.0}
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 2.0, "node_b": 1.0})
    cluster.wait_for_resources(cfg, local=True)  # one actor fits
    with pytest.raises(UsageError, match="node_b: 2"):  # two would wait forever on a local instance
        cluster.wait_for_resources(cfg, local=True, replicas={"tiny-b": 2})
