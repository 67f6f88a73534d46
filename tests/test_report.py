"""The HTML report: files, and a real headless Chromium that renders every image."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from filterdb_dask import analyze
from filterdb_dask.errors import AnalysisError
from filterdb_dask.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report_dir(synth_store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report") / "out")
    # producer has missing values: its labels once crashed the report
    res = analyze(synth_store, by=["Task", "Visual Category", "depth decile", "model",
                                   "producer"], verbosity=0)
    res.write(out)
    write_report(out)
    return out


def test_report_files(report_dir):
    html = open(os.path.join(report_dir, "report.html")).read()
    plots = sorted(os.listdir(os.path.join(report_dir, "plots")))
    for name in ["eigenimages.png", "explained_variance.png", "coef_covariance.png",
                 "kl_task.png", "kl_visual_category.png", "kl_depth_decile.png", "drift.png",
                 "density_2d.png", "quality.png", "ridge_task.png", "kl_producer.png"]:
        assert name in plots
    assert html.count("data:image/png;base64,") == len(plots)
    assert "Most degenerated layers" in html and "60,000" in html


def test_report_needs_an_analysis_dir(tmp_path):
    with pytest.raises(AnalysisError, match="is not an analysis directory"):
        write_report(str(tmp_path))


def assert_renders(report_html: str, tmp_path) -> None:
    """Headless Chromium loads ``report_html`` with every image decoded, and its
    screenshot is a real page (tall, not blank)."""
    import matplotlib.image as mpimg

    page = open(report_html, encoding="utf-8").read()
    probe = page.replace("</body>", "<script>var im=[...document.images];document.title="
                         "im.every(i=>i.complete&&i.naturalWidth>0)?'ALL_OK:'+im.length:"
                         "'BROKEN';</script></body>")
    probe_path = tmp_path / "probe.html"
    probe_path.write_text(probe, encoding="utf-8")
    profile = str(tmp_path / "profile")
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                          "--virtual-time-budget=10000", "--dump-dom", probe_path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    n_img = page.count("<img ")
    assert n_img > 0
    assert f"<title>ALL_OK:{n_img}</title>" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2400",
                    f"--screenshot={shot}", "file://" + os.path.abspath(report_html)],
                   capture_output=True, timeout=120)
    img = mpimg.imread(shot)
    assert img.shape[0] > 1000 and float(np.std(img[..., :3])) > 0.05


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    assert_renders(os.path.join(report_dir, "report.html"), tmp_path)


def test_report_and_results_from_results_zarr_alone(synth_store, report_dir, tmp_path, capsys):
    from filterdb_dask.resultset import Results
    from filterdb_dask.run import main

    d = tmp_path / "only-zarr"
    shutil.copytree(report_dir, d)
    shutil.rmtree(d / "plots")
    shutil.rmtree(d / "kl")
    for f in os.listdir(d):
        if f.endswith((".csv", ".json", ".html")):
            os.remove(d / f)
    assert sorted(os.listdir(d)) == ["results.zarr"]
    assert main(["-q", "report", str(d)]) == 0
    assert (d / "report.html").exists() and (d / "plots" / "kl_task.png").exists()
    mem = analyze(synth_store, verbosity=0)
    back = Results.open(d)
    for by in ["Paper", "Training-Dataset", "op_set"]:  # groupings the set never had
        pd.testing.assert_frame_equal(back.kl_matrix(by), mem.kl_matrix(by))
    for g in mem.groupings:
        pd.testing.assert_frame_equal(back.kl[g.slug], mem.kl[g.slug])
    np.testing.assert_array_equal(back.bin_edges, mem.bin_edges)
    pd.testing.assert_frame_equal(back.quality, mem.quality)
    pd.testing.assert_frame_equal(back.meta, mem.meta)


def test_report_of_a_missing_dir_says_so(tmp_path, capsys):
    from filterdb_dask.run import main

    assert main(["report", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.strip().endswith("does not exist")


def test_a_killed_writers_leftovers_are_removed_by_the_next_write(synth_store, tmp_path):
    from filterdb_dask.resultset import _sibling_prefix

    res = analyze(synth_store, verbosity=0)
    out = tmp_path / "res"
    # what a writer killed mid-write leaves: its temporary sibling, named by its (now
    # dead) process; a live writer's sibling, another user's and a link must stay
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / (_sibling_prefix(str(out), "writing").replace(
        f"-{os.getpid()}-", f"-{dead.pid}-") + "x1")
    (stale / "results.zarr").mkdir(parents=True)
    live = tmp_path / (_sibling_prefix(str(out), "writing") + "x2")
    live.mkdir()
    link = tmp_path / (_sibling_prefix(str(out), "writing").replace(
        f"-{os.getpid()}-", f"-{dead.pid}-") + "x3")
    link.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_text("x")
    res.write(out)
    assert not stale.exists()
    assert live.is_dir() and link.is_symlink() and (tmp_path / "elsewhere" / "keep").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["res", live.name, link.name, "elsewhere"])
