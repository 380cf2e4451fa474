"""pyproject.toml's extras never bring a torch build of their own."""

import re

from support import ROOT

PYPROJECT = ROOT / "pyproject.toml"


def _extras() -> dict[str, list[str]]:
    text = PYPROJECT.read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = {}
    for name, body in re.findall(r"^(\w+)\s*=\s*\[(.*?)\]", section, flags=re.M | re.S):
        extras[name] = [
            re.split(r"[<>=!~\[ ]", d.strip())[0].lower() for d in re.findall(r'"([^"]+)"', body)
        ]
    return extras


def test_extras_keep_the_installed_torch_and_the_vision_extra_has_pillow():
    extras = _extras()
    assert {"dev", "vision"} <= extras.keys()
    for name, packages in extras.items():
        assert not {"torch", "torchvision", "torchaudio"} & set(packages), name
    assert {"pillow", "scipy"} <= set(extras["vision"])
