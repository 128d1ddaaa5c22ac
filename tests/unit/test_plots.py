"""The pictures: `make plots` (bench/autoscale.py --plot, mulambda simulate --suite --plot)
and `mulambda simulate --plot` write real PNGs with something drawn in them."""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mulambda.tools import simulate
from mulambda.tools.plots import ScalingPoint, SelectorPoint, plot_scaling_day, plot_selectors

REPO = Path(__file__).resolve().parents[2]


def assert_picture(path: Path, min_size: tuple[int, int] = (800, 300)) -> None:
    """A valid PNG of at least ``min_size`` pixels, with lines and colours in it: not a
    blank canvas, not a single-colour block."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()  # checksums of every chunk
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        assert rgb.size[0] >= min_size[0] and rgb.size[1] >= min_size[1], rgb.size
        small = rgb.resize((rgb.size[0] // 2, rgb.size[1] // 2))
        raw = small.tobytes()
    pixels = [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]
    colours = set(pixels)
    drawn = sum(1 for p in pixels if p != (255, 255, 255)) / len(pixels)
    assert len(colours) > 50, f"{path}: only {len(colours)} colours"
    assert drawn > 0.03, f"{path}: {drawn:.1%} of the picture drawn"
    coloured = sum(1 for r, g, b in pixels if max(r, g, b) - min(r, g, b) > 60)
    assert coloured > 200, f"{path}: no coloured lines ({coloured} pixels)"


@pytest.mark.timeout(240)
def test_make_plots_draws_the_readme_pictures(tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed (.ci/run installs it)")
    out = subprocess.run(
        [make, "-C", str(REPO), "plots", f"PLOTS_DIR={tmp_path}", "PLOT_HOURS=0.25",
         # Fast settings: two loads of one placement, three routers.
         "PLOT_SUITE=--requests 150 --placements one-node --loads 0.25,0.75 "
         "--selectors mulambda-sdk,oracle,round-robin",
         f"PYTHON={sys.executable}", f"MULAMBDA={sys.executable} -m mulambda"],
        capture_output=True, text=True, timeout=230, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "autoscale-day.png", "autoscale-tasks.png", "simulate-suite.png"]
    for png in tmp_path.glob("*.png"):
        assert_picture(png)
    assert "replica-h" in out.stdout  # the benchmark's table is still printed


def test_the_committed_pictures_are_the_ones_the_readme_shows() -> None:
    readme = (REPO / "README.md").read_text()
    for name in ("autoscale-day.png", "simulate-suite.png"):
        assert f"docs/img/{name}" in readme, name
    for png in ("autoscale-day.png", "autoscale-tasks.png", "simulate-suite.png"):
        assert_picture(REPO / "docs" / "img" / png)


def test_simulate_plot_draws_one_scenario(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    simulate.configure(parser)
    args = parser.parse_args(["--requests", "300", "--selectors",
                              "mulambda-sdk,round-robin,oracle", "--plot", str(tmp_path)])
    assert simulate.run(args) == 0
    assert_picture(tmp_path / "simulate.png", min_size=(800, 250))


def test_same_figures_same_file(tmp_path: Path) -> None:
    day = [ScalingPoint(h / 4, 100 * math.sin(h / 30) ** 2, h % 7, max(0, h % 7 - 1), h % 11)
           for h in range(96)]
    first = plot_scaling_day({"a": day, "b": day[::-1]}, tmp_path / "one.png")
    second = plot_scaling_day({"a": day, "b": day[::-1]}, tmp_path / "two.png")
    assert first.read_bytes() == second.read_bytes()
    assert_picture(first)


@pytest.mark.parametrize("policies", [{}, {"empty": []}])
def test_a_day_without_samples_is_refused(tmp_path: Path, policies: dict) -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        plot_scaling_day(policies, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_missing_figures_leave_gaps_not_errors(tmp_path: Path) -> None:
    """A router without requests for a client (NaN figures) or absent from a scenario."""
    groups = {"kind": {
        "low": {"a": SelectorPoint(10, 20, 0.9), "b": SelectorPoint(math.nan, math.nan,
                                                                   math.nan)},
        "high": {"a": SelectorPoint(30, 90, 0.8)},
    }}
    assert_picture(plot_selectors(groups, tmp_path / "s.png"), min_size=(800, 250))
