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

from quantfleet.agent.hardware import describe, llama_cpp_kernels
from quantfleet.agent.quality.results import (
    Comparison,
    EvalReport,
    KernelPath,
    LogitSummary,
    VariantResult,
)
from quantfleet.agent.quality.verdict import Verdict, VerdictPolicy
from quantfleet.agent.wire import HardwareFingerprint

from .machines import MachineComparison


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _rate(r: object) -> str:
    from quantfleet.agent.quality.results import Rate

    assert isinstance(r, Rate)
    return f"{r.passed}/{r.n} {_pct(r.rate)} [{_pct(r.low)}-{_pct(r.high)}]"


def _kl(s: LogitSummary | None, attr: str = "kl_mean") -> str:
    return "–" if s is None else f"{getattr(s, attr):.4f}"


def _same(s: LogitSummary | None) -> str:
    return "–" if s is None else _pct(s.same_top)


def runtime_cell(v: VariantResult) -> str:
    """The runtime of a variant and, for onnxruntime, the execution provider that ran it."""
    if not v.backend:
        return "–"  # a report from before version 2
    return v.backend + (f" ({', '.join(v.providers)})" if v.providers else "")


def variant_rows(report: EvalReport) -> list[list[str]]:
    rows = []
    for v in report.variants:
        rows.append([v.name + (" (baseline)" if v.role == "baseline" else ""),
                     runtime_cell(v), f"{v.size_bytes / 1e6:.1f}", f"{v.bits_per_weight:.2f}",
                     f"{v.tokens_per_second:.1f}", f"{v.seconds_per_item:.2f}",
                     _rate(v.overall)])
    return rows


VARIANT_HEADER = ["variant", "runtime", "size MB", "bpw", "tokens/s", "s/item",
                  "items passed [95% CI]"]


# -- where it was measured ---------------------------------------------------------------

NOT_RECORDED = "not recorded (a report from before version 2)"


def measured_on(hw: HardwareFingerprint | None, kernels: KernelPath | None = None) -> str:
    """One line: the class, the CPU and the runtimes' kernels; says so when emulated."""
    if hw is None:
        return NOT_RECORDED
    line = str(describe(hw))
    if kernels is not None and kernels.onnxruntime_providers:
        line += f" ({', '.join(kernels.onnxruntime_providers)})"
    if kernels is not None and kernels.hidden_features:
        line += f" · host features hidden by cpuid: {' '.join(kernels.hidden_features)}"
    return line


def hardware_rows(hw: HardwareFingerprint | None,
                  kernels: KernelPath | None = None) -> list[list[str]]:
    """The fingerprint and kernel path as (field, value) rows, for every format."""
    if hw is None:
        return [["hardware", NOT_RECORDED]]
    cores = f"{hw.logical_cores} logical" + (
        f", {hw.physical_cores} physical" if hw.physical_cores else "")
    k = kernels or KernelPath()
    rows = [
        ["cpu", f"{hw.cpu_model} ({hw.cpu_vendor or 'vendor unknown'})"],
        ["arch · class", f"{hw.arch} · {hw.cpu_class}"],
        ["features", " ".join(hw.features) or "none reported"],
        ["cores · memory", f"{cores} · {hw.memory_bytes / 2**30:.1f} GiB"],
        ["llama.cpp", (f"llama-cpp-python {hw.llama_cpp_python}, built for "
                       + (" ".join(llama_cpp_kernels(hw.llama_cpp_system_info)) or "?"))
         if hw.llama_cpp_python else "not installed"],
        ["llama.cpp system info", hw.llama_cpp_system_info or "–"],
        ["onnxruntime", (hw.onnxruntime + (f" on {', '.join(k.onnxruntime_providers)}"
                                           if k.onnxruntime_providers else ""))
         if hw.onnxruntime else "not installed"],
        ["OS kernel", hw.kernel or "–"],
    ]
    if k.hidden_features:
        rows.append(["hidden by cpuid", " ".join(k.hidden_features)
                     + " (the host has them; this process did not see them: emulated or "
                       "masked)"])
    return rows
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
    console.print(f"measured on: {measured_on(report.hardware, report.kernels)}",
                  highlight=False)
    console.print(f"{report.seconds:.0f} s in all")


