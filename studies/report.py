"""A study report: one self-contained HTML file (plotly inline, works offline) and the key plots as PNG.

    OUT/report.html          Pareto front (baselines marked), history, importances, method choices
    OUT/pareto.png, history.png, methods.png  (matplotlib), importances.png when computable
"""

from __future__ import annotations

import html
import itertools
import logging
import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergetune.core.errors import MergetuneError
from mergetune.core.fs import atomic_output_dir, check_output_dir
from mergetune.studies.front import (
    best_vs_baselines,
    confirmed_records,
    front_trials,
    objective_names,
    recipe_summary,
    recorded_test_scores,
    rule_parts,
    search_errors,
    trial_recipe,
    with_error,
)

log = logging.getLogger(__name__)


def write_report(study: optuna.Study, out: str | Path, force: bool = False) -> list[Path]:
    """Write report.html and PNGs into the directory `out`, atomically (an existing non-empty one needs
    `force`; on any error, a full disk included, `out` is left as it was); returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    check_output_dir(out, force)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise MergetuneError(f"study {study.study_name!r} has no COMPLETE trial yet; nothing to report")
    names = objective_names(study)
    front = front_trials(study)
    figures = _plotly_figures(study, complete, names)
    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "report.html").write_text(_html(study, figures, front, names, len(study.trials)), encoding="utf-8")
        files = ["report.html", *(p.name for p in _pngs(study, complete, front, names, tmp))]
    written = [out / name for name in files]
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written


# --- plotly (HTML) ---


def _plotly_figures(study: optuna.Study, complete: list[FrozenTrial], names: list[str]) -> list[tuple[str, object]]:
    import plotly.graph_objects as go
    from optuna import visualization as vis

    baselines = [t for t in complete if t.user_attrs.get("baseline")]
    figures: list[tuple[str, object]] = []
    if len(names) > 3:
        # Optuna draws fronts of 2 or 3 objectives only; beyond that, every pair of objectives.
        figures.append(("Pareto front (every pair of objectives)", _pareto_matrix_plotly(complete, front_trials(study), baselines, names)))
    elif len(names) > 1:
        fig = vis.plot_pareto_front(study, target_names=names)
        if len(names) == 2 and baselines:
            fig.add_trace(
                go.Scatter(
                    x=[t.values[0] for t in baselines],
                    y=[t.values[1] for t in baselines],
                    mode="markers+text",
                    text=[t.user_attrs["baseline"] for t in baselines],
                    textposition="top center",
                    marker={"symbol": "star", "size": 14, "color": "black"},
                    name="warm-start baselines",
                )
            )
        # Optuna's colour bars sit where the legend would: put the legend under the plot.
        fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.2})
        figures.append(("Pareto front", fig))
    for i, name in enumerate(names):
        fig = vis.plot_optimization_history(study, target=(lambda t, i=i: t.values[i]), target_name=name)
        if baselines:
            fig.add_trace(
                go.Scatter(
                    x=[t.number for t in baselines],
                    y=[t.values[i] for t in baselines],
                    mode="markers",
                    marker={"symbol": "star", "size": 12, "color": "black"},
                    text=[t.user_attrs["baseline"] for t in baselines],
                    name="warm-start baselines",
                )
            )
        figures.append((f"Optimisation history: {name}", fig))
    try:
        figures.append(("Parameter importances", vis.plot_param_importances(study)))
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        # Too few trials or a degenerate space: the report still has everything else.
        log.warning("parameter importances not computable: %s", exc)
    figures.append(("Method per layer group over trials", _method_choices_plotly(complete)))
    return figures


def _pareto_matrix_plotly(
    complete: list[FrozenTrial], front: list[FrozenTrial], baselines: list[FrozenTrial], names: list[str]
) -> object:
    """A scatter matrix of all objectives: trials, the (all-objective) Pareto front, baselines."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for trials, label, marker in (
        (complete, "trials", {"size": 5, "color": "#9ab"}),
        (front, "Pareto front", {"size": 7, "color": "#d33"}),
        (baselines, "warm-start baselines", {"size": 11, "color": "black", "symbol": "star"}),
    ):
        fig.add_trace(
            go.Splom(
                dimensions=[{"label": name, "values": [t.values[i] for t in trials]} for i, name in enumerate(names)],
                text=[f"trial {t.number} {t.user_attrs.get('baseline', '')}" for t in trials],
                marker=marker,
                name=label,
                diagonal_visible=False,
                showupperhalf=False,
            )
        )
    fig.update_layout(height=260 * len(names), legend={"orientation": "h", "yanchor": "top", "y": -0.05})
    return fig


def method_choices(complete: list[FrozenTrial]) -> list[tuple[int, str, str]]:
    """(trial number, layer-group label, method) for every rule of every recorded recipe."""
    rows = []
    for trial in complete:
        if "recipe" not in trial.user_attrs:
            continue
        for part in rule_parts(trial_recipe(trial)):
            group, _, method = part.rpartition(" ")
            rows.append((trial.number, group, method))
    return rows


def _method_choices_plotly(complete: list[FrozenTrial]) -> object:
    import plotly.graph_objects as go

    rows = method_choices(complete)
    fig = go.Figure()
    for method in sorted({m for _, _, m in rows}):
        picked = [(n, g) for n, g, m in rows if m == method]
        fig.add_trace(go.Scatter(x=[n for n, _ in picked], y=[g for _, g in picked], mode="markers", name=method))
    fig.update_layout(xaxis_title="trial", yaxis_title="layer group", title="Method per layer group")
    return fig


