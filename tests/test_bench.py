"""``fedmitr.bench``: the grid of methods, the equal-time reruns, the tables and the speed test."""

from __future__ import annotations

import json

import pytest

from fedmitr import bench
from fedmitr.cli import main
from fedmitr.config import preset_config
from fedmitr.events import BenchCell, Metric


def test_bench_tiny_writes_tables(tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--preset", "tiny", "--alphas", "0.5,iid", "--seeds", "0", "--methods",
            "fedavg,ensemble,dense-kd,fedmitr", "--out", str(out)]
    assert main(argv) == 0
    records = json.loads((out / "bench.json").read_text())["records"]
    methods = {r["method"] for r in records}
    assert methods == {"fedavg", "ensemble", "dense-kd", "fedmitr", "fedmitr@time"}
    assert {r["alpha"] for r in records} == {"0.5", "iid"}
    assert all(r["inversion_speedup"] > 0 for r in records)
    assert {r["client_init"] for r in records} == {"scratch"} and {r["setting"] for r in records} == {"tiny"}
    table = (out / "bench.md").read_text()
    assert "| fedmitr |" in table and "inversion_speedup" in table and "α=iid" in table
    assert (out / "frontier-tiny.html").exists()
    assert "| tiny | 0.5 | 1 |" in table and "Where FedMITR wins" in table
    merged = tmp_path / "merged"
    assert main(["bench", "--merge", str(out / "bench.json"), str(out / "bench.json"), "--out", str(merged)]) == 0
    assert len(json.loads((merged / "bench.json").read_text())["records"]) == 2 * len(records)
    assert main(["bench", "--merge", str(tmp_path / "missing.json"), "--out", str(merged)]) == 2


def test_records_name_where_the_clients_started():
    from fedmitr.config import apply_overrides

    cfg = apply_overrides(preset_config("cpu-49"), {"model": {"init": "fractal"}})
    assert bench.client_init(cfg) == "fractal" and bench.setting_name(cfg) == "cpu-49 · fractal"
    cfg = apply_overrides(preset_config("cpu"), {"model": {"init": "/somewhere/my-backbone.safetensors"}})
    assert bench.client_init(cfg) == "my-backbone" and bench.setting_name(cfg) == "cpu · my-backbone"


def test_bench_speed_only_times_dense_and_sparse(tmp_path, capsys):
    out = tmp_path / "speed"
    assert main(["bench", "--preset", "tiny", "--speed-only", "--repeats", "1", "--out", str(out)]) == 0
    speed = json.loads((out / "speed.json").read_text())
    assert len(speed["seconds"]["dense"]) == len(speed["seconds"]["sparse"]) == 1
    assert speed["inversion_speedup"] == pytest.approx(speed["dense_mean"] / speed["sparse_mean"])
    assert speed["active_patches_at_end"] < speed["patches"] == 16
    assert "inversion_speedup" in capsys.readouterr().out



def test_run_bench_reports_through_events_and_records_the_command_it_was_given(tmp_path, capsys):
    cfg = preset_config("tiny").validate()
    cfg = cfg.__class__(**{**cfg.__dict__, "methods": ("fedavg", "ensemble")})
    events = []
    table = bench.run_bench(cfg, [0.5], [0, 1], tmp_path / "b", command="my own command", on_event=events.append)
    assert "`my own command`" in table and "`my own command`" in (tmp_path / "b" / "bench.md").read_text()
    assert [(e.cell, e.seed, e.index, e.total) for e in events if isinstance(e, BenchCell)] == [
        ("alpha=0.5", 0, 1, 2), ("alpha=0.5", 1, 2, 2)]
    finals = [e.source for e in events if isinstance(e, Metric) and e.step is None and e.client is None]
    assert finals == ["fedavg", "ensemble"] * 2
    assert capsys.readouterr().out == ""  # a library module: nothing printed


def test_cli_bench_records_its_own_arguments(tmp_path):
    out = tmp_path / "b"
    assert main(["bench", "--preset", "tiny", "--alphas", "iid", "--seeds", "0", "--methods", "ensemble",
                 "--out", str(out)]) == 0
    assert f"`fedmitr bench --preset tiny --alphas iid --seeds 0 --methods ensemble --out {out}`" in (
        out / "bench.md").read_text()


