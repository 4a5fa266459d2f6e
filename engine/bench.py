"""`flowspec bench`: the strategies and their peers on the same prompts, interleaved, with medians.

Terms:
- *point*: one setting of the swept knobs (stages, link bandwidth, draft depth, prompt length);
  the first value of each sweep is the *base point*, the scenario the headline table reports.
- *contender*: a strategy (`ar`, `chunk`, `pipedec`, `flowspec`, run on the ring) or a *peer*
  (`hf`: Hugging Face greedy `generate` in one process; `hf-lookup`: its assisted generation with
  prompt lookup; `hf-draft`: its assisted generation with a draft model, when `--draft` names one).
- *run*: one contender on one prompt once. Runs are interleaved per prompt and repeat
  (A B C D P1 P2, A B C D P1 P2, ...) so that machine noise hits every contender alike.

`results.json` is a contract other tools read: `meta` (machine, versions, settings), `runs` (every
run's figures), `medians` (base point: `{contender: {tokens_per_s, mean_accepted_length, ttft_s,
...}}`) and `points` (each point's setting and medians). engine/bench_report.py writes
`results.md` and engine/bench_plots.py the PNG plots from the same dictionary.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from engine.config import STRATEGIES, ConfigError, LinkConfig, SamplingConfig, SessionConfig, SpeculationConfig
from engine.prompts import Prompt, load_prompts

logger = logging.getLogger(__name__)

PEERS = ("hf", "hf-lookup", "hf-draft")
PROMPT_LOOKUP_TOKENS = 10  # Hugging Face's documented default for prompt_lookup_num_tokens
MEDIAN_KEYS = ("tokens_per_s", "mean_accepted_length", "ttft_s", "tokens_per_turn", "ring_occupancy",
               "seconds", "new_tokens", "prompt_tokens", "coordinator_ms_per_turn", "draft_ms_per_turn")


@dataclass(frozen=True)
class Point:
    stages: int
    link_mbps: float | None
    link_latency_ms: float
    depth: int
    prompt_len: int | None  # None: the prompts as written

    @property
    def label(self) -> str:
        link = f"{self.link_mbps:g} Mbps/{self.link_latency_ms:g} ms" if self.link_mbps or self.link_latency_ms else "no link"
        size = f", prompt {self.prompt_len} tok" if self.prompt_len else ""
        return f"{self.stages} stage{'s' if self.stages > 1 else ''}, {link}, depth {self.depth}{size}"


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"
    draft: str | None = None
    lookup_branch: bool = True
    strategies: tuple[str, ...] = STRATEGIES
    peers: tuple[str, ...] = ("hf", "hf-lookup")
    stages: tuple[int, ...] = (4,)
    link_mbps: tuple[float | None, ...] = (None,)
    link_latency_ms: float = 0.0
    depths: tuple[int, ...] = (5,)
    prompt_lens: tuple[int | None, ...] = (None,)
    prompts: str = "quick"
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    dtype: str = "bf16"
    repeats: int = 1
    topk: int = 10
    tree_budget: int = 80
    segment_max: int = 16
    ring_slots: int | None = None  # None: the engine's default for the ring
    out: Path = Path("bench-results")
    command: str = ""
    simulate: bool = False  # dedicated devices and links, modelled (engine/bench_sim.py)
    peer_threads: int | None = None  # torch threads for the Hugging Face peers; None = every core
    in_process: bool = False  # stages as objects in the coordinator's process (one device, all its cores)

    def points(self) -> list[Point]:
        return [Point(s, m, self.link_latency_ms if (m or self.link_latency_ms) else 0.0, d, p)
                for s, m, d, p in itertools.product(self.stages, self.link_mbps, self.depths, self.prompt_lens)]

    def session_config(self, strategy: str, depth: int) -> SessionConfig:
        spec = SpeculationConfig(topk=self.topk, depth=depth, budget=self.tree_budget, segment_max=self.segment_max,
                                 ring_slots=self.ring_slots)
        return SessionConfig(strategy=strategy, max_new_tokens=self.max_new_tokens, speculation=spec,
                             sampling=SamplingConfig(self.temperature, None, self.seed))


def check_config(cfg: BenchConfig) -> None:
    """Every bad setting as one message that says what to change, before anything loads."""
    if cfg.simulate and not cfg.strategies:
        raise ConfigError("--simulate models the ring: give at least one strategy")
    unknown = [s for s in cfg.strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategies {', '.join(unknown)}: choose from {', '.join(STRATEGIES)}")
    unknown = [p for p in cfg.peers if p not in PEERS]
    if unknown:
        raise ConfigError(f"unknown peers {', '.join(unknown)}: choose from {', '.join(PEERS)}, or 'none'")
    if "hf-draft" in cfg.peers and not draft_model_ref(cfg.draft):
        raise ConfigError("peer hf-draft needs --draft naming a draft model (not lookup or head:PATH)")
    if not cfg.strategies and not cfg.peers:
        raise ConfigError("nothing to run: give --strategies or --peers")
    if any(s < 1 for s in cfg.stages):
        raise ConfigError(f"--stages values must be at least 1 (got {cfg.stages})")
    if any(m is not None and m <= 0 for m in cfg.link_mbps):
        raise ConfigError(f"--link-mbps values must be positive (got {cfg.link_mbps})")
    if any(d < 1 for d in cfg.depths):
        raise ConfigError(f"--depths values must be at least 1 (got {cfg.depths})")
    if any(p is not None and p < 8 for p in cfg.prompt_lens):
        raise ConfigError(f"--prompt-lengths values must be at least 8 tokens (got {cfg.prompt_lens})")
    for depth in cfg.depths:
        cfg.session_config("flowspec", depth)  # the tree and sampling settings, checked as the engine will
    if cfg.in_process and (cfg.simulate or any(m for m in cfg.link_mbps) or cfg.link_latency_ms):
        raise ConfigError("--in-process runs the stages in one process with no links: drop --simulate and the "
                          "--link-* options, or drop --in-process")
    if cfg.peer_threads is not None and cfg.peer_threads < 1:
        raise ConfigError(f"--peer-threads must be at least 1 (got {cfg.peer_threads})")
    if cfg.repeats < 1 or cfg.max_new_tokens < 1:
        raise ConfigError("--repeats and --max-new-tokens must be at least 1")
    if cfg.temperature < 0:
        raise ConfigError(f"--temperature must be 0 (greedy) or positive (got {cfg.temperature})")


def draft_model_ref(draft: str | None) -> str | None:
    """The draft model reference Hugging Face assisted generation can use, if `draft` is one."""
    if draft is None or draft == "lookup" or draft.startswith("head:"):
        return None
    return draft


# --- machine and versions


def machine_info(cfg: BenchConfig) -> dict:
    import numpy
    import torch
    import transformers

    from engine.ring_zmq import coordinator_threads, default_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        mem_gb = None
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"cpu": cpu, "cores": cores, "memory_gb": mem_gb, "platform": platform.platform(),
                    "hostname": platform.node()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": numpy.__version__,
                     "flowspec-studio": _package_version()},
        "settings": {"model": cfg.model, "draft": cfg.draft, "lookup_branch": cfg.lookup_branch,
                     "dtype": cfg.dtype, "temperature": cfg.temperature,
                     "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "prompts": cfg.prompts,
                     "repeats": cfg.repeats, "topk": cfg.topk, "tree_budget": cfg.tree_budget,
                     "segment_max": cfg.segment_max, "solo_segment": SpeculationConfig().solo_segment,
                     "ring_slots": cfg.ring_slots, "strategies": list(cfg.strategies), "peers": list(cfg.peers)},
        "link_emulation": {"mbps": list(cfg.link_mbps), "latency_ms_per_hop": cfg.link_latency_ms,
                           "note": "emulated by a sender thread per hop (bandwidth queue + fixed latency) on loopback"},
        "placement": {
            "coordinator_threads": {str(s): cores if cfg.in_process else coordinator_threads(s, default_threads(s))
                                    for s in cfg.stages},
            "stage_threads": {str(s): "in-process" if cfg.in_process else default_threads(s) for s in cfg.stages},
            "pinning": "none (the OS schedules the coordinator and every stage process on the same cores)",
            "peer_threads": cfg.peer_threads or cores,
        },
        "command": cfg.command,
    }


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("flowspec-studio")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "source"


def peak_rss_mb(pids: list[int]) -> list[float]:
    """Each process's peak resident memory (VmHWM) in MiB; 0.0 where it cannot be read."""
    out = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            out.append(round(kb / 1024, 1))
        except (OSError, StopIteration, ValueError):
            out.append(0.0)
    return out


