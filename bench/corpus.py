"""The pre-training corpus for the quality study: the English prose of the Python 3.11 documentation, taken from
Debian's `python3.11-doc` package (its reStructuredText sources; PSF documentation licence). It is real
natural-language text and shares nothing with the fine-tuning tasks.

    python bench/corpus.py --out .quality/corpus.txt      # apt-get download + extract + clean (~8 MB of text)
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"


def clean(rst: str) -> str:
    """Paragraphs of prose: code blocks (indented after '::'), directives, tables and markup dropped."""
    out, skip_indented = [], False
    for line in rst.splitlines():
        stripped = line.strip()
        if skip_indented:
            if stripped and not line.startswith((" ", "\t")):
                skip_indented = False
            else:
                continue
        if stripped.startswith(".. ") or re.fullmatch(r"[=\-~^*#+`:.'\"]{3,}", stripped) or stripped.startswith(("|", "+-", ">>>", "...")):
            skip_indented = stripped.startswith(".. ")
            continue
        if stripped.endswith("::"):
            skip_indented = True
            stripped = stripped[:-1]
        stripped = re.sub(r":[a-z:]+:`~?([^`<]*?)(?: <[^>]*>)?`", r"\1", stripped)  # :func:`name` -> name
        stripped = re.sub(r"[`*]+", "", stripped)
        out.append(stripped)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".quality/corpus.txt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "-qq", PACKAGE], cwd=tmp, check=True)
        deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), f"{tmp}/x"], check=True)
        sources = sorted(Path(tmp, "x").rglob("_sources/**/*.rst.txt"))
        pages = [clean(p.read_text(errors="ignore")) for p in sources]
    text = "\n\n".join(p for p in pages if len(p) > 200)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"{len(sources)} pages, {len(text) / 1e6:.1f} MB of text -> {args.out}")


if __name__ == "__main__":
    main()
