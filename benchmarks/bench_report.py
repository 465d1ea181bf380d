"""Aggregation, tables and plots of ``grpo_vs_trl.py`` results."""

from __future__ import annotations

import statistics

from bench_common import PHASES

RATIO_KEYS = (
    "s_per_step", "tokens_per_s", "completion_tokens_per_s", "tokens_per_step", "completion_tokens_per_step", "peak_rss_mib",
    "rss_at_first_step_mib", "cpu_s_per_step", "tokens_per_cpu_s", "first_step_s",
)


def aggregate(runs: list[dict]) -> dict:
    """Medians over a system's runs; a system whose every run hit the memory cap is reported as out of memory."""
    done = [r for r in runs if not r.get("out_of_memory")]
    if not done:
        return {"out_of_memory": True, "cap_gib": runs[0]["cap_gib"], "runs": runs}
    keys = (
        "s_per_step", "tokens_per_s", "completion_tokens_per_s", "tokens_per_step", "completion_tokens_per_step", "first_step_s",
        "cpu_s_per_step", "tokens_per_cpu_s",
    )
    out = {k: statistics.median(r[k] for r in done) for k in keys}
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in done)
    out["rss_at_first_step_mib"] = statistics.median(r["rss_at_first_step_mib"] for r in done)
    out["phases_s"] = {p: statistics.median(r["phases_s"][p] for r in done) for p in PHASES}
    out["phases_cpu_s"] = {p: statistics.median(r["phases_cpu_s"][p] for r in done) for p in PHASES}
    if "peak_cuda_mib" in done[0]:
        out["peak_cuda_mib"] = max(r["peak_cuda_mib"] for r in done)
    out["out_of_memory_runs"] = len(runs) - len(done)
    out["runs"] = runs
    return out


def ratios(ours: dict, trl: dict, ours_runs: list[dict], trl_runs: list[dict]) -> dict:
    """ours / TRL of the medians, and each pair's own ratio (robust to slow drifts in machine load)."""
    if ours.get("out_of_memory") or trl.get("out_of_memory"):
        return {}
    out = {k: ours[k] / trl[k] for k in RATIO_KEYS}
    if "peak_cuda_mib" in ours:
        out["peak_cuda_mib"] = ours["peak_cuda_mib"] / trl["peak_cuda_mib"]
    pairs = [(o, t) for o, t in zip(ours_runs, trl_runs) if not (o.get("out_of_memory") or t.get("out_of_memory"))]
    for key in ("tokens_per_s", "completion_tokens_per_s", "tokens_per_cpu_s", "peak_rss_mib"):
        out[f"{key}_paired"] = [o[key] / t[key] for o, t in pairs]
        out[f"{key}_paired_median"] = statistics.median(out[f"{key}_paired"]) if pairs else None
    return out


def table(result: dict) -> str:
    ours, trl, r = result["ours"], result["trl"], result["ratios"]
    if not r:
        return "\n".join(f"{s}: {oom_text(result[s])}" for s in ("ours", "trl") if result[s].get("out_of_memory"))
    rows = [
        ("s / step (median)", "s_per_step", "{:.3f}"),
        ("tokens / s (prompt+completion)", "tokens_per_s", "{:,.0f}"),
        ("completion tokens / s", "completion_tokens_per_s", "{:,.1f}"),
        ("tokens / step", "tokens_per_step", "{:,.0f}"),
        ("completion tokens / step", "completion_tokens_per_step", "{:,.0f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:,.0f}"),
        ("CPU s / step (median)", "cpu_s_per_step", "{:.3f}"),
        ("tokens / CPU-s", "tokens_per_cpu_s", "{:,.0f}"),
        ("first step (s, warm-up)", "first_step_s", "{:.1f}"),
    ]
    if "peak_cuda_mib" in ours:
        rows.append(("peak CUDA allocated (MiB)", "peak_cuda_mib", "{:,.0f}"))
    lines = [f"{'':32s}{'ours':>14s}{'TRL':>14s}{'ours/TRL':>10s}", "-" * 70]
    for label, key, fmt in rows:
        lines.append(f"{label:32s}{fmt.format(ours[key]):>14s}{fmt.format(trl[key]):>14s}{r[key]:>10.2f}")
    rows_per_step = result["config"]["prompts"] * result["config"]["num_generations"]
    lines.append(
        f"{'mean completion length':32s}{ours['completion_tokens_per_step'] / rows_per_step:>14.1f}"
        f"{trl['completion_tokens_per_step'] / rows_per_step:>14.1f}"
    )
    paired = ", ".join(f"{x:.2f}" for x in r["completion_tokens_per_s_paired"])
    lines.append(f"completion tokens/s, each pair's ratio: {paired} (median {r['completion_tokens_per_s_paired_median']:.2f})")
    gen = result.get("generation")
    if gen:
        lines.append("-" * 70)
        lines.append(
            f"{'generation tokens / s':32s}{gen['ours_tokens_per_s']:>14,.0f}{gen['generate_tokens_per_s']:>14,.0f}{gen['ratio']:>10.2f}"
            "   (TRL column: plain model.generate)"
        )
    lines += ["", phase_table(result)]
    return "\n".join(lines)


