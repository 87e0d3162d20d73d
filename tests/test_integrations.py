"""Third-party internals (lmprobe.integrations): each library's internals are where lmprobe
expects them, and the installed release is one they were checked against. A new release of
any of them fails here, loudly, before it changes a result somewhere else."""

from __future__ import annotations

import importlib
from importlib.metadata import version

import pytest

LIBRARIES = {  # integration module: distribution
    "sklearn": "scikit-learn",
    "nnsight": "nnsight",
    "torch": "torch",
    "torchmetrics": "torchmetrics",
    "transformers": "transformers",
    "lightning": "lightning",
}


@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_the_internals_are_there_in_a_checked_release(name):
    module = importlib.import_module(f"lmprobe.integrations.{name}")
    installed = version(LIBRARIES[name])
    assert module.check() == [], (
        f"{LIBRARIES[name]} {installed} lacks internals lmprobe uses: {module.check()}; "
        f"see lmprobe/integrations/{name}.py"
    )
    release = ".".join(installed.split("+")[0].split(".")[:2])
    assert release in module.TESTED, (
        f"{LIBRARIES[name]} {installed} was not checked with lmprobe "
        f"(lmprobe.integrations.{name}.TESTED = {module.TESTED}): run the tests that use its "
        f"internals (this file, tests/test_golden.py, tests/test_probes.py, "
        f"tests/test_features.py), then add {release!r} to TESTED"
    )


def test_check_reports_missing_internals(monkeypatch):
    """check() is not a constant: each one sees a moved internal."""
    from lmprobe.integrations import nnsight, sklearn

    monkeypatch.setattr(sklearn, "_sgd_module", None)
    assert sklearn.check() == ["sklearn.linear_model._stochastic_gradient.fit_binary"]
    monkeypatch.setattr(nnsight, "_STATE", None)
    assert "nnsight.intervention.source.STATE" in nnsight.check()
