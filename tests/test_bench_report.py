"""``ctbench bench report``: one self-contained HTML page (tables, certification per stage,
training curves, analyses, sweeps), parsed here and rendered by a headless Chromium."""
import base64
import io
import shutil
import sqlite3
import subprocess
import textwrap
from html.parser import HTMLParser

import pytest
from PIL import Image

import ctbench
from ctbench.bench import load_suite, run_suite
from ctbench.bench.formats import render
from ctbench.bench.reference import Value
from ctbench.bench.report import write_report
from ctbench.bench.store import connect
from ctbench.bench.sweep_study import storage_path
from ctbench.bench.tables import Column, Row, Table
from ctbench.cli import main

VOID = {"meta", "img", "br", "hr", "link", "input"}
SUITE = """
    description: report test (2 epochs with a validation split, 16 certified samples)
    seeds: [0]
    certify: {stages: [ibp, crown-ibp, attack], timeout: 10, count: 16, attack_steps: 5, attack_restarts: 1}
    analyses: {utilization: {count: 16}, tightness: {count: 4, max_neurons: 4}}
    groups:
      - settings: [mnist-mini-0.1]
        methods: [ibp, pgd]
        overrides: [data.train_subset=256, data.validation_size=64, optim.epochs=2, optim.batch_size=64,
                    eps.ramp_end_epoch=1, "optim.lr_milestones=[]", attack.steps=2, attack.restarts=1,
                    evaluation.final_test_count=16, evaluation.attack_steps=2, evaluation.attack_restarts=1]
"""


class Page(HTMLParser):
    """What the tests look at: tags (checked to close in order), src/href values, cell texts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.open, self.unbalanced, self.links, self.images, self.cells = [], [], [], [], []
        self._cell = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.links += [attributes[name] for name in ("src", "href") if name in attributes]
        if tag == "img":
            self.images.append(attributes["src"])
        if tag in ("td", "th"):
            self._cell = ""
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.unbalanced.append(tag)
        if tag in ("td", "th"):
            self.cells.append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A suite of two runs trained, certified and analyzed, a 2-point sweep beside its database,
    and the report page."""
    pytest.importorskip("optuna")
    from ctbench.bench.sweep import make_sweep
    from ctbench.bench.sweep_study import run_sweep

    root = tmp_path_factory.mktemp("report")
    (root / "report-test.yaml").write_text(textwrap.dedent(SUITE))
    suite = load_suite(str(root / "report-test.yaml"))
    db = root / "ctbench.sqlite"
    assert run_suite(suite, root, db).failed == []
    sweep = make_sweep("mnist-mini-0.1/ibp", ["optim.lr=1e-3,5e-4"],
                       ["data.train_subset=128", "data.validation_size=64", "optim.epochs=1", "eps.ramp_end_epoch=1"])
    assert run_sweep(sweep, db).failed == []
    connection = connect(db, create=False)
    out = write_report(connection, suite, root / "report.html", storage_path(db))
    connection.close()
    return suite, db, out, sweep


def test_the_report_holds_the_tables_curves_counts_analyses_and_sweeps(report):
    suite, _, out, sweep = report
    text = out.read_text()
    page = Page(text)
    assert page.open == [] and page.unbalanced == []
    assert "Table 1, suite report-test: accuracy [%]" in text and "Table 8, suite report-test: wall time [s]" in text
    assert "Reference impl. (mnist-mini) Nat." in page.cells  # the literature beside ours
    assert {"IBP", "PGD", "falsified: attack", "wrong", "utilization", "tightness"} <= set(page.cells)
    assert "mnist-mini-0.1/ibp seed 0" in page.cells and "mnist-mini-0.1/pgd seed 0" in page.cells
    assert sweep.study in text and "optim.lr=0.001" in page.cells and "optim.lr=0.0005" in page.cells
    for fact in (ctbench.__version__, "torch", "git commit", "device", "date"):
        assert fact in page.cells
    # figures: stage counts, 2 training curves, Figures 4 and 5, the sweep's front
    assert len(page.images) == 6
    for uri in page.images:
        assert uri.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert image.format == "PNG" and image.size[0] > 300
    assert "Figure 4: active neurons (utilization)" in text and "Figure 5: certified accuracy" in text


