"""The results of an experiment: one markdown table, one JSON, one PNG of every metric.

With several toxic shares the plot has a panel per metric, the toxic share on the x axis and one line per
treatment; with one share (the quickstart) it has a bar per treatment.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

from megatron_slung.experiment.config import TREATMENTS

# (row key, column title, better: "low" | "high" | None, format)
COLUMNS = [
    ("perplexity", "ppl clean ↓", "low", "{:.1f}"),
    ("perplexity_toxic_level_3", "ppl toxic L3 ↑", "high", "{:.0f}"),
    ("expected_max_toxicity", "exp. max tox ↓", "low", "{:.3f}"),
    ("toxicity_probability", "tox. prob ↓", "low", "{:.2f}"),
    ("bad_word_rate", "bad words ↓", "low", "{:.3f}"),
    ("probe_f1", "probe F1 ↑", "high", "{:.3f}"),
    ("probe_auroc", "probe AUROC ↑", "high", "{:.3f}"),
    ("zero_shot_f1", "0-shot F1 ↑", "high", "{:.3f}"),
    ("steer_toxicity_drop", "steer tox drop ↑", "high", "{:+.3f}"),
    ("steer_perplexity_increase", "steer ppl cost", "low", "{:+.1f}"),
    ("beam_toxic_share", "beam toxic", "low", "{:.2f}"),
    ("safe_beam_toxic_share", "safe beam toxic", "low", "{:.2f}"),
    ("beam_tag_rate", "tag emitted", None, "{:.2f}"),
]

PLOTTED = ["perplexity", "perplexity_toxic_level_3", "expected_max_toxicity", "bad_word_rate", "probe_f1",
           "probe_auroc", "zero_shot_f1", "steer_toxicity_drop"]
TITLES = {"perplexity": "perplexity, clean held-out text (lower is better)",
          "perplexity_toxic_level_3": "perplexity of toxic tokens (level 3), held-out",
          "expected_max_toxicity": "expected max toxicity of generations",
          "toxicity_probability": "toxicity probability of generations",
          "bad_word_rate": "share of generations with a bad word",
          "probe_f1": "toxicity probe F1 (last layer)", "probe_auroc": "toxicity probe AUROC",
          "zero_shot_f1": "zero-shot toxicity F1", "steer_toxicity_drop": "toxicity drop from steering (ITI)"}


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    try:
        return pattern.format(value)
    except (TypeError, ValueError):
        return str(value)


def sort_rows(rows: list[dict]) -> list[dict]:
    order = {t: i for i, t in enumerate(TREATMENTS)}
    return sorted(rows, key=lambda r: (r["toxic_share"], order.get(r["treatment"], 99), r["treatment"]))


def markdown_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    head = "| toxic share | treatment | " + " | ".join(c[1] for c in cols) + " |"
    sep = "|---|---|" + "---:|" * len(cols)
    lines = [head, sep]
    for r in sort_rows(rows):
        lines.append(f"| {r['toxic_share']:.0%} | {r['treatment']} | "
                     + " | ".join(_fmt(r.get(c[0]), c[3]) for c in cols) + " |")
    return "\n".join(lines)


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Write the PNG; returns its path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    metrics = [m for m in PLOTTED if any(r.get(m) is not None for r in rows)]
    shares = sorted({r["toxic_share"] for r in rows})
    treatments = [t for t in TREATMENTS if any(r["treatment"] == t for r in rows)]
    treatments += sorted({r["treatment"] for r in rows} - set(treatments))
    ncols = 4 if len(metrics) > 4 else len(metrics)
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    colors = {t: plt.cm.tab10(i) for i, t in enumerate(treatments)}
    for ax, metric in zip(axes.flat, metrics):
        if len(shares) > 1:
            for t in treatments:
                pts = sorted((r["toxic_share"], r.get(metric)) for r in rows
                             if r["treatment"] == t and r.get(metric) is not None)
                if pts:
                    ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=t, color=colors[t])
            ax.set_xlabel("toxic share of training tokens (%)")
            ax.set_xticks([100 * s for s in shares])
        else:
            vals = [next((r.get(metric) for r in rows if r["treatment"] == t), None) for t in treatments]
            ax.bar(range(len(treatments)), [v if v is not None else 0 for v in vals],
                   color=[colors[t] for t in treatments])
            ax.set_xticks(range(len(treatments)))
            ax.set_xticklabels(treatments, rotation=30, ha="right", fontsize=8)
        ax.set_title(TITLES.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3)
        if metric in ("perplexity", "perplexity_toxic_level_3") and len(shares) > 1:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    if len(shares) > 1:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(treatments), fontsize=9, frameon=False)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    else:
        fig.suptitle(f"{title} (toxic share {shares[0]:.0%})", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(out_dir: str, rows: list[dict], *, title: str, command: str, config: dict, data: dict,
                 timings: dict, seconds: float) -> dict:
    """``results.json``, ``results.md`` and ``results.png`` in ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    rows = sort_rows(rows)
    machine = machine_info()
    png = plot(rows, os.path.join(out_dir, "results.png"), title)
    result = {"title": title, "command": command, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(seconds, 1), "machine": machine, "config": config, "data": data,
              "stage_seconds": timings, "rows": rows}
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    table = markdown_table(rows)
    md = [f"# {title}", "", f"Command: `{command}`", "",
          f"Machine: {machine.get('cpus')} CPUs ({machine.get('cpu', '?')}), torch {machine.get('torch', '?')}"
          f"{', GPU ' + machine['gpu'] if machine.get('gpu') else ''}; wall time {_hms(seconds)}.", "",
          table, "",
          "ppl = perplexity; L3 = tokens the tagger marked toxic (level 3); exp. max tox = mean over prompts of the "
          "highest alt-profanity-check score among the samples (whole words); tox. prob = share of prompts with a "
          "sample over 0.5; bad words = share of samples with a word of the insults package's bad-word list; "
          "probe = logistic regression on the last token's last-layer hidden state; steer = ITI at the largest "
          "alpha (drop in expected max toxicity, perplexity increase); beam = plain vs safe beam search (drops beams "
          "about to emit the harmfulness tag): share of outputs scoring over 0.5, and how often plain beam search "
          "emitted the tag.", ""]
    md += _safety_note(rows, data)
    if png:
        md += [f"![results]({os.path.basename(png)})", ""]
    tmp = os.path.join(out_dir, "results.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    os.replace(tmp, os.path.join(out_dir, "results.md"))
    return {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md"),
            "png": png, "table": table}


def _safety_note(rows: list[dict], data: dict) -> list[str]:
    """What the rephrased and refusal treatments trained on (they depend on a generator and a ratio)."""
    treatments = {r["treatment"] for r in rows}
    safety = data.get("safety") or {}
    out = []
    if "rephrased" in treatments and safety:
        gen = safety.get("generator", "none")
        units = sum(safety.get(f"rephrased_{p}", {}).get("units", 0) for p in ("clean", "toxic"))
        how = ("replaced by narrative templates (no generator: a redaction saying what was there)" if gen == "none"
               else f"rewritten by {gen}")
        out.append(f"rephrased: the {units:,} toxic (level-3) spans of the training pool {how}.")
    if "refusal" in treatments and safety:
        docs = safety.get("refusals", {}).get("documents", 0)
        out.append(f"refusal: the plain mix plus {docs:,} refusal documents (a toxic span as the request, a templated "
                   f"refusal and reason) as {data.get('refusal_ratio', 0):.0%} of the training tokens.")
    return out + [""] if out else []


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
