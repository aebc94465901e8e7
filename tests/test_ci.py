"""Under CI (CI=true) the real-model, real-data and browser tests must run: a skip of one fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SKIPPING = """
import pytest

@pytest.mark.integration
def test_real_model():
    pytest.skip("no model here")

@pytest.mark.browser
def test_browser():
    pytest.skip("no chromium here")

def test_real_data(real_data):
    pass

def test_optional_extra():
    pytest.skip("an ordinary skip")
"""


# Under CI the two marked tests fail, the real-data fixture's skip is an error, and the ordinary skip stays one.
@pytest.mark.parametrize("ci, failed, errors, skipped", [("true", 2, 1, 1), ("", 0, 0, 4)])
def test_a_skipped_real_world_test_fails_under_ci(pytester, monkeypatch, ci, failed, errors, skipped):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(SKIPPING)
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("ED_DATA_DIR", str(pytester.path / "no-data-here"))
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(
        failed=failed, errors=errors, skipped=skipped)


def load_audit():
    """.ci/audit.py as a module (it is a CI script, not part of the package)."""
    import importlib.util

    from chatbot.runtime import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("audit", PROJECT_ROOT / ".ci" / "audit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLEAN = {"name": "numpy", "version": "2.0", "vulns": []}
VULNERABLE = {"name": "gradio", "version": "1.0", "vulns": [{"id": "GHSA-x", "fix_versions": ["1.1"]}]}
UNCHECKED = {"name": "torch", "version": "2.13.0", "skip_reason": "Dependency not found on PyPI"}


@pytest.mark.parametrize("dependencies, code, verdict", [
    ([CLEAN], 0, "AUDIT PASSED: all 1 packages checked"),
    ([CLEAN, VULNERABLE, UNCHECKED], 1, "AUDIT FAILED: 1 known vulnerabilities"),
    ([CLEAN, UNCHECKED], 3, "AUDIT NOT DONE: 1 of 2 packages could not be checked"),
    ([UNCHECKED], 3, "AUDIT NOT DONE: 1 of 1 packages could not be checked (none was checked)"),
    (None, 3, "AUDIT NOT DONE: pip-audit could not run"),
])
def test_audit_says_what_was_not_checked_and_never_passes_without_checking(monkeypatch, capsys, dependencies, code,
                                                                           verdict):
    import json

    audit = load_audit()

    def pip_audit(args, report):
        if dependencies is not None:
            report.write_text(json.dumps({"dependencies": dependencies}))
        return 1, "no service"

    monkeypatch.setattr(audit, "run_pip_audit", pip_audit)
    assert audit.main([]) == code
    out = capsys.readouterr().out
    assert verdict in out
    assert ("NOT CHECKED  torch: Dependency not found" in out) == (dependencies is not None and UNCHECKED in dependencies)
    assert ("PASSED" in out) == (code == 0)