# --- prompts


def prompt_content(prompt: Prompt):
    return prompt.text_or_messages if not prompt.is_chat else prompt.chat_messages()


def _plain_text(prompt: Prompt) -> str:
    if not prompt.is_chat:
        return prompt.text_or_messages
    return "\n".join(m.content for m in prompt.text_or_messages)


def sized_prompt_ids(engine, prompts: tuple[Prompt, ...], index: int, length: int) -> list[int]:
    """Prompt `index` asked after a context of the set's other texts, cut so the whole is ~`length` tokens."""
    question = _plain_text(prompts[index]).strip()
    others = [_plain_text(p) for j, p in enumerate(prompts) if j != index] or [question]
    context_ids: list[int] = []
    for text in itertools.cycle(others):
        context_ids += engine.tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(context_ids) > 2 * length:
            break

    def build(n: int) -> list[int]:
        context = engine.tokenizer.decode(context_ids[:n])
        return engine.encode(f"Notes:\n{context}\n\nWith these notes at hand: {question}")

    question_ids = engine.tokenizer(question, add_special_tokens=False)["input_ids"]
    while len(build(0)) > length and question:  # the question alone is too long: cut it
        excess = len(build(0)) - length
        question_ids = question_ids[: max(0, len(question_ids) - excess)]
        question = engine.tokenizer.decode(question_ids)
    n = max(0, length - len(build(0)))
    ids = build(n)
    while len(ids) > length and n > 0:  # re-tokenising may merge or split a few tokens
        n -= len(ids) - length
        ids = build(max(n, 0))
    return ids


