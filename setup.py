"""The package list, which pyproject.toml cannot express (everything else is there).

scripts/ holds the ``ceremony`` command and the benchmarks. In a checkout it is run as
``python -m scripts.ceremony``; installed, it must not take the name ``scripts`` (too generic
for site-packages), so it installs as ``hospital_ceremony`` (the ``ceremony`` entry point).
Its modules import each other relatively, so both names work. The other packages are found
as pyproject.toml's ``packages.find`` found them (namespace packages included).
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["secagg*", "peer*", "dashboard*"]),
        "hospital_ceremony",
    ],
    package_dir={"hospital_ceremony": "scripts"},
)
