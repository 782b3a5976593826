"""The artifact cache: stable keys, atomic commits, failed writes leave nothing behind."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_pipeline.artifacts import ArtifactCache, atomic_save_npy, stable_hash


def test_keys_depend_on_config_and_upstream(tmp_path):
    c = ArtifactCache(tmp_path)
    k = c.key("cluster", {"k": 10}, "up1")
    assert k == c.key("cluster", {"k": 10}, "up1")
    assert k != c.key("cluster", {"k": 11}, "up1")
    assert k != c.key("cluster", {"k": 10}, "up2")
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})


def test_writing_commits_with_marker(tmp_path):
    c = ArtifactCache(tmp_path)
    with c.writing("s", "k1") as d:
        atomic_save_npy(d / "a.npy", np.arange(3))
        assert not c.is_complete("s", "k1")
    assert c.is_complete("s", "k1")
    np.testing.assert_array_equal(np.load(c.path("s", "k1") / "a.npy"), np.arange(3))


def test_failed_write_leaves_no_entry(tmp_path):
    c = ArtifactCache(tmp_path)
    with pytest.raises(RuntimeError):
        with c.writing("s", "k2") as d:
            (d / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not c.is_complete("s", "k2")
    assert list((tmp_path / "s").iterdir()) == []


def test_recommit_replaces_existing_entry(tmp_path):
    c = ArtifactCache(tmp_path)
    with c.writing("s", "k") as d:
        (d / "v").write_text("1")
    with c.writing("s", "k") as d:
        (d / "v").write_text("2")
    assert (c.path("s", "k") / "v").read_text() == "2"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k"]


def test_stage_helper_reuses_forces_and_commits_nothing_on_error(tmp_path):
    cache = ArtifactCache(tmp_path)
    with cache.stage("s", "k") as st:
        assert not st.reused
        (st.dir / "a.txt").write_text("1")
        st.metrics = {"s/x": 1}
    assert cache.is_complete("s", "k") and (st.path / "a.txt").read_text() == "1"
    with cache.stage("s", "k") as again:
        assert again.reused and again.metrics == {"s/x": 1} and again.dir is None
    with cache.stage("s", "k", force=True) as forced:
        assert not forced.reused
        forced.metrics = {"s/x": 2}
    with cache.stage("s", "k") as st:
        assert st.metrics == {"s/x": 2}
    with pytest.raises(RuntimeError):
        with cache.stage("s", "k2") as st:
            raise RuntimeError("boom")
    assert not cache.is_complete("s", "k2")
    with pytest.raises(RuntimeError):  # a partial stage keeps its pieces for the next run
        with cache.stage("s", "k3", partial=True) as st:
            (st.dir / "piece").write_text("p")
            raise RuntimeError("killed")
    with cache.stage("s", "k3", partial=True) as st:
        assert (st.dir / "piece").exists()
    assert cache.is_complete("s", "k3")
