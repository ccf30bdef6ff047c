"""The app's jobs: per-session run directories and their clean-up."""

from __future__ import annotations

import os
import time

from app import jobs


def test_run_dirs_are_per_session_and_cleaned(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMITR_APP_RUNS", str(tmp_path))
    first = jobs.new_run_dir("session-a")
    first.mkdir()
    other = jobs.new_run_dir("session-b")
    other.mkdir()
    second = jobs.new_run_dir("session-a")  # a new run replaces the session's previous one
    assert not first.exists() and other.exists() and second != first
    # Age and count limits.
    old = tmp_path / "zzz-old"
    old.mkdir()
    os.utime(old, (time.time() - 10_000, time.time() - 10_000))
    deleted = jobs.cleanup_runs(tmp_path, max_age_s=5_000, max_dirs=10)
    assert deleted == [old] and other.exists()
    for i in range(4):
        (tmp_path / f"n{i}").mkdir()
        os.utime(tmp_path / f"n{i}", (time.time() - 100 + i, time.time() - 100 + i))
    jobs.cleanup_runs(tmp_path, max_age_s=5_000, max_dirs=2)
    assert len([p for p in tmp_path.iterdir()]) == 2

