"""The chart's README is generated from values.yaml (scripts/chart-readme.py) and is up to date."""

from __future__ import annotations

from tests.chart.test_chart import CHART, load_script


def test_committed_readme_is_up_to_date() -> None:
    readme = load_script("chart-readme")
    wanted = readme.render((CHART / "values.yaml").read_text(), (CHART / "Chart.yaml").read_text())
    assert (CHART / "README.md").read_text() == wanted, (
        "charts/kubespeech/README.md is stale: make chart-readme"
    )


def test_every_documented_value_is_in_the_readme() -> None:
    readme = load_script("chart-readme")
    sections = readme.parse((CHART / "values.yaml").read_text())
    paths = [value.path for section in sections for value in section.values]
    assert {"operator.image.repository", "speechDeployment.create", "speechDeployment.spec",
            "serviceMonitor.enabled", "dashboard.labels", "rbac.create"} <= set(paths)  # fmt: skip
    assert len(paths) == len(set(paths))
    # A key inside a documented mapping (the spec's fields, resources' requests) is not a row of its own.
    assert not any(path.startswith("speechDeployment.spec.") for path in paths)
    text = (CHART / "README.md").read_text()
    for path in paths:
        assert f"| `{path}` |" in text, path


def test_a_new_value_changes_the_readme() -> None:
    readme = load_script("chart-readme")
    values = (CHART / "values.yaml").read_text()
    chart = (CHART / "Chart.yaml").read_text()
    changed = values + "\n# -- A value added later.\nlaterValue: 3\n"
    assert "| `laterValue` | `3` | A value added later. |" in readme.render(changed, chart)
    assert readme.render(changed, chart) != readme.render(values, chart)