@pytest.mark.parametrize("alphas, seeds, message", [("0.5", "a", "--seeds must be comma-separated integers"),
                                                     ("", "0", "at least one value"),
                                                     ("-1", "0", "alpha must be a number > 0")])
def test_bad_grid_is_one_error_line(alphas, seeds, message, tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--alphas", alphas, "--seeds", seeds, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_regime_map_marks_differences_beyond_the_spread():
    def rec(method, acc, seed, alpha="0.1", setting="canvas"):
        return {"setting": setting, "alpha": alpha, "seed": seed, "method": method, "accuracy": acc}

    records = [rec("fedmitr", 0.60, 0), rec("fedmitr", 0.62, 1), rec("dense-kd", 0.50, 0), rec("dense-kd", 0.51, 1),
               rec("sparse-kd", 0.61, 0), rec("sparse-kd", 0.60, 1)]
    table = bench.regime_map(records)
    row = next(line for line in table.splitlines() if line.startswith("| canvas | 0.1 |"))
    assert "**+10.5**" in row  # 61 vs 50.5: far beyond a 1.4-point spread
    assert "| +0.5 |" in row  # 61 vs 60.5: within the spread, not bold
    assert "| - |" in row  # no fedmitr@time rows
    assert row.endswith("| **+10.0** |")  # sparsity's effect: sparse-kd 60.5 vs dense-kd 50.5


def test_merged_parts_list_alphas_in_order_iid_last():
    records = [{"setting": "cpu", "alpha": a, "seed": 0, "method": m, "accuracy": 0.5}
               for a in ("0.5", "iid", "0.1", "0.3") for m in ("fedmitr", "dense-kd")]
    rows = [line.split(" | ")[1] for line in bench.regime_map(records).splitlines()[2:]]
    assert rows == ["0.1", "0.3", "0.5", "iid"]  # the per-setting tables' columns take the same order


def test_pareto_front_keeps_only_points_nothing_beats():
    points = [(10, 0.5), (20, 0.4), (30, 0.7), (5, 0.2), (30, 0.6)]
    assert bench.pareto_front(points) == [(5, 0.2), (10, 0.5), (30, 0.7)]


def test_equal_time_takes_only_sparse_methods_that_run(tmp_path, capsys):
    argv = ["bench", "--preset", "tiny", "--methods", "fedavg,dense-kd", "--equal-time", "dense-kd",
            "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--equal-time takes sparse or generator methods that run" in capsys.readouterr().err


def test_the_benchmark_pair_is_the_nearest_alpha_of_the_setting_paired_by_seed():
    def rec(method, acc, alpha, seed=0, seconds=100.0, setting="cpu-49"):
        return {"setting": setting, "alpha": alpha, "seed": seed, "method": method, "accuracy": acc,
                "seconds": seconds}

    records = [rec("fedmitr", 0.40, "0.1", seconds=60), rec("dense-kd", 0.30, "0.1", seconds=120),
               rec("fedmitr", 0.50, "0.1", seed=1, seconds=80), rec("dense-kd", 0.46, "0.1", seed=1, seconds=100),
               rec("fedmitr", 0.99, "0.1", seed=2),  # no dense-kd on seed 2: not paired, left out
               rec("fedmitr@time", 0.45, "0.1"),
               rec("fedmitr", 0.70, "0.5"), rec("dense-kd", 0.72, "0.5"), rec("fedmitr", 0.9, "iid"),
               rec("dense-kd", 0.9, "iid")]
    pair = bench.benchmark_pair(records, "cpu-49", 0.2)
    assert pair["alpha"] == "0.1" and pair["seeds"] == [0, 1]
    assert pair["accuracy"] == {"fedmitr": pytest.approx(0.45), "dense-kd": pytest.approx(0.38)}
    assert pair["seconds"] == {"fedmitr": 70, "dense-kd": 110}
    assert pair["paired"] == pytest.approx([0.10, 0.04])
    line = bench.compare_with_benchmark(records, "cpu-49", 0.2)
    assert "α=0.1" in line and "45.0% in 70 s" in line and "38.0% in 110 s" in line and "+7.0 points" in line
    assert "(per seed +10.0, +4.0)" in line
    assert "-2.0 points" in bench.compare_with_benchmark(records, "cpu-49", 1.0)
    assert "α=iid" in bench.compare_with_benchmark(records, "cpu-49", None)
    assert bench.compare_with_benchmark(records, "gpu", 0.1) is None


def test_scale_measures_each_k_in_its_own_process(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--scale", "2,3", "--methods", "fedavg,fedmitr",
                 "--out", str(tmp_path / "scale")]) == 0
    records = json.loads((tmp_path / "scale" / "scale.json").read_text())["records"]
    assert [r["clients"] for r in records] == [2, 3]
    for r in records:
        assert r["peak_rss_mb"] > 50 and r["total_seconds"] > 0
        assert {"clients", "fedmitr:inversion", "fedmitr:distill"} <= set(r["seconds"])
    assert "| 3 |" in (tmp_path / "scale" / "scale.md").read_text() and (tmp_path / "scale" / "scale.html").exists()
    progress = capsys.readouterr().err
    assert "[bench 2/2] K=3 seed=0" in progress and "alpha=" not in progress
    assert main(["bench", "--preset", "tiny", "--scale", "1", "--out", str(tmp_path / "x")]) == 2


def test_the_paired_table_pairs_each_seed_on_the_same_clients():
    def rec(method, acc, seed, alpha="0.5"):
        return {"setting": "cpu", "alpha": alpha, "seed": seed, "method": method, "accuracy": acc, "seconds": 1.0}

    records = [rec("fedmitr", 0.80, 0), rec("dense-kd", 0.75, 0), rec("fedmitr", 0.70, 1), rec("dense-kd", 0.72, 1),
               rec("fedmitr", 0.9, 2),  # no dense-kd on seed 2: not paired
               rec("sparse-kd", 0.78, 0)]
    table = bench.paired_table(records)
    header, _, row = table.splitlines()
    assert "fedmitr − dense-kd (against the baseline)" in header and "fedmitr − sparse-kd" in header
    assert "fedmitr − fedmitr-noise" not in header  # nothing to pair: left out
    assert row.startswith("| cpu | 0.5 | +1.5 (+5.0, -2.0) | +2.0 (+2.0) |")
    assert bench.paired_table([rec("fedmitr", 0.8, 0)]) == ""


def test_a_seed_trained_twice_on_other_clients_pairs_within_its_clients_and_counts_once():
    """A merge of two passes whose clients differ (trained again on other hardware): each method
    is paired only with records on its own clients, and a seed counts once in the means."""
    def rec(method, acc, clients, seed=0):
        return {"setting": "cpu", "alpha": "0.5", "seed": seed, "method": method, "accuracy": acc,
                "seconds": 1.0, "client_accuracy": clients, "client_seconds": 1.0}

    old, new = [0.71, 0.46], [0.72, 0.44]
    records = [rec("fedmitr", 0.80, old), rec("dense-kd", 0.75, old),       # pass A
               rec("fedmitr", 0.90, new), rec("co-boosting", 0.86, new),    # pass B, other clients
               rec("co-boosting", 0.10, [0.1, 0.1])]                        # clients nobody else ran on
    table = bench.paired_table(records)
    assert "fedmitr − dense-kd (against the baseline) | fedmitr − co-boosting" in table
    assert "| cpu | 0.5 | +5.0 (+5.0) | +4.0 (+4.0) |" in table  # not 0.90 − 0.75, not 0.80 − 0.86
    assert [r["accuracy"] for r in bench.one_per_seed(records)] == [0.80, 0.75, 0.86]
    assert "| fedmitr | 80.0 |" in bench.summarise(records, "cmd")  # the first fedmitr of the seed, not a mean
    pair = bench.benchmark_pair([records[2], *records], "cpu", 0.5)  # pass B's fedmitr listed first
    assert pair["paired"] == pytest.approx([0.05]) and pair["accuracy"]["fedmitr"] == pytest.approx(0.80)
    assert bench.benchmark_pair([records[2], records[1]], "cpu", 0.5) is None  # never on the same clients
