"""The results store owns a sweep's layout: paths, part names, trial ids, and the readers built on them."""

from __future__ import annotations

import pytest

from galaxygen import results
from galaxygen.results import ResultsStore, StoreError, epoch_part, load, locate, run_checkpoint


def rows(epoch: int, value: float) -> list[dict]:
    return [{"step": 10 * epoch, "epoch": epoch, "split": "val", "metric": "loss", "value": value, "wall_time": 1.0}]


def test_every_path_of_a_sweep_comes_from_the_store(tmp_path):
    store = ResultsStore(tmp_path, "sw")
    assert store.trial_path("t1") == tmp_path / "sw" / "trials" / "t1.parquet"
    assert store.epoch_path("t1", 3) == tmp_path / "sw" / "metrics" / "t1" / "epoch-00003.parquet"
    assert store.part_path("t1", "eval") == tmp_path / "sw" / "metrics" / "t1" / "eval.parquet"
    assert store.checkpoint("t1", "best") == tmp_path / "sw" / "runs" / "t1" / "checkpoints" / "best.pt"
    assert store.checkpoint("t1") == run_checkpoint(store.run_dir("t1"), "last")
    assert store.slurm_dir("t1") == tmp_path / "sw" / "slurm_logs" / "t1"
    assert {store.code_dir().name, store.report_dir().name, store.meta_path().name} == {"code", "report", "sweep.json"}
    assert ResultsStore.from_dir(tmp_path / "sw").dir == store.dir
    with pytest.raises(ValueError, match="metrics part"):
        store.part_path("t1", "notes")
    with pytest.raises(ValueError, match="checkpoint kind"):
        store.checkpoint("t1", "final")


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "a b", "x" * 200, "t (copy)"])
def test_a_trial_id_is_a_safe_file_name(tmp_path, bad):
    with pytest.raises(StoreError, match="invalid trial id"):
        ResultsStore(tmp_path, "sw").run_dir(bad)


def test_epoch_parts_round_trip_and_clear(tmp_path):
    store = ResultsStore(tmp_path, "sw")
    for epoch in (1, 2, 3):
        store.write_epoch("t1", epoch, rows(epoch, 10.0 - epoch))
    store.write_eval("t1", [{**rows(3, 0.5)[0], "split": "eval", "metric": "fid"}])
    assert store.epochs("t1") == [1, 2, 3] and epoch_part(3) == "epoch-00003"
    assert store.read_epoch("t1", 2)["value"].tolist() == [8.0]
    store.write_epoch("t1", 2, rows(2, 42.0))  # a repeated epoch replaces its part
    assert sorted(store.metrics("t1")["value"]) == [0.5, 7.0, 9.0, 42.0]
    store.clear_metrics("t1", after_epoch=1)
    assert store.epochs("t1") == [1] and (store.metrics("t1")["split"] == "eval").any()


def test_locate_finds_the_store_and_trial_of_a_checkpoint(tmp_path):
    store = ResultsStore(tmp_path, "sw")
    found = locate(store.checkpoint("abc123", "best"))
    assert found is not None and found[0].dir == store.dir.resolve() and found[1] == "abc123"
    assert locate(tmp_path / "elsewhere" / "model.pt") is None


def test_readers_read_only_the_stores_own_files(tmp_path, caplog):
    store = ResultsStore(tmp_path, "sw")
    store.write_trial("t1", status="completed", epochs_done=2)
    store.write_epoch("t1", 1, rows(1, 3.0))
    store.write_epoch("t1", 2, rows(2, 2.0))
    folder = store.metrics_dir("t1")
    (folder / "epoch-00002 (copy).parquet").write_bytes(store.epoch_path("t1", 2).read_bytes())
    (folder / "notes.txt").write_text("remember to check epoch 2")
    (folder / "epoch-00001.parquet~").write_bytes(store.epoch_path("t1", 1).read_bytes())
    (store.trials_dir() / "t1 (copy).parquet").write_bytes(store.trial_path("t1").read_bytes())
    (store.metrics_root() / "README").write_text("stray")
    (folder / ".epoch-00003.parquet.tmp-123").write_bytes(b"partial")  # a dead writer's temporary: silent
    results._reported.clear()
    with caplog.at_level("WARNING", logger="galaxygen.results"):
        trials, metrics = load(tmp_path, "sw")
        load(tmp_path, "sw")  # warned once per file, not per read
    assert trials["trial_id"].tolist() == ["t1"]
    assert sorted(metrics["epoch"]) == [1, 2], "a copied part must never yield duplicate rows"
    warned = [r.getMessage() for r in caplog.records]
    for name in ("epoch-00002 (copy).parquet", "notes.txt", "epoch-00001.parquet~", "t1 (copy).parquet", "README"):
        assert sum(name in w for w in warned) == 1, (name, warned)
    assert not any(".tmp-" in w for w in warned)
