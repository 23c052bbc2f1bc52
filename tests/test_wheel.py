"""The wheel carries the chart, so `kubetrain render` works after a plain `pip install`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from support import REPO


def test_render_from_the_built_wheel_outside_the_checkout(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO), "-w", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next(tmp_path.glob("kubetrain-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "trainer" / "chart" / "templates" / "pytorchjob.yaml").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import trainer.chart, sys; from trainer.controller.cli import main; "
            "print('chart at', trainer.chart.chart_dir()); sys.exit(main(['render', 'wheel-demo', '--skip-tests']))")
    rendered = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert f"chart at {site / 'trainer' / 'chart'}" in rendered.stdout
    assert "kind: PyTorchJob" in rendered.stdout and "name: wheel-demo" in rendered.stdout
