"""Audit requirements.txt for known vulnerabilities with pip-audit and print a report (`make audit`).

Exit status: 0 when every package was checked and none has a known vulnerability (not listed with
--ignore-vuln); 1 when one has; 3 when some or all packages could not be checked (the vulnerability service
out of reach): the audit was not done, which is not a pass, though pip-audit itself would print "No known
vulnerabilities found" for packages it never checked. Each package not checked is listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requirements", default=str(ROOT / "requirements.txt"), help="requirements file to audit")
    parser.add_argument("--service", default="pypi", choices=["pypi", "osv"],
                        help="vulnerability service pip-audit asks (pypi: the PyPI JSON API; osv: api.osv.dev)")
    parser.add_argument("--ignore-vuln", action="append", default=[],
                        help="an advisory id to accept (repeatable); say why beside it where it is passed")
    parser.add_argument("--timeout", type=int, default=900, help="seconds pip-audit may take (it resolves the "
                                                                   "requirements in a temporary virtualenv)")
    return parser.parse_args(argv)


def run_pip_audit(args: argparse.Namespace, report: Path) -> tuple[int, str]:
    """Run pip-audit with a JSON report; returns its exit status and the tail of its error output."""
    command = [sys.executable, "-m", "pip_audit", "-r", args.requirements, "-s", args.service, "-f", "json",
               "-o", str(report), "--progress-spinner", "off"]
    for vuln in args.ignore_vuln:
        command += ["--ignore-vuln", vuln]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return -1, str(err)
    return done.returncode, "\n".join(done.stderr.strip().splitlines()[-3:])


def summarise(report: dict) -> tuple[list[str], list[str], int]:
    """(one line per vulnerability, one line per package not checked, packages checked)."""
    found, skipped, checked = [], [], 0
    for dep in report.get("dependencies", []):
        if "skip_reason" in dep:
            skipped.append(f"{dep['name']}: {dep['skip_reason']}")
            continue
        checked += 1
        for vuln in dep.get("vulns", []):
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            found.append(f"{dep['name']} {dep.get('version', '?')}: {vuln['id']} (fixed in: {fixes})")
    return found, skipped, checked


NOT_CHECKED = 3


def main(argv: list[str] | None = None) -> int:
    """Audit and print the report: 0 checked and clean, 1 vulnerable, 3 not (fully) checked."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "audit.json"
        status, errors = run_pip_audit(args, path)
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            print(f"AUDIT NOT DONE: pip-audit could not run (exit {status}): {errors}\n"
                  "No package was checked; this is not a pass.")
            return NOT_CHECKED
    found, skipped, checked = summarise(report)
    total = checked + len(skipped)
    ignoring = f" (ignoring {', '.join(args.ignore_vuln)})" if args.ignore_vuln else ""
    print(f"Dependency audit of {args.requirements} ({args.service}){ignoring}:")
    for line in found:
        print(f"  VULNERABLE   {line}")
    for line in skipped:
        print(f"  NOT CHECKED  {line}")
    if found:
        print(f"AUDIT FAILED: {len(found)} known vulnerabilities in {checked} checked packages "
              f"({len(skipped)} of {total} not checked)")
        return 1
    if skipped:
        clean = f"the {checked} checked have no known vulnerability" if checked else "none was checked"
        print(f"AUDIT NOT DONE: {len(skipped)} of {total} packages could not be checked ({clean}). This is not a pass.")
        return NOT_CHECKED
    print(f"AUDIT PASSED: all {total} packages checked, no known vulnerabilities")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
