"""The pre-training corpus for the quality study: real English text from three Debian packages, none of which
shares anything with the fine-tuning tasks.

- `dict-gcide`: the GNU Collaborative International Dictionary of English (Webster's 1913 and WordNet glosses,
  with quotations from English literature; GPL). Definitions and quotations, markup stripped.
- `wordnet-base`: Princeton WordNet 3.0 glosses and example sentences (WordNet licence), "word: gloss; example".
- `python3.11-doc`: the prose of the Python 3.11 documentation (its reStructuredText sources; PSF licence).

    python bench/corpus.py --out .quality/corpus.txt      # apt-get download + extract + clean (~40 MB of text)

Paragraphs are separated by blank lines; the pre-training script puts BOS/EOS around each.
"""
from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import tempfile
from pathlib import Path

PACKAGES = ("dict-gcide", "wordnet-base", "python3.11-doc")
PARAGRAPH_CHARS = 1200  # short dictionary blocks are joined into paragraphs of about this size


def clean_rst(rst: str) -> str:
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


def clean_gcide_block(block: str) -> str:
    """One blank-line-separated block of the dictd text -> plain prose (pronunciations, etymologies, source
    tags, cross-reference braces and author attributions removed)."""
    text = " ".join(block.split())
    text = re.sub(r"\\[^\\]*\\", "", text)            # \Af*fect"\ pronunciation
    text = re.sub(r"\[[^\]]*\]", "", text)            # [L. affectus ...], [1913 Webster], [Obs.]
    text = re.sub(r"--\s?[A-Z][\w.']*(?:\s[A-Z][\w.']*)*\.?", "", text)  # --Milton., --Sir W. Scott.
    text = text.replace("{", "").replace("}", "")
    text = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s{2,}", " ", text))
    return text.strip(" ,;")


def gcide_paragraphs(dictionary_text: str) -> list[str]:
    start = dictionary_text.find("\nA \\A\\")  # first real entry; before it: database info and licence text
    blocks = [clean_gcide_block(b) for b in re.split(r"\n\s*\n", dictionary_text[max(start, 0):])]
    return join_short([b for b in blocks if len(b) > 20 and "GCIDE" not in b])


def wordnet_paragraphs(data_file: str) -> list[str]:
    """'lemma, lemma: gloss; "example"' per synset, from a WordNet data.* file."""
    lines = []
    for line in data_file.splitlines():
        if not line[:1].isdigit() or " | " not in line:
            continue
        fields, gloss = line.split(" | ", 1)
        parts = fields.split()
        count = int(parts[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in parts[4:4 + 2 * count:2]]
        lines.append(f"{', '.join(lemmas)}: {gloss.strip()}")
    return join_short(lines, separator="\n")


def join_short(blocks: list[str], separator: str = " ") -> list[str]:
    paragraphs, current = [], ""
    for block in blocks:
        current = f"{current}{separator}{block}" if current else block
        if len(current) >= PARAGRAPH_CHARS:
            paragraphs.append(current)
            current = ""
    return paragraphs + ([current] if current else [])


def extract(package: str, tmp: Path) -> Path:
    subprocess.run(["apt-get", "download", "-qq", package], cwd=tmp, check=True)
    deb = next(tmp.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(tmp / package)], check=True)
    return tmp / package


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".quality/corpus.txt")
    args = parser.parse_args()
    sources = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        gcide = extract("dict-gcide", tmp)
        with gzip.open(next(gcide.rglob("gcide.dict.dz")), "rt", encoding="utf-8", errors="ignore") as f:
            sources["dict-gcide"] = gcide_paragraphs(f.read())
        wordnet = extract("wordnet-base", tmp)
        sources["wordnet-base"] = [p for kind in ("noun", "verb", "adj", "adv")
                                   for p in wordnet_paragraphs(next(wordnet.rglob(f"data.{kind}")).read_text(errors="ignore"))]
        docs = extract("python3.11-doc", tmp)
        pages = [clean_rst(p.read_text(errors="ignore")) for p in sorted(docs.rglob("_sources/**/*.rst.txt"))]
        sources["python3.11-doc"] = [p for p in pages if len(p) > 200]
    # Interleave the sources in fixed-size slices so the held-out tail (last 2%) samples all of them.
    paragraphs = []
    for index in range(0, max(map(len, sources.values())), 50):
        for items in sources.values():
            paragraphs += items[index:index + 50]
    text = "\n\n".join(paragraphs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    for package, items in sources.items():
        print(f"{package}: {len(items)} paragraphs, {sum(map(len, items)) / 1e6:.1f} MB")
    print(f"{len(text) / 1e6:.1f} MB of text -> {args.out}")


if __name__ == "__main__":
    main()
