"""results.md for `flowspec bench`: the headline table, per-category speeds, the sweeps and the notes
that say how the machine differs from the paper's testbed. Reads only the results dictionary."""

from __future__ import annotations

from pathlib import Path


def _f(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def _busy(row: dict) -> str:
    return " / ".join(f"{b:.0%}" for b in row.get("stage_busy") or []) or "–"


def _occupancy(row: dict) -> str:
    if row.get("ring_occupancy") is None or not row.get("ring_slots"):
        return "–"
    return f"{row['ring_occupancy']:.1f} of {row['ring_slots']}"


def headline_table(meds: dict) -> list[str]:
    lines = ["| contender | tokens/s | speedup over chunk | speedup over HF generate | mean accepted length | "
             "tokens per turn | stage busy | ring occupancy | TTFT (s) | coordinator ms/turn |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for name, row in meds.items():
        lines.append(
            f"| {name} | {_f(row['tokens_per_s'])} | {_f(row.get('speedup_vs_chunk'), 2, 'x')} | "
            f"{_f(row.get('speedup_vs_hf'), 2, 'x')} | {_f(row['mean_accepted_length'])} | "
            f"{_f(row['tokens_per_turn'])} | {_busy(row)} | {_occupancy(row)} | {_f(row['ttft_s'], 3)} | "
            f"{_f(row['coordinator_ms_per_turn'], 1)} |")
    return lines


def category_table(meds: dict) -> list[str]:
    cats = list(dict.fromkeys(c for row in meds.values() for c in row["by_category"]))
    lines = ["| contender | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
    for name, row in meds.items():
        lines.append(f"| {name} | " + " | ".join(_f(row["by_category"].get(c)) for c in cats) + " |")
    return lines


def sweep_table(results: dict, field: str, title: str) -> list[str]:
    """One row per point that differs from the base point only in `field`."""
    points = results["points"]
    base = points[0]["setting"]
    others = {k: v for k, v in base.items() if k != field}
    chosen = [p for p in points if {k: v for k, v in p["setting"].items() if k != field} == others]
    if len(chosen) < 2:
        return []
    names = list(dict.fromkeys(n for p in chosen for n in p["medians"] if p["medians"][n]["kind"] == "strategy"))
    lines = [f"### {title}", "", f"| {field} | " + " | ".join(f"{n} tok/s" for n in names)
             + " | " + " | ".join(f"{n} TTFT (s)" for n in names) + " | peak memory per stage (MiB) |",
             "|---|" + "---:|" * (2 * len(names)) + "---|"]
    for p in chosen:
        m = p["medians"]
        value = p["setting"][field]
        lines.append(f"| {value if value is not None else 'none'} | "
                     + " | ".join(_f(m.get(n, {}).get("tokens_per_s")) for n in names) + " | "
                     + " | ".join(_f(m.get(n, {}).get("ttft_s"), 3) for n in names) + " | "
                     + (", ".join(f"{x:.0f}" for x in p.get("stage_peak_rss_mb", [])) or "–") + " |")
    return lines + [""]


def shape_notes(results: dict) -> list[str]:
    """What limits the scaling on this machine, read off the measurements."""
    meta = results["meta"]
    cores = meta["machine"]["cores"]
    notes = []
    stage_points = sorted({p["setting"]["stages"] for p in results["points"]})
    if len(stage_points) > 1:
        most = stage_points[-1]
        notes.append(
            f"- Stages: the {most}-stage ring runs {most} stage processes and the coordinator on {cores} cores, so "
            f"at most {cores} of them compute at once; more stages add hops (latency and serialisation per hop) and "
            f"scheduler switches without adding compute. On dedicated devices, more stages would each hold fewer "
            f"layers; here the total work per token stays the same and the per-hop costs grow, so tokens/s falls.")
    len_points = sorted({p["setting"]["prompt_len"] or 0 for p in results["points"]})
    if len(len_points) > 1:
        notes.append(
            "- Prompt length: tokens/s counts the whole request, prefill included, so it falls mostly because TTFT "
            "grows with the prompt (prefill goes through the ring in chunks of 64 tokens); decode speed alone changes "
            "less (each run's `seconds` and `ttft_s` are in results.json).")
    mbps_points = sorted({p["setting"]["link_mbps"] or 0 for p in results["points"]})
    if len(mbps_points) > 1:
        notes.append(
            "- Bandwidth: segments of hidden states (T x hidden x 2 bytes in bf16) cross every hop; at low bandwidth "
            "the large flowspec/chunk segments cost more transfer time than ar's single tokens.")
    return notes


def _stage_threads_line(medians: dict, cores: int) -> list[str]:
    """Each strategy's torch threads per stage worker: a request with one segment in flight has the
    stages compute one at a time, so each then takes every core (engine.ring_zmq.stage_threads)."""
    used = {name: row["stage_threads"] for name, row in medians.items() if row.get("stage_threads")}
    if not used:
        return []
    return [f"- Threads per stage worker, set for each request: " + ", ".join(f"{n} {t}" for n, t in used.items())
            + f" (all {cores} cores while one segment is in flight and the stages compute one at a time; the "
            "start-up share when several compute at once)."]


def write_report(results: dict, out: Path) -> Path:
    meta = results["meta"]
    machine, settings, place = meta["machine"], meta["settings"], meta["placement"]
    link = meta["link_emulation"]
    base = results["points"][0]
    simulated = bool(meta.get("simulated"))
    lines = [
        "# flowspec bench results" + (" (SIMULATED)" if simulated else ""),
        "",
        *([f"**Simulated**: every figure below comes from a discrete-event model of one dedicated device per stage "
           "and emulated links (engine/bench_sim.py), with stage forward times calibrated on this machine and the "
           "coordinator's own work timed for real. They are predictions, not measurements.", ""] if simulated else []),
        f"Measured {meta['date_utc']} UTC on {machine['cpu']} ({machine['cores']} cores, {machine['memory_gb']} GB), "
        f"{machine['platform']}.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Model {settings['model']}, drafter {meta.get('drafter', settings['draft'])}, dtype {settings['dtype']}, "
        f"temperature {settings['temperature']}, {settings['max_new_tokens']} new tokens at most, prompts "
        f"`{settings['prompts']}`, {settings['repeats']} repeat(s), tree top-k {settings['topk']} / budget "
        f"{settings['tree_budget']}.",
        f"- Link: emulated, {', '.join('none' if m is None else f'{m:g} Mbps' for m in link['mbps'])}, "
        f"{link['latency_ms_per_hop']:g} ms per hop ({link['note']}).",
        f"- Placement: " + "; ".join(
            f"{s} stage(s) in the coordinator's process with {place['coordinator_threads'][s]} torch thread(s)"
            if t == "in-process" else
            f"{s} stage(s): {t} torch thread(s) per stage process at start-up, {place['coordinator_threads'][s]} for the "
            f"coordinator" for s, t in place["stage_threads"].items()) + "; "
        f"pinning {place['pinning']}. Hugging Face peers run in the coordinator's process with {place['peer_threads']} threads "
        "and no pipeline.",
        *_stage_threads_line(results["medians"], machine["cores"]),
        f"- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "- Runs are interleaved per prompt (every contender once, then the next repeat or prompt); figures are "
        "medians over runs, speedups are ratios of medians.",
        "",
        f"## {base['label']}" + (" (simulated)" if simulated else ""),
        "",
        *headline_table(results["medians"]),
        "",
        "Stage busy is the fraction of the run's wall time each stage spent computing; ring occupancy is the mean "
        "number of non-empty segments in flight when one came back, of the slots the strategy keeps.",
        "",
        "### Tokens/s by prompt category (medians)",
        "",
        *category_table(results["medians"]),
        "",
    ]
    checks = [(p["label"], p["check"]) for p in results["points"] if p.get("check")]
    if checks:
        lines += ["## Simulation against real runs", "",
                  "| setting | strategy | simulated tok/s | real tok/s | error |", "|---|---|---:|---:|---:|"]
        for label, check in checks:
            for name, row in check.items():
                lines.append(f"| {label} | {name} | {row['simulated_tokens_per_s']:.2f} | "
                             f"{row['real_tokens_per_s']:.2f} | {row['error']:+.0%} |")
        lines += ["", "The calibration table (seconds per forward, per stage and segment size) is in results.json "
                  "under `points[].calibration`.", ""]
    sweeps = [sweep_table(results, "stages", "Stage sweep"), sweep_table(results, "link_mbps", "Bandwidth sweep"),
              sweep_table(results, "prompt_len", "Prompt-length sweep"), sweep_table(results, "depth", "Draft depth sweep")]
    sweep_lines = [line for table in sweeps for line in table]
    if sweep_lines:
        lines += ["## Sweeps", "", *sweep_lines]
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]] + [""]
    lines += [
        "## How this machine differs from the paper's testbed",
        "",
        f"- The paper runs each stage on its own device. Here the coordinator and every stage process share "
        f"{machine['cores']} cores, so a stage computing delays the others: pipelining hides link latency but "
        "cannot overlap computation beyond the core count. Speedups of tree strategies over `ar` therefore come "
        "from fewer forwards per token more than from overlap, and `stage busy` fractions add up to at most the "
        "core count.",
        "- The LM head and the drafter run at the coordinator on the same cores as the stages; on the paper's "
        "testbed the coordinator is a device of its own.",
        "- `flowspec` keeps as many segments in flight as the stages can compute at once (the ring occupancy "
        "column shows the slots): stages + 1 with a device per stage, as in the paper, but fewer when they share "
        "cores, because a segment sent ahead is computed in full even when the verification before it prunes it "
        f"away; with one in flight, every segment holds up to {settings.get('solo_segment', 32)} nodes. "
        "`chunk` and `pipedec` keep stages + 1, "
        "which shapes their trees as the paper defines them. "
        "`--ring-slots N` sets the number.",
        *shape_notes(results),
        "",
    ]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path