def _html(study: optuna.Study, figures: list[tuple[str, object]], front: list[FrozenTrial], names: list[str], n: int) -> str:
    tests = recorded_test_scores(study)
    confirmed = confirmed_records(study)
    shown_confirmed = [f"{x} (confirmed)" for x in names] if any(t.number in confirmed for t in front) else []
    head = "".join(
        f"<th>{html.escape(x)}</th>" for x in ["trial", *names, *shown_confirmed, *(f"{x} (test)" for x in names), "recipe"]
    )
    rows = []
    for trial in front:
        test = tests.get(trial.number, {})
        again = confirmed.get(trial.number, {}).get("scores", {})
        cells = [str(trial.number) + (f" ({trial.user_attrs['baseline']})" if trial.user_attrs.get("baseline") else "")]
        cells += [with_error(v, se) for v, se in zip(trial.values, search_errors(study, trial))]
        if shown_confirmed:
            cells += [with_error(again[x]["score"], again[x].get("se")) if x in again else "–" for x in names]
        cells += [f"{test[x]:.4f}" if x in test else "–" for x in names]
        cells.append(recipe_summary(trial_recipe(trial)) if "recipe" in trial.user_attrs else "?")
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    sections = []
    for i, (title, fig) in enumerate(figures):
        # plotly.js goes inline once (no CDN: the report must open offline).
        body = fig.to_html(full_html=False, include_plotlyjs=(i == 0))
        sections.append(f"<h2>{html.escape(title)}</h2>\n{body}")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>mergetune report: {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body>
<h1>Study {html.escape(study.study_name)}</h1>
<p>{n} trials; objectives: {html.escape(', '.join(names))}.</p>
<p>{html.escape(best_vs_baselines(study) or "")}</p>
<h2>Pareto-optimal trials</h2>
<p>Search scores ± their standard error; confirmed: the run's end re-scored the top trials on more search items.</p>
<table><tr>{head}</tr>{''.join(rows)}</table>
{''.join(sections)}
</body></html>
"""


# --- matplotlib (PNG) ---


def _pngs(study: optuna.Study, complete: list[FrozenTrial], front: list[FrozenTrial], names: list[str], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    baselines = [t for t in complete if t.user_attrs.get("baseline")]

    pairs = list(itertools.combinations(range(len(names)), 2))
    if pairs:
        columns = min(3, len(pairs))
        rows_n = math.ceil(len(pairs) / columns)
        fig, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 3.6 * rows_n), squeeze=False)
        for ax in axes.flat[len(pairs):]:
            ax.set_visible(False)
        for ax, (i, j) in zip(axes.flat, pairs):
            ax.scatter([t.values[i] for t in complete], [t.values[j] for t in complete], s=14, c="#9ab", label="trials")
            ax.scatter([t.values[i] for t in front], [t.values[j] for t in front], s=30, c="#d33", label="Pareto front")
            ax.scatter([t.values[i] for t in baselines], [t.values[j] for t in baselines], marker="*", s=140, c="k", label="baselines")
            for t in baselines:
                ax.annotate(t.user_attrs["baseline"], (t.values[i], t.values[j]), fontsize=6, xytext=(4, 4), textcoords="offset points")
            ax.set_xlabel(names[i])
            ax.set_ylabel(names[j])
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("Pareto front (over all objectives)" if len(pairs) > 1 else "Pareto front")
    else:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter([t.number for t in complete], [t.values[0] for t in complete], s=14, c="#9ab", label="trials")
        ax.scatter([t.number for t in baselines], [t.values[0] for t in baselines], marker="*", s=140, c="k", label="baselines")
        ax.set_xlabel("trial")
        ax.set_ylabel(names[0])
        ax.set_title("Scores (single objective)")
        ax.legend(fontsize=8)
    written.append(_save(fig, out / "pareto.png"))

    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.8 * len(names)), squeeze=False)
    for i, (name, direction) in enumerate(zip(names, study.directions)):
        ax = axes[i][0]
        numbers = [t.number for t in complete]
        values = [t.values[i] for t in complete]
        better = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
        best = [better(values[: j + 1]) for j in range(len(values))]
        ax.scatter(numbers, values, s=12, c="#9ab", label="trial")
        ax.step(numbers, best, where="post", c="#d33", label="best so far")
        ax.scatter([t.number for t in baselines], [t.values[i] for t in baselines], marker="*", s=100, c="k", label="baselines")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    axes[-1][0].set_xlabel("trial")
    fig.suptitle("Optimisation history")
    written.append(_save(fig, out / "history.png"))

    rows = method_choices(complete)
    methods = sorted({m for _, _, m in rows})
    groups = list(dict.fromkeys(g for _, g, _ in rows))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * max(1, len(groups))))
    for method in methods:
        picked = [(n, groups.index(g)) for n, g, m in rows if m == method]
        ax.scatter([n for n, _ in picked], [g for _, g in picked], s=22, label=method)
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.set_xlabel("trial")
    ax.set_title("Method per layer group")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    written.append(_save(fig, out / "methods.png"))

    try:
        from optuna.visualization.matplotlib import plot_param_importances

        # Importance evaluators rank params by how they lower the target: negate maximised objectives.
        sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = plot_param_importances(study, target=lambda t: sign * t.values[0], target_name=names[0])
        written.append(_save(ax.figure, out / "importances.png"))
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        log.warning("parameter importances not computable: %s", exc)
    return written


def _save(fig: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
