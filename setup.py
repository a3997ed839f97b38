"""Builds the package; pyproject.toml holds everything but the package list, which needs code.

The code is every package under insights/. The dashboard's files stay at the top of the repository
(static/, templates/) and ship as the data packages insights.static and insights.templates
(pyproject.toml maps them onto those folders), so an installed package serves its page too."""
import os

from setuptools import find_packages, setup


def page_packages(folder: str) -> list[str]:
    """insights.<folder> and one package per subfolder (static/js -> insights.static.js)."""
    return ["insights." + path.replace(os.sep, ".") for path, _dirs, _files in os.walk(folder)
            if not os.path.basename(path).startswith((".", "__"))]


setup(packages=find_packages(include=["insights", "insights.*"]) + page_packages("static") + page_packages("templates"))
