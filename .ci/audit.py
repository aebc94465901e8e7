"""Audit requirements.txt for known vulnerabilities with pip-audit and print a report (`make audit`).

Exit status: 1 when a known vulnerability is found (not listed with --ignore-vuln); 0 otherwise, including
when the vulnerability service cannot be reached: then the report says loudly that the audit is incomplete,
because pip-audit itself would print "No known vulnerabilities found" for packages it never checked.
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


def main(argv: list[str] | None = None) -> int:
    """Audit, print the report, and fail only on known vulnerabilities."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "audit.json"
        status, errors = run_pip_audit(args, path)
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            print(f"WARNING: the dependency audit could not run (pip-audit exit {status}): {errors}\n"
                  "Not failing: the vulnerability service is probably unreachable (offline?).")
            return 0
    found, skipped, checked = summarise(report)
    total = checked + len(skipped)
    print(f"Dependency audit of {args.requirements} ({args.service}): {checked} of {total} packages checked, "
          f"{len(found)} known vulnerabilities" + (f", ignoring {', '.join(args.ignore_vuln)}" if args.ignore_vuln else ""))
    for line in found:
        print(f"  VULNERABLE {line}")
    if skipped:
        print(f"WARNING: {len(skipped)} packages could not be checked, so this audit is incomplete, not clean. "
              f"First: {skipped[0]}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