# --- contenders


@dataclass
class Run:
    name: str
    kind: str  # "strategy" | "peer"
    point: dict
    prompt: int
    category: str
    repeat: int
    new_tokens: int
    prompt_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_s: float
    mean_accepted_length: float | None = None
    tokens_per_turn: float | None = None
    verifications: int | None = None
    rounds: int | None = None
    turns: int | None = None
    stage_busy: list[float] = field(default_factory=list)
    ring_slots: int | None = None
    ring_occupancy: float | None = None
    coordinator_ms_per_turn: float | None = None
    draft_ms_per_turn: float | None = None
    stage_threads: int | None = None  # torch threads per stage worker in this run (None: in-process)
    stopped_by: str = ""
    output_sha1: str = ""


def _sha1(ids: list[int]) -> str:
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:12]


def strategy_run(engine, cfg: BenchConfig, point: Point, name: str, ids: list[int], meta: dict) -> Run:
    r = engine.generate(ids, cfg.session_config(name, point.depth))
    n = len(r.token_ids)
    turns = max(r.turns, 1)
    return Run(name, "strategy", asdict(point), new_tokens=n, prompt_tokens=r.prompt_len, seconds=r.seconds,
               tokens_per_s=n / r.seconds if r.seconds else 0.0, ttft_s=r.ttft_s,
               mean_accepted_length=r.mean_accepted_length, tokens_per_turn=n / turns,
               verifications=r.verifications, rounds=r.rounds, turns=r.turns, stage_busy=list(r.stage_busy),
               ring_slots=r.ring_slots, ring_occupancy=r.in_flight,
               coordinator_ms_per_turn=1000 * r.coordinator_s / turns, draft_ms_per_turn=1000 * r.draft_s / turns,
               stage_threads=r.stage_threads or None,
               stopped_by=r.stopped_by, output_sha1=_sha1(r.token_ids), **meta)