def phase_table(result: dict) -> str:
    """Median wall-clock and CPU seconds per phase of a measured step, both systems."""
    ours, trl = result["ours"], result["trl"]
    lines = [f"{'phase (median per step)':24s}{'ours s':>10s}{'TRL s':>10s}{'ours CPU-s':>12s}{'TRL CPU-s':>12s}", "-" * 68]
    for phase in PHASES:
        cells = [
            "" if s.get("out_of_memory") else f"{s[key][phase]:.3f}" for key in ("phases_s", "phases_cpu_s") for s in (ours, trl)
        ]
        lines.append(f"{phase:24s}{cells[0]:>10s}{cells[1]:>10s}{cells[2]:>12s}{cells[3]:>12s}")
    return "\n".join(lines)


def oom_text(system: dict) -> str:
    return f"out of memory at {system['cap_gib']:.0f} GiB"


def lengths_table(sweep: list[dict]) -> str:
    """One row per completion length: s/step, completion tokens/s and peak RSS of both systems, and the ratios."""
    head = f"{'length':>7s} {'s/step ours':>12s} {'TRL':>12s} {'tok/s ours':>11s} {'TRL':>9s} {'ratio':>6s} {'RSS ours':>9s} {'TRL':>22s} {'ratio':>6s}"
    lines = [head, "-" * len(head)]
    for point in sweep:
        ours, trl = point["ours"], point["trl"]

        def cell(system: dict, key: str, fmt: str) -> str:
            return "OOM" if system.get("out_of_memory") else fmt.format(system[key])

        trl_rss = oom_text(trl) if trl.get("out_of_memory") else f"{trl['peak_rss_mib']:,.0f}"
        ratio = point["ratios"]
        speed = f"{ratio['completion_tokens_per_s']:.2f}" if ratio else "-"
        memory = f"{ratio['peak_rss_mib']:.2f}" if ratio else "-"
        lines.append(
            f"{point['length']:>7d} {cell(ours, 's_per_step', '{:.2f}'):>12s} {cell(trl, 's_per_step', '{:.2f}'):>12s} "
            f"{cell(ours, 'completion_tokens_per_s', '{:,.1f}'):>11s} {cell(trl, 'completion_tokens_per_s', '{:,.1f}'):>9s} "
            f"{speed:>6s} {cell(ours, 'peak_rss_mib', '{:,.0f}'):>9s} "
            f"{trl_rss:>22s} {memory:>6s}"
        )
    return "\n".join(lines)


def plot_lengths(sweep: list[dict], title: str, path: str) -> None:
    """Seconds per step and peak RSS against completion length, log-log, both systems (TRL's OOM points marked at the cap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for system, style in (("ours", "o-"), ("trl", "s--")):
        label = "r1-lightning" if system == "ours" else "TRL 1.16"
        done = [p for p in sweep if not p[system].get("out_of_memory")]
        oom = [p for p in sweep if p[system].get("out_of_memory")]
        axes[0].plot([p["length"] for p in done], [p[system]["s_per_step"] for p in done], style, label=label)
        axes[1].plot([p["length"] for p in done], [p[system]["peak_rss_mib"] / 1024 for p in done], style, label=label)
        if oom:
            axes[1].plot([p["length"] for p in oom], [p[system]["cap_gib"] for p in oom], "rx", markersize=10,
                         label=f"{label}: out of memory (cap)")
    for ax, ylabel in zip(axes, ("seconds per step", "peak RSS (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("completion length (tokens, forced)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
