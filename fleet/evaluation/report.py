"""The evaluation, shown: a terminal table, Markdown, and a self-contained HTML page with plots.

Operator-side only (rich, matplotlib, jinja2). The plots are inline SVG, so
the HTML file is one file a person can mail around: quality against size and
speed, the per-token KLD distribution of each variant (structured vs prose),
and the flips per category.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .results import Comparison, EvalReport, LogitSummary
from .verdict import Verdict, VerdictPolicy


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _rate(r: object) -> str:
    from .results import Rate

    assert isinstance(r, Rate)
    return f"{r.passed}/{r.n} {_pct(r.rate)} [{_pct(r.low)}-{_pct(r.high)}]"


def _kl(s: LogitSummary | None, attr: str = "kl_mean") -> str:
    return "–" if s is None else f"{getattr(s, attr):.4f}"


def _same(s: LogitSummary | None) -> str:
    return "–" if s is None else _pct(s.same_top)


def variant_rows(report: EvalReport) -> list[list[str]]:
    rows = []
    for v in report.variants:
        rows.append([v.name + (" (baseline)" if v.role == "baseline" else ""),
                     f"{v.size_bytes / 1e6:.1f}", f"{v.bits_per_weight:.2f}",
                     f"{v.tokens_per_second:.1f}", f"{v.seconds_per_item:.2f}",
                     _rate(v.overall)])
    return rows


VARIANT_HEADER = ["variant", "size MB", "bpw", "tokens/s", "s/item", "items passed [95% CI]"]
COMPARE_HEADER = ["candidate", "pass→fail", "fail→pass", "McNemar p", "KLD mean struct",
                  "KLD p99 struct", "KLD mean prose", "KLD p99 prose", "KLD max",
                  "same top struct", "same top prose", "Δp p1", "verdict"]


def compare_row(c: Comparison, verdict: Verdict | None, label: str | None = None) -> list[str]:
    lg = c.logits
    s = lg.structured if lg else None
    p = lg.prose if lg else None
    a = lg.all if lg else None
    return [label or c.candidate, str(c.worse), str(c.better), f"{c.mcnemar_p:.3g}",
            _kl(s), _kl(s, "kl_p99"), _kl(p), _kl(p, "kl_p99"), _kl(a, "kl_max"),
            _same(s), _same(p), "–" if a is None else f"{a.dp_p01:+.3f}",
            verdict.decision if verdict else "–"]


def property_rows(report: EvalReport) -> tuple[list[str], list[list[str]]]:
    names = [v.precision for v in report.variants]
    props = sorted({p for v in report.variants for p in v.properties})
    cats = sorted({c for v in report.variants for c in v.categories})
    rows = []
    for p in props:
        rows.append([f"property {p}"] + [_pct(v.properties[p].rate) if p in v.properties
                                         else "–" for v in report.variants])
    for c in cats:
        rows.append([f"category {c}"] + [_pct(v.categories[c].rate) if c in v.categories
                                         else "–" for v in report.variants])
    return ["pass rate", *names], rows


def noise_line(report: EvalReport) -> str:
    if not report.comparisons or report.comparisons[0].noise_floor is None:
        return "noise floor: not measured"
    nf = report.comparisons[0].noise_floor
    a = nf.all
    load = report.noise_load or {}
    if a is None:
        return "noise floor: no tokens scored"
    return (f"noise floor ({report.baseline} reloaded with threads={load.get('n_threads')}, "
            f"batch={load.get('n_batch')}, first {load.get('items')} items): "
            f"KLD mean {a.kl_mean:.2e}, p99 {a.kl_p99:.2e}, "
            f"max {a.kl_max:.2e}, same top {_pct(a.same_top)} over {a.tokens} tokens")


def print_report(report: EvalReport, verdicts: dict[str, Verdict], console: Console) -> None:
    t = Table(title=f"{report.golden.items} golden items · {report.golden.path}")
    for i, h in enumerate(VARIANT_HEADER):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in variant_rows(report):
        t.add_row(*row)
    console.print(t)
    header, rows = property_rows(report)
    t = Table(title="pass rate per property and category")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    t = Table(title=f"against {report.baseline} (teacher-forced on its answers)")
    for i, h in enumerate(COMPARE_HEADER):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in compare_rows(report, verdicts):
        t.add_row(*row)
    console.print(t)
    console.print(noise_line(report))
    for c in report.comparisons:
        v = verdicts.get(c.candidate)
        if v is not None and v.decision != "pass":
            console.print(f"  {v.summary()}")
    console.print(f"{report.seconds:.0f} s in all")


# -- Markdown -------------------------------------------------------------------------

def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def policy_line(policy: VerdictPolicy | None) -> str:
    """The policy's settings that differ from the defaults, for the report's verdict section."""
    if policy is None:
        return "policy: the defaults"
    changed = policy.model_dump(exclude_defaults=True)
    return "policy: " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "the defaults")


def markdown(report: EvalReport, verdicts: dict[str, Verdict],
             policy: VerdictPolicy | None = None) -> str:
    header, rows = property_rows(report)
    parts = [
        f"# Evaluation: {', '.join(v.precision for v in report.variants)} "
        f"against {report.baseline}",
        "",
        f"Command: `{report.command}`  ",
        f"Golden set: `{report.golden.path}` ({report.golden.items} of "
        f"{report.golden.total_items} items, sha256 {report.golden.sha256[:12]}), "
        f"finished {report.created_at}, {report.seconds:.0f} s.",
        "",
        "## Variants",
        "",
        _md_table(VARIANT_HEADER, variant_rows(report)),
        "",
        "## Against the baseline",
        "",
        _md_table(COMPARE_HEADER, compare_rows(report, verdicts)),
        "",
        noise_line(report),
        "",
        "## Pass rates",
        "",
        _md_table(header, rows),
        "",
        "## Flips",
        "",
    ]
    for c in report.comparisons:
        if c.flips:
            flips = ", ".join(f"`{f.item_id}` {f.direction} ({', '.join(f.properties)})"
                              for f in c.flips)
            parts.append(f"- **{c.candidate}**: {flips}")
        else:
            parts.append(f"- **{c.candidate}**: none")
    parts += ["", "## Verdicts", "", policy_line(policy), ""]
    for v in verdicts.values():
        parts.append(f"- {v.summary()}")
    return "\n".join(parts) + "\n"


# -- HTML -----------------------------------------------------------------------------

def _svg(fig: object) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")  # type: ignore[attr-defined]
    import matplotlib.pyplot as plt

    plt.close(fig)  # type: ignore[arg-type]
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog so it inlines


def _quality_plot(report: EvalReport) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    by_name = {c.candidate: c for c in report.comparisons}
    for ax, xattr, xlabel in ((axes[0], "size", "size (MB)"),
                              (axes[1], "speed", "tokens/s")):
        for v in report.variants:
            x = v.size_bytes / 1e6 if xattr == "size" else v.tokens_per_second
            ax.errorbar([x], [v.overall.rate * 100],
                        yerr=[[(v.overall.rate - v.overall.low) * 100],
                              [(v.overall.high - v.overall.rate) * 100]],
                        fmt="o", capsize=3)
            c = by_name.get(v.name)
            kl = (c.logits.structured.kl_mean if c and c.logits and c.logits.structured
                  else None)
            label = v.precision + (f"\nKLD(struct) {kl:.3f}" if kl is not None else "")
            ax.annotate(label, (x, v.overall.rate * 100), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("items passed (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("quality against size and speed (95% Wilson intervals)")
    return _svg(fig)


def _kld_plot(report: EvalReport) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, which in zip(axes, ("structured", "prose"), strict=True):
        for name, samples in report.kl_samples.items():
            values = np.sort(np.asarray(samples.get(which, []), dtype=float))
            if values.size == 0:
                continue
            label = f"{report.baseline} noise floor" if name == "noise" else name
            values = np.maximum(values, 1e-7)  # log axis: exact zeros drawn at 1e-7
            y = 1.0 - np.arange(values.size) / values.size
            ax.step(values, y, where="post", label=label,
                    **({"color": "grey", "linestyle": ":", "linewidth": 2}
                       if name == "noise" else {}))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"per-token KLD, {which} tokens (nats)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of tokens with KLD ≥ x")
    axes[0].legend(fontsize=7)
    fig.suptitle("KLD distribution against the baseline (tail on the right)")
    return _svg(fig)


def _flips_plot(report: EvalReport) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    cats = sorted({k for c in report.comparisons for k in c.categories})
    fig, ax = plt.subplots(figsize=(10, 3.6))
    n = max(1, len(report.comparisons))
    width = 0.8 / n
    x = np.arange(len(cats))
    for i, c in enumerate(report.comparisons):
        worse = [c.categories[k].worse if k in c.categories else 0 for k in cats]
        better = [c.categories[k].better if k in c.categories else 0 for k in cats]
        pos = x + (i - (n - 1) / 2) * width
        ax.bar(pos, worse, width, label=f"{c.candidate} pass→fail")
        ax.bar(pos, [-b for b in better], width, alpha=0.45,
               color=ax.patches[-1].get_facecolor())
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, cats)
    ax.set_ylabel("items (up: pass→fail,\nfaded down: fail→pass)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("flips per category against the baseline")
    return _svg(fig)


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>quantfleet eval · {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.pass { color: #1a7f37; } .fail { color: #cf222e; } .insufficient { color: #9a6700; }
code { background: #f4f4f4; padding: 0 0.2rem; }
svg { max-width: 100%; height: auto; }
details { margin: 0.3rem 0; }
</style></head><body>
<h1>{{ title }}</h1>
<p>Command: <code>{{ r.command }}</code><br>
Golden set <code>{{ r.golden.path }}</code>: {{ r.golden.items }} of {{ r.golden.total_items }}
items (sha256 {{ r.golden.sha256[:12] }}) · finished {{ r.created_at }}
· {{ "%.0f"|format(r.seconds) }} s</p>
<h2>Verdicts</h2>
<p>{{ policy }}</p>
<ul>{% for v in verdicts %}<li class="{{ v.decision }}">{{ v.summary() }}</li>{% endfor %}</ul>
{{ quality|safe }}
<h2>Variants</h2>
{{ variants|safe }}
<h2>Against {{ r.baseline }}</h2>
{{ compare|safe }}
<p>{{ noise }}</p>
{{ kld|safe }}
{{ flips|safe }}
<h2>Pass rates per property and category</h2>
{{ props|safe }}
<h2>Flipped items</h2>
{% for c in r.comparisons %}
<h3>{{ c.candidate }}: {{ c.worse }} pass→fail, {{ c.better }} fail→pass</h3>
{% for f in c.flips %}<details><summary><code>{{ f.item_id }}</code> {{ f.direction }}
({{ f.properties|join(", ") }})</summary>
<p><b>{{ r.baseline }}</b>: <code>{{ answers[r.baseline][f.item_id] }}</code><br>
<b>{{ c.candidate }}</b>: <code>{{ answers[c.candidate][f.item_id] }}</code></p></details>
{% endfor %}{% endfor %}
</body></html>
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html(report: EvalReport, verdicts: dict[str, Verdict],
         policy: VerdictPolicy | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from jinja2 import Environment

    header, rows = property_rows(report)
    answers = {v.name: {i.item_id: i.text[:300] for i in v.items} for v in report.variants}
    env = Environment(autoescape=True)
    title = (f"{', '.join(v.precision for v in report.variants)} against {report.baseline}")
    return env.from_string(_HTML).render(
        title=title, r=report, verdicts=list(verdicts.values()),
        quality=_quality_plot(report), kld=_kld_plot(report), flips=_flips_plot(report),
        variants=_html_table(VARIANT_HEADER, variant_rows(report)),
        compare=_html_table(COMPARE_HEADER, compare_rows(report, verdicts)),
        props=_html_table(header, rows), noise=noise_line(report), answers=answers,
        policy=policy_line(policy),
    )


def _label(report: EvalReport, name: str) -> str:
    return next((v.precision for v in report.variants if v.name == name), name)


def compare_rows(report: EvalReport, verdicts: dict[str, Verdict]) -> list[list[str]]:
    return [compare_row(c, verdicts.get(c.candidate), _label(report, c.candidate))
            for c in report.comparisons]