# -- Markdown -------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    # llama.cpp's system info is full of "|": escaped, it stays inside its cell.
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
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
        "## Where it was measured",
        "",
        _md_table(["", "hardware and kernels"], hardware_rows(report.hardware, report.kernels)),
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
<h2>Where it was measured</h2>
{{ hardware|safe }}
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
        hardware=_html_table(["", "hardware and kernels"],
                             hardware_rows(report.hardware, report.kernels)),
        policy=policy_line(policy),
    )


def _label(report: EvalReport, name: str) -> str:
    return next((v.precision for v in report.variants if v.name == name), name)


def compare_rows(report: EvalReport, verdicts: dict[str, Verdict]) -> list[list[str]]:
    return [compare_row(c, verdicts.get(c.candidate), _label(report, c.candidate))
            for c in report.comparisons]


# -- the same golden set on two machines (``quantfleet eval compare``) --------------------

ACROSS_HEADER = ["variant", "runtime", "passed on {a}", "passed on {b}", "pass→fail",
                 "fail→pass", "McNemar p", "answers differ", "items whose pass/fail differ"]
KLD_ACROSS_HEADER = ["candidate", "tokens", "KLD mean {a}", "KLD mean {b}", "Δ mean",
                     "KLD p99 {a}", "KLD p99 {b}", "Δ p99"]


def _f(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def across_rows(mc: MachineComparison) -> tuple[list[str], list[list[str]]]:
    header = [h.format(a=mc.a.label, b=mc.b.label) for h in ACROSS_HEADER]
    rows = []
    for v in mc.variants:
        flips = ", ".join(f"{f.item_id} ({f.direction})" for f in v.flips) or "none"
        rows.append([v.precision + (" (baseline)" if v.role == "baseline" else ""),
                     v.backend or "–", _rate(v.a), _rate(v.b), str(v.worse), str(v.better),
                     f"{v.mcnemar_p:.3g}", f"{len(v.answers_differ)}/{v.n_items}", flips])
    return header, rows


def kld_across_rows(mc: MachineComparison) -> tuple[list[str], list[list[str]]]:
    header = [h.format(a=mc.a.label, b=mc.b.label) for h in KLD_ACROSS_HEADER]
    rows = []
    for v in mc.variants:
        for k in v.kld:
            tokens = f"{k.a_tokens if k.a_tokens is not None else '–'} / " \
                     f"{k.b_tokens if k.b_tokens is not None else '–'}"
            rows.append([f"{v.precision} {k.split}", tokens, _f(k.a_mean), _f(k.b_mean),
                         _f(k.mean_diff, True), _f(k.a_p99), _f(k.b_p99),
                         _f(k.p99_diff, True)])
    return header, rows


def _sides(mc: MachineComparison) -> list[str]:
    lines = []
    for s in (mc.a, mc.b):
        lines.append(f"{s.label}: {measured_on(s.hardware, s.kernels)} (finished "
                     f"{s.created_at})")
    if mc.a.hardware is not None and mc.b.hardware is not None:
        ca, cb = mc.a.hardware.cpu_class, mc.b.hardware.cpu_class
        lines.append(f"the same hardware class ({ca})" if ca == cb
                     else f"different hardware classes: {ca} against {cb}")
    return lines


def print_machines(mc: MachineComparison, console: Console) -> None:
    g = mc.golden
    console.print(f"{g.items} items of {g.path} (sha256 {g.sha256[:12]}), baseline "
                  f"{mc.baseline}, on two machines:", highlight=False)
    for line in _sides(mc):
        console.print(f"  {line}", highlight=False)
    for title, (header, rows) in (
            ("pass/fail per variant: " + f"{mc.a.label} against {mc.b.label}",
             across_rows(mc)),
            (f"KLD against {mc.baseline}, each machine's own (B − A)", kld_across_rows(mc))):
        t = Table(title=title)
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i in (0, len(header) - 1) else "right",
                         overflow="fold")
        for row in rows:
            t.add_row(*row)
        console.print(t)


def machines_markdown(mc: MachineComparison) -> str:
    g = mc.golden
    parts = [f"# {mc.a.label} against {mc.b.label}: {g.items} items of `{g.path}`", "",
             f"Golden set sha256 {g.sha256[:12]}, baseline {mc.baseline}.", ""]
    parts += [f"- {line}" for line in _sides(mc)]
    header, rows = across_rows(mc)
    parts += ["", "## Pass/fail per variant", "", _md_table(header, rows), ""]
    header, rows = kld_across_rows(mc)
    parts += [f"## KLD against {mc.baseline}, each machine's own", "",
              _md_table(header, rows) if rows else "no candidate has KLD figures", ""]
    return "\n".join(parts)
