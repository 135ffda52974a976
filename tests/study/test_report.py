"""Report tables from fabricated metrics: exact cells, in milliseconds."""

from __future__ import annotations

from types import SimpleNamespace

from melanogan.study.experiments import ClassifierOptions
from melanogan.study.report import _changed_options, _score_ci, source_table


def _run(auc: float, ci: list[float], by_source: dict | None = None) -> dict:
    m = {"roc_auc": auc, "roc_auc_ci95": ci}
    if by_source is not None:
        m["by_source"] = by_source
    return m


def test_single_seed_shows_the_runs_bootstrap_ci_and_several_seeds_a_t_interval():
    assert _score_ci([_run(0.8, [0.7, 0.9])], "roc_auc") == "0.800 [0.700, 0.900]"
    # two seeds 0.8 and 0.9: mean 0.85, t(0.975, 1) = 12.706, sd 0.0707 / sqrt(2) -> half width 0.635
    assert _score_ci([_run(0.8, [0.7, 0.9]), _run(0.9, [0.8, 1.0])], "roc_auc") == "0.850 [0.215, 1.485]"
    assert _score_ci([{"roc_auc": None}], "roc_auc") == "n/a"  # a single-class split has no AUC


def test_source_table_lists_every_arm_per_source_and_is_empty_for_one_source():
    cfg = SimpleNamespace(arms=["baseline", "gan"], seeds=[0])
    ham = {"n_images": 100, "n_melanoma": 10, "roc_auc": 0.9, "roc_auc_ci95": [0.85, 0.95]}
    isic = {"n_images": 50, "n_melanoma": 20, "roc_auc": 0.6, "roc_auc_ci95": [0.5, 0.7]}
    only_melanoma = {"n_images": 5, "n_melanoma": 5, "roc_auc": None, "roc_auc_ci95": [None, None]}
    metrics = {(0, "baseline"): _run(0.8, [0.7, 0.9], {"ham10000": ham, "folder": isic}),
               (0, "gan"): _run(0.8, [0.7, 0.9], {"ham10000": ham, "folder": only_melanoma})}
    lines = source_table(cfg, metrics)
    assert lines[0] == "## By source"
    assert "| arm | folder (50 images, 20 melanoma) | ham10000 (100 images, 10 melanoma) |" in lines
    assert "| baseline | 0.600 [0.500, 0.700] | 0.900 [0.850, 0.950] |" in lines
    assert "| gan | n/a | 0.900 [0.850, 0.950] |" in lines
    assert source_table(cfg, {(0, "baseline"): _run(0.8, [0.7, 0.9])}) == []


def test_subgroup_section_per_arm_with_differences_and_small_groups_listed():
    from melanogan.study.report import subgroup_section

    cfg = SimpleNamespace(arms=["baseline", "gan"], seeds=[0, 1])

    def g(value, auc, n=40, mel=8):
        return {"variable": "ita_category", "value": value, "n_images": n, "n_melanoma": mel, "roc_auc": auc}

    metrics = {(0, "baseline"): {"by_subgroup": [g("light", 0.80), g("brown", 0.70), g("dark", None, 3, 1)]},
               (1, "baseline"): {"by_subgroup": [g("light", 0.82), g("brown", 0.72), g("dark", None, 3, 1)]},
               (0, "gan"): {"by_subgroup": [g("light", 0.86), g("brown", 0.64), g("dark", None, 3, 1)]},
               (1, "gan"): {"by_subgroup": [g("light", 0.86), g("brown", 0.66), g("dark", None, 3, 1)]}}
    lines = subgroup_section(cfg, metrics)
    assert "| subgroup | images | melanoma | baseline | gan |" in lines
    assert "| ita_category: light | 40 | 8 | 0.810 | 0.860 (+0.050) |" in lines
    assert "| ita_category: brown | 40 | 8 | 0.710 | 0.650 (-0.060) |" in lines
    assert "| ita_category: dark | 3 | 1 | too few | too few |" in lines
    assert any("in another of the same variable: gan (ita_category)." in line for line in lines)
    assert subgroup_section(cfg, {(0, "baseline"): {}}) == []


def test_report_html_is_self_contained_and_escapes_text_from_data(tmp_path):
    import base64

    from PIL import Image

    from melanogan.render import markdown_to_html

    Image.new("RGB", (2, 2), (255, 0, 0)).save(tmp_path / "fig.png")
    text = ("# Title\n\n| arm | verdict |\n|---|---|\n| gan | **better** |\n\n- a `code` item\n\n"
            "![a figure](fig.png)\n\nA diagnosis named <script>alert(1)</script>\n")
    page = markdown_to_html(text, tmp_path, "study & report")
    assert "<title>study &amp; report</title>" in page and "<h1>Title</h1>" in page
    assert "<th>arm</th>" in page and "<td><strong>better</strong></td>" in page and "<code>code</code>" in page
    data = base64.b64encode((tmp_path / "fig.png").read_bytes()).decode()
    assert f'src="data:image/png;base64,{data}"' in page and 'alt="a figure"' in page
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_the_report_names_the_classifier_options_a_study_changed():
    assert _changed_options(ClassifierOptions()) == " (`train`'s defaults)"
    assert _changed_options(ClassifierOptions(image_size=64)) == " (`train`'s defaults)"  # named beside it
    assert _changed_options(ClassifierOptions(mixup=0.2, epochs=2, model="resnet18")) == \
        " (epochs 2, mixup 0.2; otherwise `train`'s defaults)"
