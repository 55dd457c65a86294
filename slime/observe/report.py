"""`slime report RUN_DIR`: one self-contained HTML page of a run, written from the files the run left in its
--output-dir (metrics.jsonl, samples.jsonl, run.json). A run writes it itself when it ends.

The plots are PNGs drawn by matplotlib and embedded as data URIs, so the page opens anywhere, offline, as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections import defaultdict
from typing import Any

from slime.observe.metrics import STEP_PHASES

REPORT_NAME = "report.html"
SAMPLES_PER_SECTION = 4  # sample responses shown per eval dataset and for the last training rollout


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a JSONL file the run wrote; a line cut short by a killed run is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(rows: list[dict]) -> list[tuple[str, str]]:
    """(title, base64 PNG) of each plot the metrics allow; a plot whose metrics the run never logged is left out."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    keys = {k for r in rows for k in r}
    plots = []

    def figure(title: str, draw: Any) -> None:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        draw(ax)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        fig.suptitle(title, fontsize=11)
        plots.append((title, _png(fig)))
        plt.close(fig)

    eval_accuracy = sorted(k for k in keys if k.startswith("eval/") and k.endswith("/accuracy"))
    if "rollout/reward_mean" in keys or eval_accuracy:

        def reward(ax: Any) -> None:
            if "rollout/reward_mean" in keys:
                ax.plot(*_series(rows, "rollout/reward_mean"), marker="o", ms=3, label="training reward (mean)")
            for k in eval_accuracy:
                name = k.removeprefix("eval/").removesuffix("/accuracy")
                ax.plot(*_series(rows, k), marker="s", ms=4, label=f"held-out accuracy: {name}")

        figure("Reward and held-out accuracy", reward)

    if "rollout/response_len_mean" in keys:

        def length(ax: Any) -> None:
            ax.plot(*_series(rows, "rollout/response_len_mean"), marker="o", ms=3, label="response length (mean)")
            ax.set_ylabel("tokens")
            if "rollout/truncated_ratio" in keys:
                twin = ax.twinx()
                twin.plot(*_series(rows, "rollout/truncated_ratio"), color="tab:red", ls="--", label="truncated")
                twin.set_ylabel("truncated fraction", color="tab:red")
                twin.set_ylim(0, 1)

        figure("Response length and truncation", length)

    if "perf/step_seconds" in keys:

        def breakdown(ax: Any) -> None:
            steps = [r["step"] for r in rows if "perf/step_seconds" in r]
            by_step = {r["step"]: r for r in rows if "perf/step_seconds" in r}
            bottom = [0.0] * len(steps)
            for label, key in STEP_PHASES:
                part = [float(by_step[s].get(key, 0.0)) for s in steps]
                ax.bar(steps, part, bottom=bottom, label=label)
                bottom = [b + p for b, p in zip(bottom, part, strict=True)]
            other = [max(0.0, by_step[s]["perf/step_seconds"] - b) for s, b in zip(steps, bottom, strict=True)]
            ax.bar(steps, other, bottom=bottom, label="other", color="lightgray")
            ax.set_ylabel("seconds")

        figure("Step time by phase", breakdown)

    throughput = [k for k in ("perf/samples_per_s", "rollout/tokens_per_s", "train/tokens_per_s") if k in keys]
    if throughput:

        def speed(ax: Any) -> None:
            for k in throughput:
                ax.plot(*_series(rows, k), marker="o", ms=3, label=k)
            ax.set_yscale("log")
            ax.set_ylabel("per second")

        figure("Throughput", speed)

    if any(r.get("train/staleness_max") for r in rows):

        def staleness(ax: Any) -> None:
            ax.plot(*_series(rows, "train/staleness_mean"), marker="o", ms=3, label="mean")
            ax.plot(*_series(rows, "train/staleness_max"), marker="^", ms=3, label="max")
            ax.set_ylabel("weight versions behind")

        figure("Staleness of trained samples", staleness)
    return plots


def _sample_sections(samples: list[dict]) -> list[tuple[str, list[dict]]]:
    """Per eval dataset, its newest evaluation's samples; then the newest training rollout's."""
    newest: dict[str, int] = {}
    for s in samples:
        newest[s["kind"]] = max(newest.get(s["kind"], -1), s["step"])
    grouped: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        if s["step"] == newest[s["kind"]] and len(grouped[s["kind"]]) < SAMPLES_PER_SECTION:
            grouped[s["kind"]].append(s)
    kinds = sorted(k for k in grouped if k != "rollout") + (["rollout"] if "rollout" in grouped else [])
    return [(k, grouped[k]) for k in kinds]