class _FirstToken:
    """A `generate` streamer that notes when the first new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class Peers:
    """The Hugging Face peers, loaded once per bench, each generating in this one process."""

    def __init__(self, cfg: BenchConfig, model_dir: str, eos_ids: set[int]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from engine.stage import DTYPES

        self.cfg, self.eos_ids = cfg, eos_ids
        dtype = DTYPES[cfg.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.assistant = None
        if "hf-draft" in cfg.peers:
            from engine.models import resolve_model

            path = resolve_model(draft_model_ref(cfg.draft)).path
            self.assistant = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.torch = torch
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = cfg.peer_threads or cores

    def run(self, name: str, ids: list[int], point: Point, meta: dict) -> Run:
        torch = self.torch
        kwargs: dict = {}
        if name == "hf-lookup":
            kwargs["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
        elif name == "hf-draft":
            kwargs["assistant_model"] = self.assistant
        if self.cfg.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.cfg.temperature, top_k=0, top_p=1.0)
            torch.manual_seed(self.cfg.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        streamer = _FirstToken()
        eos = sorted(self.eos_ids)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # one process, no pipeline: every core is the peer's
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          max_new_tokens=self.cfg.max_new_tokens, eos_token_id=eos or None,
                                          pad_token_id=eos[0] if eos else 0, streamer=streamer, **kwargs)
                seconds = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
        new = out[0, len(ids):].tolist()
        if eos and new and new[-1] in self.eos_ids:
            stopped = "eos"
        else:
            stopped = "max_new_tokens"
        ttft = (streamer.at - t0) if streamer.at is not None else seconds
        return Run(name, "peer", asdict(point), new_tokens=len(new), prompt_tokens=len(ids), seconds=seconds,
                   tokens_per_s=len(new) / seconds if seconds else 0.0, ttft_s=ttft,
                   mean_accepted_length=1.0 if name == "hf" else None, stopped_by=stopped,
                   output_sha1=_sha1(new), **meta)


# --- aggregation


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def medians(runs: list[dict]) -> dict[str, dict]:
    """{contender: median figures} over the given runs (one point); speedups are ratios of medians."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        row = {k: _median([r.get(k) for r in mine]) for k in MEDIAN_KEYS}
        busy = [r["stage_busy"] for r in mine if r.get("stage_busy")]
        row["stage_busy"] = [float(statistics.median(col)) for col in zip(*busy)] if busy else []
        row["ring_slots"] = mine[0].get("ring_slots")
        row["stage_threads"] = mine[0].get("stage_threads")
        row["kind"] = mine[0]["kind"]
        row["runs"] = len(mine)
        total_s = sum(r["seconds"] for r in mine)
        row["tokens_per_s_total"] = sum(r["new_tokens"] for r in mine) / total_s if total_s else 0.0
        row["by_category"] = {c: _median([r["tokens_per_s"] for r in mine if r["category"] == c])
                              for c in dict.fromkeys(r["category"] for r in mine)}
        out[name] = row
    for base in ("chunk", "hf"):
        if base in out and out[base]["tokens_per_s"]:
            for row in out.values():
                row[f"speedup_vs_{base}"] = (row["tokens_per_s"] or 0.0) / out[base]["tokens_per_s"]
    return out


