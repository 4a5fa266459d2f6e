"""PNG plots for `flowspec bench` (matplotlib, Agg backend: no display needed).

- speed_by_strategy.png: median tokens/s of every contender at the base point, by prompt category;
- bandwidth_sweep.png: tokens/s against link bandwidth, when several --link-mbps values were run;
- stage_sweep.png / prompt_length_sweep.png: tokens/s and TTFT against stages / prompt length;
- acceptance_by_depth.png: mean accepted length against draft depth, when several depths were run.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _points_varying(results: dict, field: str) -> list[dict]:
    base = results["points"][0]["setting"]
    others = {k: v for k, v in base.items() if k != field}
    chosen = [p for p in results["points"] if {k: v for k, v in p["setting"].items() if k != field} == others]
    return chosen if len({str(p["setting"][field]) for p in chosen}) > 1 else []


def _strategies(points: list[dict]) -> list[str]:
    return list(dict.fromkeys(n for p in points for n, row in p["medians"].items() if row["kind"] == "strategy"))


def speed_by_strategy(results: dict, out: Path) -> Path:
    plt = _pyplot()
    meds = results["medians"]
    names = list(meds)
    cats = list(dict.fromkeys(c for row in meds.values() for c in row["by_category"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) * max(1, len(names)) / 3), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [meds[name]["by_category"].get(c) or 0.0 for c in cats]
        ax.bar([j + i * width for j in range(len(cats))], values, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(cats))], cats)
    ax.set_ylabel("tokens/s (median)")
    sim = " (simulated)" if results["meta"].get("simulated") else ""
    ax.set_title(f"Speed by prompt category{sim}: {results['points'][0]['label']}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "speed_by_strategy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _sweep(results: dict, out: Path, field: str, xlabel: str, filename: str, metrics: tuple[str, ...]) -> Path | None:
    points = _points_varying(results, field)
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    xs = [p["setting"][field] or 0 for p in points]
    for ax, metric in zip(axes[0], metrics):
        for name in _strategies(points):
            ax.plot(xs, [p["medians"].get(name, {}).get(metric) or 0.0 for p in points], marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel({"tokens_per_s": "tokens/s (median)", "ttft_s": "TTFT (s, median)",
                       "mean_accepted_length": "mean accepted length"}[metric])
        if field == "link_mbps":
            ax.set_xscale("log")
        ax.legend(fontsize="small")
    where = ("simulated dedicated devices" if results["meta"].get("simulated")
             else f"{results['meta']['machine']['cores']}-core machine")
    fig.suptitle(f"{xlabel} sweep ({where})")
    fig.tight_layout()
    path = out / filename
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: dict, out: Path) -> list[str]:
    paths = [speed_by_strategy(results, out),
             _sweep(results, out, "link_mbps", "link bandwidth (Mbit/s, emulated)", "bandwidth_sweep.png",
                    ("tokens_per_s",)),
             _sweep(results, out, "stages", "stages", "stage_sweep.png", ("tokens_per_s", "ttft_s")),
             _sweep(results, out, "prompt_len", "prompt length (tokens)", "prompt_length_sweep.png",
                    ("tokens_per_s", "ttft_s")),
             _sweep(results, out, "depth", "draft depth", "acceptance_by_depth.png",
                    ("mean_accepted_length", "tokens_per_s"))]
    return [p.name for p in paths if p is not None]
