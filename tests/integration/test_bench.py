"""`flowspec bench` on a tiny model: the results.json contract, interleaving, medians, peers, plots, report.

One bench run (2 prompts, 6 new tokens, a stage sweep 1,2 and a depth sweep 2,3, fp32 greedy) is
shared by the checks; in fp32 greedy every strategy must reproduce Hugging Face `generate`, which
the bench runs as its `hf` peer on the same prompts.
"""

from __future__ import annotations

import json
import statistics

import pytest

from engine.bench import sized_prompt_ids
from engine.cli import main
from tests.integration.engine_kit import single_thread  # noqa: F401  (fixture)
from tests.tiny_models import make_tiny_llama_dir

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]

STRATEGIES = ["ar", "chunk", "pipedec", "flowspec"]
PEERS = ["hf", "hf-lookup"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = make_tiny_llama_dir(root, n_layers=4)
    prompts = root / "two.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello world, hello there", "category": "chat"}) + "\n"
                       + json.dumps({"prompt": "def add(a, b):", "category": "code"}) + "\n")
    out = root / "out"
    code = main(["bench", "--model", str(model), "--draft", "lookup", "--prompts", str(prompts),
                 "--max-new-tokens", "6", "--stages", "1,2", "--depths", "2,3", "--dtype", "fp32",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    return json.loads((out / "results.json").read_text()), out, model


def test_results_json_contract(bench):
    results, _, _ = bench
    assert {"meta", "runs", "points", "medians", "plots"} <= set(results)
    meta = results["meta"]
    assert meta["machine"]["cores"] >= 1 and meta["settings"]["dtype"] == "fp32"
    assert {"torch", "transformers", "python"} <= set(meta["versions"])
    assert "pinning" in meta["placement"] and meta["link_emulation"]["mbps"] == [None]
    assert [p["setting"]["stages"] for p in results["points"]] == [1, 1, 2, 2]
    assert [p["setting"]["depth"] for p in results["points"]] == [2, 3, 2, 3]
    for run in results["runs"]:
        assert run["new_tokens"] >= 1 and run["seconds"] > 0 and run["ttft_s"] > 0
        assert run["tokens_per_s"] == pytest.approx(run["new_tokens"] / run["seconds"])
        if run["kind"] == "strategy":
            assert len(run["stage_busy"]) == run["point"]["stages"]
            assert 0 < run["ring_occupancy"] <= run["ring_slots"]


def test_runs_are_interleaved_and_peers_run_only_at_the_base_point(bench):
    results, _, _ = bench
    base = [r for r in results["runs"] if r["point"] == results["points"][0]["setting"]]
    assert [r["name"] for r in base] == (STRATEGIES + PEERS) * 2
    assert [r["prompt"] for r in base] == [0] * 6 + [1] * 6
    others = [r for r in results["runs"] if r["point"] != results["points"][0]["setting"]]
    assert others and all(r["kind"] == "strategy" for r in others)


def test_medians_are_medians_of_the_base_point_runs(bench):
    results, _, _ = bench
    base = [r for r in results["runs"] if r["point"] == results["points"][0]["setting"]]
    meds = results["medians"]
    assert list(meds) == STRATEGIES + PEERS
    for name, row in meds.items():
        mine = [r for r in base if r["name"] == name]
        assert row["runs"] == len(mine) == 2
        assert row["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in mine))
        assert row["ttft_s"] == pytest.approx(statistics.median(r["ttft_s"] for r in mine))
        assert row["speedup_vs_chunk"] == pytest.approx(row["tokens_per_s"] / meds["chunk"]["tokens_per_s"])
        assert set(row["by_category"]) == {"chat", "code"}
    assert meds["chunk"]["speedup_vs_chunk"] == pytest.approx(1.0)
    assert meds["ar"]["mean_accepted_length"] == pytest.approx(1.0)
    assert meds["flowspec"]["mean_accepted_length"] >= 1.0


def test_every_strategy_matches_the_hf_peer_in_fp32_greedy(bench):
    results, _, _ = bench
    by_prompt: dict[int, dict[str, str]] = {}
    for run in results["runs"]:
        if run["point"] == results["points"][0]["setting"]:
            by_prompt.setdefault(run["prompt"], {})[run["name"]] = run["output_sha1"]
    for outputs in by_prompt.values():
        assert {outputs[name] for name in STRATEGIES + PEERS} == {outputs["hf"]}, outputs


def test_plots_and_report_are_written(bench):
    results, out, _ = bench
    assert set(results["plots"]) == {"speed_by_strategy.png", "stage_sweep.png", "acceptance_by_depth.png"}
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    report = (out / "results.md").read_text()
    for name in STRATEGIES + PEERS:
        assert f"| {name} |" in report
    assert "Stage sweep" in report and "Draft depth sweep" in report and "pinning" in report


@pytest.mark.parametrize("args,message", [
    (["--strategies", "ar,fast"], "unknown strategies fast"),
    (["--peers", "hf-draft"], "hf-draft needs --draft"),
    (["--stages", "1,x"], "comma-separated numbers"),
    (["--in-process", "--link-mbps", "100"], "--in-process runs the stages in one process with no links"),
    (["--ring-slots", "0"], "ring_slots must be at least 1"),
])
def test_bad_settings_exit_2_with_a_message(args, message, bench, capsys, tmp_path):
    _, _, model = bench
    code = main(["bench", "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sized_prompts_reach_the_asked_length(bench):
    from engine.prompts import load_prompts
    from engine.session import Engine, EngineSpec

    _, _, model = bench
    prompts = load_prompts("quick")
    with Engine(EngineSpec(str(model), dtype="fp32", draft="lookup", in_process=True)) as engine:
        for length in (64, 256):
            ids = sized_prompt_ids(engine, prompts, 1, length)
            assert length - 8 <= len(ids) <= length


def one_prompt_bench(bench, out, *args: str) -> tuple[dict, object]:
    """A bench of the tiny model on one prompt, 6 tokens, fp32, prompt lookup; returns (results, out)."""
    _, _, model = bench
    prompts = out.parent / f"{out.name}.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello world, hello there", "category": "chat"}) + "\n")
    code = main(["bench", "--model", str(model), "--draft", "lookup", "--prompts", str(prompts), "--max-new-tokens",
                 "6", "--dtype", "fp32", "--out", str(out), "--no-progress", *args])
    assert code == 0
    return json.loads((out / "results.json").read_text()), out


def test_simulate_models_dedicated_devices_and_reports_its_error(bench, tmp_path):
    results, out = one_prompt_bench(bench, tmp_path / "sim", "--stages", "1,2", "--link-mbps", "100",
                                    "--link-latency-ms", "2", "--simulate")
    assert results["meta"]["simulated"] is True
    assert all(r["kind"] == "strategy" for r in results["runs"])  # peers are never simulated
    for point in results["points"]:
        assert point["simulated"] is True
        cal = point["calibration"]
        assert len(cal["seconds"]) == point["setting"]["stages"]
        assert all(len(row) == len(cal["sizes"]) and min(row) > 0 for row in cal["seconds"])
        runs = [r for r in results["runs"] if r["point"] == point["setting"]]
        assert len({r["output_sha1"] for r in runs}) == 1, "simulated strategies disagree in fp32 greedy"
        # ar is serial: every decoded token crosses every stage's device and every hop's latency once
        ar = next(r for r in runs if r["name"] == "ar")
        per_token = sum(row[0] for row in cal["seconds"]) + (point["setting"]["stages"] + 1) * 0.002
        assert ar["seconds"] >= (ar["new_tokens"] - 1) * per_token
    check = results["points"][0]["check"]
    assert set(check) == set(STRATEGIES)
    for row in check.values():
        assert row["real_tokens_per_s"] > 0
        assert row["error"] == pytest.approx(row["simulated_tokens_per_s"] / row["real_tokens_per_s"] - 1)
    report = (out / "results.md").read_text()
    assert "SIMULATED" in report and "Simulation against real runs" in report


def test_in_process_bench_runs_one_device_and_says_so(bench, tmp_path):
    results, out = one_prompt_bench(bench, tmp_path / "inproc", "--stages", "1", "--strategies", "ar,flowspec",
                                    "--peers", "hf", "--in-process")
    assert results["meta"]["placement"]["stage_threads"] == {"1": "in-process"}
    assert len({r["output_sha1"] for r in results["runs"]}) == 1  # fp32 greedy: both strategies equal the hf peer
    flowspec = next(r for r in results["runs"] if r["name"] == "flowspec")
    assert flowspec["ring_slots"] == 1  # one process computes the stage and verifies in turn: nothing to overlap
    assert "stage(s) in the coordinator's process" in (out / "results.md").read_text()