def render(run_dir: str) -> str:
    """The report of the run in `run_dir`, as an HTML string."""
    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "step" in r]
    samples = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    info: dict[str, Any] = {}
    if os.path.exists(os.path.join(run_dir, "run.json")):
        with open(os.path.join(run_dir, "run.json")) as f:
            info = json.load(f)
    e = html.escape
    title = f"slime run {info.get('run_id', os.path.basename(os.path.abspath(run_dir)))}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    trained = sorted({r["step"] for r in rows if "perf/step_seconds" in r})
    facts: list[tuple[str, Any]] = [("folder", os.path.abspath(run_dir)), ("started", info.get("started", "?"))]
    facts.append(("steps", f"{len(trained)} (last: {trained[-1]})" if trained else "none"))
    latest = {k: v for r in rows for k, v in r.items()}  # each metric's newest value
    named = [("reward, last rollout", "rollout/reward_mean"), ("step seconds, last", "perf/step_seconds")]
    named += [(f"held-out accuracy, {k.split('/')[1]}", k) for k in sorted(latest) if k.endswith("/accuracy")]
    facts += [(label, f"{latest[k]:.4g}") for label, k in named if isinstance(latest.get(k), int | float)]
    parts.append("<table class='facts'>" + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts))
    parts.append("</table>")
    if info.get("command"):
        parts.append(f"<h2>Command</h2><pre class='command'>{e(info['command'])}</pre>")
    plots = _plots(rows) if rows else []
    parts.append("<h2>Curves</h2>" if plots else "<p>No metrics logged yet.</p>")
    parts.append("<div class='plots'>")
    for name, data in plots:
        parts.append(f"<figure><img class='plot' alt='{e(name)}' src='data:image/png;base64,{data}'></figure>")
    parts.append("</div>")
    for kind, chosen in _sample_sections(samples):
        heading = "Last training rollout" if kind == "rollout" else f"Evaluation: {kind.removeprefix('eval/')}"
        parts.append(f"<h2>{e(heading)} (step {chosen[0]['step']})</h2>")
        for s in chosen:
            label = f" · label {e(str(s['label']))}" if s.get("label") not in (None, "") else ""
            parts.append(
                f"<div class='sample'><div class='meta'>reward {s.get('reward')}{label} · {s.get('status', '')}"
                f"</div><pre class='prompt'>{e(str(s.get('prompt', '')))}</pre>"
                f"<pre class='response'>{e(str(s.get('response', '')))}</pre></div>"
            )
    parts.append(f"<script>{_RENDER_CHECK}</script></body></html>")
    return "\n".join(parts)


def write_report(run_dir: str, output: str | None = None) -> str:
    """Write the report of `run_dir` (default `run_dir/report.html`, replaced whole); returns its path."""
    path = output or os.path.join(run_dir, REPORT_NAME)
    text = render(run_dir)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table.facts th { text-align: left; padding-right: 1em; color: #555; font-weight: normal; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f6; padding: .6em; border-radius: 4px; }
pre.prompt { color: #555; max-height: 10em; overflow: auto; } pre.response { background: #eef5ff; }
.sample { margin-bottom: 1.2em; } .meta { font-size: .9em; color: #333; margin-bottom: .2em; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: .5em 1.5em; }
figure { margin: .5em 0; } img.plot { width: 100%; }
"""

# Marks the page once every plot has decoded, so a headless browser can tell a page whose plots render from one
# whose images are broken (a broken data URI decodes to width 0).
_RENDER_CHECK = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (img) { if (img.complete && img.naturalWidth > 0) ok += 1; });
  document.body.setAttribute('data-plots', imgs.length);
  document.body.setAttribute('data-plots-rendered', ok);
});
"""


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="slime report",
        description="Write one self-contained HTML page of a run: reward and held-out accuracy, response length and "
        "truncation, step time by phase, throughput, staleness, sample responses and the command line.",
    )
    p.add_argument("run_dir", help="the run's --output-dir (holding metrics.jsonl)")
    p.add_argument("--output", help="where to write the page (default: RUN_DIR/report.html)")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.run_dir, "metrics.jsonl")):
        p.exit(1, f"slime report: {args.run_dir} holds no metrics.jsonl: not a run's --output-dir\n")
    print(write_report(args.run_dir, args.output))


if __name__ == "__main__":
    main()
