"""setup.cfg lists its packages by name (package_dir maps two folders): a package added under
agent/ or trainer/ and not listed there is missing from `pip install .` (an editable install
would still find it, so nothing else notices)."""
from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_package_in_the_tree_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    roots = dict(line.split("=", 1) for line in cfg["options"]["package_dir"].split("\n") if "=" in line)
    found = set()
    for name, folder in ((n.strip(), f.strip()) for n, f in roots.items()):
        base = REPO / folder
        for init in base.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            parts = init.parent.relative_to(base).parts
            found.add(".".join((name, *parts)))
    assert found == listed, {"not listed": sorted(found - listed), "not a package": sorted(listed - found)}
