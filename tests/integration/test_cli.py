"""The `flowspec` CLI on tiny model directories, in-process (`engine.cli.main`) and once as `python -m engine.cli`.

Every user error exits with code 2 and one line on stderr that names the problem.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from engine.cli import main
from tests.integration.engine_kit import single_thread  # noqa: F401  (fixture)
from tests.tiny_models import make_tiny_llama_dir, write_fake_hf_cache

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]

N_LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-models")
    target = make_tiny_llama_dir(root, n_layers=N_LAYERS)
    other_vocab = make_tiny_llama_dir(root, n_layers=1, vocab=384, name="other-vocab")
    short = make_tiny_llama_dir(root, n_layers=1, name="short-context")
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 32
    (short / "config.json").write_text(json.dumps(config))
    return {"target": target, "other_vocab": other_vocab, "short": short, "root": root}


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Model listing and resolution must not see (or fill) this machine's caches."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _generate_json(capsys, model_dir, *extra: str) -> dict:
    code = main(["generate", "--model", str(model_dir), "--in-process", "--json", "--dtype", "fp32", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("strategy,stages", [("flowspec", 2), ("chunk", 1), ("ar", 2)])
def test_generate_json_fields_are_consistent(strategy, stages, models, capsys):
    report = _generate_json(capsys, models["target"], "--prompt", "hello world", "--max-new-tokens", "12",
                            "--strategy", strategy, "--stages", str(stages))
    tokenizer = AutoTokenizer.from_pretrained(models["target"])
    ids = report["token_ids"]
    assert report["new_tokens"] == len(ids) and 1 <= len(ids) <= 12
    assert len(ids) == 12 or report["stopped_by"] == "eos"
    assert report["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True)
    assert report["prompt_tokens"] == len(prompt if isinstance(prompt, list) else prompt["input_ids"])
    assert report["seconds"] > 0
    assert report["tokens_per_s"] == pytest.approx(len(ids) / report["seconds"], rel=1e-2)
    assert 0 < report["ttft_s"] <= report["seconds"]
    assert report["verifications"] >= 1 and report["rounds"] >= 1
    assert report["turns"] >= report["verifications"] + 1  # + the prefill's return
    # the first token comes from prefill; every verification accounts for the rest
    assert report["mean_accepted_length"] * report["verifications"] + 1 == pytest.approx(len(ids), abs=0.01)
    assert len(report["stage_busy"]) == stages and all(0 <= b <= 1 for b in report["stage_busy"])
    assert report["strategy"] == strategy and report["stages"] == stages and report["drafter"] == "lookup"
    assert report["layers"][0][0] == 0 and report["layers"][-1][1] == N_LAYERS


def test_no_lookup_branch_drafts_with_the_draft_model_alone(models, capsys):
    args = ["--prompt", "hello world hello world", "--max-new-tokens", "10", "--draft", str(models["target"])]
    both = _generate_json(capsys, models["target"], *args)
    alone = _generate_json(capsys, models["target"], *args, "--no-lookup-branch")
    assert both["drafter"] == "model+lookup" and alone["drafter"] == "model"
    assert both["token_ids"] == alone["token_ids"]


def test_generate_streams_text_and_reports_stats_on_stderr(models, capsys):
    code = main(["generate", "--model", str(models["target"]), "--in-process", "--dtype", "fp32", "--raw",
                 "--prompt", "The capital of France is", "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tokens in" in captured.err and "mean accepted length" in captured.err
    assert "error" not in captured.err


def test_check_passes_on_a_prompt_file(models, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Name three planets.", "category": "qa"}) + "\n"
        + json.dumps({"prompt": "The quick brown fox", "raw": True, "category": "continuation"}) + "\n"
    )
    code = main(["check", "--model", str(models["target"]), "--in-process", "--stages", "2",
                 "--prompts", str(prompts), "--max-new-tokens", "16"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert captured.out.count("ok    prompt") == 2 * 4  # 2 prompts x 4 strategies
    assert "8/8 identical" in captured.err


def test_models_lists_a_table(models, tmp_path, capsys):
    write_fake_hf_cache(tmp_path / "hf-cache", "tiny-org/tiny-llama", models["target"])
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["reference", "arch", "layers"]
    row = next(line for line in lines if line.startswith("tiny-org/tiny-llama"))
    assert row.split()[1:4] == ["llama", str(N_LAYERS), "64"] and row.endswith("ready")


# --- user errors: exit code 2 and one line naming the problem


def _layout(tmp_path, name: str, ranges: list[tuple[int, int]]) -> str:
    stages = "".join(f'[[stage]]\ndevice = "local"\nlayers = [{a}, {b}]\n' for a, b in ranges)
    path = tmp_path / f"{name}.toml"
    path.write_text(f"n_layers = {N_LAYERS}\n{stages}")
    return str(path)


BAD_INPUTS = {
    # name: (argument builder, words the message must contain)
    "unknown model": (lambda m, t: ["--model", str(t / "no-such-model")], ["Unknown model reference", "no-such-model"]),
    "layout with a gap": (lambda m, t: ["--layout", _layout(t, "gap", [(0, 2), (3, 4)])],
                          ["gap.toml", "Layer 2 is not assigned to any stage"]),
    "layout with an overlap": (lambda m, t: ["--layout", _layout(t, "overlap", [(0, 3), (2, 4)])],
                               ["overlap.toml", "Layer 2 is in both stage 1 and stage 2"]),
    "more stages than layers": (lambda m, t: ["--stages", "5"], ["5 stages", "4 layers"]),
    "prompt longer than the context": (
        lambda m, t: ["--model", str(m["short"]), "--raw", "--prompt", "hello world " * 20],
        ["prompt is", "context is 32"],
    ),
    "no new tokens": (lambda m, t: ["--max-new-tokens", "0"], ["max_new_tokens", "at least 1"]),
    "negative temperature": (lambda m, t: ["--temperature", "-0.5"], ["temperature", "-0.5"]),
    "no ring slots": (lambda m, t: ["--ring-slots", "0"], ["ring_slots", "at least 1", "got 0"]),
    "draft vocabulary differs": (lambda m, t: ["--draft", str(m["other_vocab"])], ["vocabulary 384", "320"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, models, tmp_path, capsys):
    build, words = BAD_INPUTS[case]
    argv = ["generate", "--model", str(models["target"]), "--in-process", "--dtype", "fp32", "--prompt", "hi",
            "--max-new-tokens", "4", *build(models, tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    assert "Traceback" not in err
    for word in words:
        assert word in errors[0]


def test_module_entry_point_exits_2(models):
    """`python -m engine.cli` propagates the exit code (a fresh interpreter, so nothing is preloaded)."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "generate", "--model", str(models["target"]), "--prompt", "hi",
         "--max-new-tokens", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: max_new_tokens must be at least 1 (got 0)"
