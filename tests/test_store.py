"""The DuckDB results store: schema, idempotent writes, readers, provenance, and several
processes writing at once."""

import json
import multiprocessing as mp
import subprocess
import sys
import time

import pandas as pd
import pytest

from harness.store import AGGREGATE, SCHEMA, Store, default_path


def _score(video, value, dimension="temporal_flickering", **extra):
    return {"checkpoint": "run/step_1", "suite": "shapes", "dimension": dimension,
            "video": video, "value": value, **extra}


def test_all_tables_created(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    names = {r["table_name"] for r in store.records(
        "SELECT table_name FROM information_schema.tables")}
    assert set(SCHEMA) | {"meta"} <= names
    for table in ("runs", "checkpoints", "train_metrics", "videos", "scores", "profiles",
                  "ablations", "studies"):
        assert table in SCHEMA


def test_default_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("M4V_STORE", raising=False)
    assert str(default_path()) == "reports/results.duckdb"
    monkeypatch.setenv("M4V_STORE", str(tmp_path / "x.duckdb"))
    assert Store().path == tmp_path / "x.duckdb"


def test_round_trip_with_provenance(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.add_run("default", config={"lr": 1e-3, "preset": "tiny"}, seed=7)
    store.add_checkpoint("default/step_00000100", run="default", step=100, path="/x")
    store.log_train_metrics("default", 10, {"loss": 0.5, "lr": 1e-3}, wall_time=1.5)
    run = store.records("SELECT * FROM runs")[0]
    assert json.loads(run["config"]) == {"lr": 1e-3, "preset": "tiny"}
    assert run["seed"] == 7 and run["kind"] == "train"
    assert run["created_at"] is not None and run["host"]
    versions = json.loads(run["versions"])
    assert "torch" in versions and "duckdb" in versions and "python" in versions
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert run["git_commit"].split("+")[0] == git.stdout.strip()
    metrics = store.table("train_metrics", run="default")
    assert isinstance(metrics, pd.DataFrame)
    assert dict(zip(metrics["name"], metrics["value"], strict=True)) == {"loss": 0.5, "lr": 1e-3}
    assert store.table("checkpoints")["step"].tolist() == [100]


def test_scores_are_idempotent_and_has_score(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    assert not store.has_score("run/step_1", "shapes", "temporal_flickering", "a-0.mp4")
    store.add_scores([_score("a-0.mp4", 0.9), _score("b-0.mp4", 0.8),
                      _score(AGGREGATE, 0.85, detail={"num_videos": 2})])
    store.add_scores([_score("a-0.mp4", 0.95)])  # re-run: replaces, no duplicate
    scores = store.scores(aggregate=False)
    assert scores["video"].tolist() == ["a-0.mp4", "b-0.mp4"]
    assert scores["value"].tolist() == [0.95, 0.8]
    assert store.scores(aggregate=True)["value"].tolist() == [0.85]
    assert store.has_score("run/step_1", "shapes", "temporal_flickering", "a-0.mp4")
    assert store.has_score("run/step_1", "shapes", "temporal_flickering")  # the aggregate
    assert not store.has_score("run/step_1", "standard", "temporal_flickering", "a-0.mp4")
    # a failed video is recorded but is not "done"
    store.add_scores([_score("c-0.mp4", None, error="unreadable video")])
    assert not store.has_score("run/step_1", "shapes", "temporal_flickering", "c-0.mp4")
    assert store.scored_videos("run/step_1", "shapes", "temporal_flickering") == {
        "a-0.mp4", "b-0.mp4"}
    # replace=False keeps the stored row
    store.add_scores([_score("a-0.mp4", 0.5)])
    store.write("scores", [_score("a-0.mp4", 0.1)], replace=False)
    assert store.has_score("run/step_1", "shapes", "temporal_flickering", "a-0.mp4")
    assert store.records("SELECT value FROM scores WHERE video = 'a-0.mp4'") == [{"value": 0.5}]
    # last row wins within one batch, as it would across batches
    store.add_scores([_score("d-0.mp4", 0.1), _score("d-0.mp4", 0.2)])
    assert store.records("SELECT value FROM scores WHERE video = 'd-0.mp4'") == [{"value": 0.2}]


def test_generic_tables(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.write("profiles", {"profile": "sweep", "model": "m4v-2b",
                             "setting": json.dumps({"frames": 121, "res": [768, 1280]}),
                             "metric": "tflops", "device": "meta", "value": 123.0})
    store.write("ablations", [{"grid": "arch", "variant": "baseline", "seed": s,
                               "metric": "shapes_all", "value": 0.1 * s,
                               "factors": {"registers": False}} for s in range(3)])
    store.write("studies", {"study": "s1", "item": "q1", "rater": "r1",
                            "criterion": "aesthetic", "choice": "A"})
    assert store.table("ablations", grid="arch")["value"].tolist() == pytest.approx([0, 0.1, 0.2])
    assert store.table("profiles")["value"].tolist() == [123.0]
    assert store.table("studies")["choice"].tolist() == ["A"]


@pytest.mark.parametrize(
    "table, row, match",
    [
        ("nope", {}, "table"),
        ("scores", {"checkpoint": "c", "suite": "s", "dimension": "d", "video": "v", "x": 1},
         "unknown columns"),
        ("scores", {"checkpoint": "c", "suite": "s", "dimension": "d"}, "key columns"),
    ],
)
def test_bad_writes(tmp_path, table, row, match):
    with pytest.raises(ValueError, match=match):
        Store(tmp_path / "r.duckdb").write(table, row)


def test_bad_filters(tmp_path):
    with pytest.raises(ValueError, match="unknown columns"):
        Store(tmp_path / "r.duckdb").table("scores", colour="red")


def test_failed_transaction_rolls_back(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    with pytest.raises(RuntimeError):
        with store.transaction() as con:
            con.execute("INSERT INTO runs (run) VALUES ('half-written')")
            raise RuntimeError("crash mid-transaction")
    assert store.records("SELECT * FROM runs") == []


def _writer(path, worker, rows, batch):
    store = Store(path, timeout=120)
    for start in range(0, rows, batch):
        store.add_scores([_score(f"w{worker}-{i}.mp4", worker * 1000 + i)
                          for i in range(start, min(start + batch, rows))])
        store.has_score("run/step_1", "shapes", "temporal_flickering", f"w{worker}-0.mp4")


def test_parallel_writers_lose_nothing(tmp_path):
    path = tmp_path / "r.duckdb"
    workers, rows = 4, 15
    ctx = mp.get_context("spawn")
    # mixed transaction sizes: one-row and five-row transactions interleave
    procs = [ctx.Process(target=_writer, args=(path, w, rows, 1 if w % 2 else 5))
             for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * workers
    got = Store(path).records("SELECT video, value FROM scores")
    expected = {f"w{w}-{i}.mp4": w * 1000 + i for w in range(workers) for i in range(rows)}
    assert {r["video"]: r["value"] for r in got} == expected


_HOLDER = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def test_waits_for_a_process_outside_the_lock_protocol(tmp_path):
    path = tmp_path / "r.duckdb"
    Store(path).add_run("first")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), "1.5"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        Store(path, timeout=60).add_run("second")  # retried until the holder lets go
        assert time.monotonic() - start > 0.5
    finally:
        holder.wait(timeout=60)
    assert sorted(Store(path).table("runs")["run"]) == ["first", "second"]
