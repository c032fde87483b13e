"""Copy the quick-mode table of benchmarks/results/quality.md into README.md (the table under "Quality").

    python scripts/sync_readme_quality.py

The README's table is the lines from its header row `| model | setting | full precision | RTN` to the first
line that is not a table row; quality.md's is the one under `## quick mode`.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| model | setting | full precision | RTN"


def table(lines, start):
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return start, end


def main():
    q = (ROOT / "benchmarks/results/quality.md").read_text().split("\n")
    at = next(i for i, l in enumerate(q) if l.startswith("## quick mode"))
    qs, qe = table(q, next(i for i in range(at, len(q)) if q[i].startswith(HEADER)))
    readme = ROOT / "README.md"
    r = readme.read_text().split("\n")
    rs, re_ = table(r, next(i for i, l in enumerate(r) if l.startswith(HEADER)))
    r[rs:re_] = q[qs:qe]
    readme.write_text("\n".join(r))
    print(f"README: {re_ - rs} table lines replaced by {qe - qs}")


if __name__ == "__main__":
    main()