# --- the run


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None, bar: bool = True) -> dict:
    """Run every point, write results.json, results.md and the plots to cfg.out; return the results."""
    from engine.session import Engine, EngineSpec

    check_config(cfg)
    say = progress or (lambda text: print(text, file=sys.stderr))
    prompts = load_prompts(cfg.prompts)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "runs.jsonl").write_text("")
    points = cfg.points()
    base = points[0]
    results: dict = {"meta": machine_info(cfg), "runs": [], "points": [], "medians": {}}
    results["meta"]["simulated"] = cfg.simulate
    peers_at_base = 0 if cfg.simulate else len(cfg.peers)
    n_runs = sum(len(prompts) * cfg.repeats * (len(cfg.strategies) + (peers_at_base if p == base else 0))
                 for p in points)
    from tqdm import tqdm

    pbar = tqdm(total=n_runs, desc="bench", unit="run", disable=not bar, file=sys.stderr, dynamic_ncols=True)
    peers: Peers | None = None
    engine = None
    engine_key = None
    try:
        for point in points:
            key = (point.stages, point.link_mbps, point.link_latency_ms)
            if key != engine_key:
                if engine is not None:
                    engine.close()
                say(f"starting {point.label}" + (" (simulated devices)" if cfg.simulate else ""))
                spec = EngineSpec(model=cfg.model, n_stages=point.stages, dtype=cfg.dtype, draft=cfg.draft,
                                  lookup_branch=cfg.lookup_branch,
                                  link=LinkConfig(point.link_mbps, point.link_latency_ms),
                                  in_process=cfg.simulate or cfg.in_process)
                engine, engine_key = Engine(spec, on_progress=lambda m: logger.info("%s", m)), key
                if cfg.simulate:
                    calibration = _simulated_ring(engine, spec.link, say)
                results["meta"].setdefault("drafter", engine.drafter.name)
            if point == base and cfg.peers and peers is None and not cfg.simulate:
                say("loading the Hugging Face peers")
                peers = Peers(cfg, engine.resolved.path, engine.eos_ids)
            runs_here = _run_point(cfg, engine, peers if point == base else None, point, prompts, pbar,
                                   cfg.out / "runs.jsonl")
            results["runs"] += runs_here
            entry = {"setting": asdict(point), "label": point.label, "simulated": cfg.simulate,
                     "stage_peak_rss_mb": peak_rss_mb(getattr(engine.ring, "pids", [])),
                     "layers": [list(b) for b in engine.bounds], "medians": medians(runs_here)}
            if cfg.simulate:
                entry["calibration"] = calibration.as_dict()
                if point.stages == 1:  # the one setting this machine can also run for real: the model's error
                    entry["check"] = _check_against_real(cfg, point, prompts, entry["medians"], say)
            results["points"].append(entry)
    finally:
        pbar.close()
        if engine is not None:
            engine.close()
    results["medians"] = results["points"][0]["medians"]
    write_results(results, cfg.out)
    return results


def _simulated_ring(engine, link: LinkConfig, say: Callable[[str], None]):
    """Swap the engine's in-process ring for a SimRing calibrated on its own stages."""
    from engine.bench_sim import SimRing, calibrate

    import torch

    from engine.ring_zmq import default_threads

    # As many threads as a one-stage worker gets here (one core stays with the coordinator): more
    # OpenMP threads than free cores spin against each other and would inflate every figure.
    torch.set_num_threads(default_threads(1))
    say(f"calibrating {len(engine.bounds)} stage(s) with {torch.get_num_threads()} thread(s): forward time per segment size")
    workers = engine.ring.workers
    calibration = calibrate(workers, engine.config.hidden_size)
    engine.ring = SimRing(workers, calibration, link)
    return calibration