def test_without_verdicts_the_stage_counts_come_from_the_summaries(report, tmp_path):
    """A database imported from an export without verdicts shows the same per-stage counts."""
    from ctbench.bench.report import stage_counts

    suite, db, _, _ = report
    copy = tmp_path / "no-verdicts.sqlite"
    with connect(db, create=False) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    connection = connect(copy, create=False)
    expected = stage_counts(connection, suite.jobs)
    assert expected and all(sum(counts.values()) == 16 for counts in expected.values())
    with connection:
        connection.execute("DELETE FROM verdicts")
    assert stage_counts(connection, suite.jobs) == expected
    connection.close()


def test_the_report_references_nothing_outside_itself(report):
    page = Page(report[2].read_text())
    assert page.links and all(link.startswith(("data:", "#")) for link in page.links)
    assert not [link for link in page.links if "http://" in link or "https://" in link]
    assert "<script" not in report[2].read_text()


def test_html_tables_mark_the_best_and_escape_text():
    table = Table("T <1>", "%", [Column("ours_natural", "Ours", "natural", True)],
                  [Row("s", "ibp", cells={"ours_natural": Value(99.0, 0.5, 2)}),
                   Row("s", "sabr", cells={"ours_natural": Value(98.0)})], best={(0, "ours_natural")},
                  notes=["a & b"])
    html = render(table, "html")
    assert '<td><b class="best">99.00 ± 0.50</b></td>' in html and "<td>98.00</td>" in html
    assert "<caption>T &lt;1&gt;</caption>" in html and "<li>a &amp; b</li>" in html


def test_report_command_writes_the_page_and_names_a_missing_database(report, tmp_path, capsys):
    suite, db, _, _ = report
    out = tmp_path / "page.html"
    assert main(["bench", "report", str(suite.path), "--db", str(db), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and "<h1>ctbench report: suite report-test</h1>" in out.read_text()
    assert main(["bench", "report", str(suite.path), "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no results database" in capsys.readouterr().err
    assert main(["bench", "report", str(suite.path), "--db", str(db), "--figures", str(tmp_path / "nothing")]) == 2
    assert "--figures" in capsys.readouterr().err


def test_report_embeds_the_figures_of_a_folder(report, tmp_path):
    suite, db, _, _ = report
    Image.new("RGB", (40, 30), "red").save(tmp_path / "fig3_unstable_neurons.png")
    (tmp_path / "fig3_unstable_neurons.svg").write_text("<svg/>")
    (tmp_path / "only.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    connection = connect(db, create=False)
    page = Page(write_report(connection, suite, tmp_path / "page.html", figure_dirs=[tmp_path]).read_text())
    connection.close()
    assert len(page.images) == 6 - 1 + 2  # no sweep storage given; one PNG, and the SVG without a PNG twin
    assert page.images[-1].startswith("data:image/svg+xml;base64,")


# ----------------------------------------------------------------------------------------------
# a real browser


@pytest.fixture(scope="module")
def browser() -> str:
    """Chromium's path; the tests that need it skip (before the report is built) without it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium or chromium-browser on PATH (Debian: apt-get install chromium)")
    return found


def browse(browser: str, url: str, *options: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
               "--window-size=1400,2000", *options, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_headless_browser_renders_the_page_without_console_errors(browser, report, tmp_path):
    out = report[2]
    screenshot = tmp_path / "page.png"
    shown = browse(browser, out.as_uri(), f"--screenshot={screenshot}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert [line for line in shown.stderr.splitlines() if ":CONSOLE" in line] == []
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1400, 2000) and len(image.getcolors(maxcolors=1 << 24)) > 1


def test_every_figure_decodes_in_the_browser(browser, report, tmp_path):
    probe = tmp_path / "probe.html"  # the page, with a script that counts the images the browser decoded
    script = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-decoded', "
              "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length + '/' + "
              "document.images.length));</script>")
    probe.write_text(report[2].read_text().replace("</body>", script + "</body>"))
    dumped = browse(browser, probe.as_uri(), "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert 'data-decoded="6/6"' in dumped.stdout
    assert dumped.stdout.count("<tr>") == report[2].read_text().count("<tr>")