def _check_against_real(cfg: BenchConfig, point: Point, prompts, simulated: dict, say) -> dict:
    """Run the point for real (worker processes) and compare tokens/s medians with the simulation."""
    from engine.session import Engine, EngineSpec

    say(f"checking the simulation against real runs: {point.label}")
    spec = EngineSpec(model=cfg.model, n_stages=point.stages, dtype=cfg.dtype, draft=cfg.draft,
                      lookup_branch=cfg.lookup_branch,
                      link=LinkConfig(point.link_mbps, point.link_latency_ms))
    with Engine(spec, on_progress=lambda m: logger.info("%s", m)) as engine:
        from tqdm import tqdm

        with tqdm(total=len(prompts) * cfg.repeats * len(cfg.strategies), desc="real", unit="run",
                  disable=True) as pbar:
            real = medians(_run_point(cfg, engine, None, point, prompts, pbar))
    out = {}
    for name, row in simulated.items():
        if name in real and real[name]["tokens_per_s"]:
            out[name] = {"simulated_tokens_per_s": row["tokens_per_s"], "real_tokens_per_s": real[name]["tokens_per_s"],
                         "error": row["tokens_per_s"] / real[name]["tokens_per_s"] - 1.0}
    return out


def _run_point(cfg: BenchConfig, engine, peers: Peers | None, point: Point, prompts, pbar,
               log: Path | None = None) -> list[dict]:
    runs: list[dict] = []
    names = list(cfg.strategies) + (list(cfg.peers) if peers is not None else [])
    for i, prompt in enumerate(prompts):
        if point.prompt_len:
            ids = sized_prompt_ids(engine, prompts, i, point.prompt_len)
        else:
            ids = engine.encode(prompt_content(prompt), raw=prompt.raw)
        engine.check_fits(ids, cfg.max_new_tokens)
        for repeat in range(cfg.repeats):
            for name in names:  # interleaved: every contender once before any runs again
                pbar.set_postfix_str(f"{point.label} | prompt {i + 1}/{len(prompts)} | {name}", refresh=True)
                meta = dict(prompt=i, category=prompt.category, repeat=repeat)
                if name in STRATEGIES:
                    run = strategy_run(engine, cfg, point, name, ids, meta)
                else:
                    run = peers.run(name, ids, point, meta)
                runs.append(asdict(run))
                if log is not None:  # every run as it finishes, so a long bench can be followed and is not lost
                    with log.open("a") as f:
                        f.write(json.dumps(runs[-1]) + "\n")
                pbar.update(1)
    return runs


def write_results(results: dict, out: Path) -> None:
    from engine.bench_plots import write_plots
    from engine.bench_report import write_report

    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = write_plots(results, out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    write_report(results, out)


def parse_list(text: str, cast, name: str) -> tuple:
    try:
        return tuple(cast(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} takes comma-separated numbers, e.g. 1,2,4 (got {text!r})") from None


def config_from_args(args) -> BenchConfig:
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    peers_text = args.peers if args.peers is not None else ("hf,hf-lookup" + (",hf-draft" if draft_model_ref(args.draft) else ""))
    peers = () if peers_text.strip() in ("", "none") else tuple(p.strip() for p in peers_text.split(",") if p.strip())
    mbps = parse_list(args.link_mbps, float, "--link-mbps") if args.link_mbps else (None,)
    lens = parse_list(args.prompt_lengths, int, "--prompt-lengths") if args.prompt_lengths else (None,)
    cfg = BenchConfig(model=args.model, draft=args.draft, lookup_branch=args.lookup_branch,
                      strategies=strategies, peers=peers,
                      stages=parse_list(args.stages, int, "--stages"), link_mbps=mbps,
                      link_latency_ms=args.link_latency_ms, depths=parse_list(args.depths, int, "--depths"),
                      prompt_lens=lens, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, seed=args.seed, dtype=args.dtype, repeats=args.repeats,
                      topk=args.topk, tree_budget=args.tree_budget, segment_max=args.segment_max,
                      ring_slots=args.ring_slots, out=Path(args.out),
                      command="flowspec " + " ".join(getattr(args, "argv", sys.argv[1:])),
                      simulate=args.simulate, peer_threads=args.peer_threads, in_process=args.in_process)
    check_config(cfg)
    return replace(cfg)
