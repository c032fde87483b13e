"""Text sources, calibration rows and perplexity windows.

Sources (`load_text(source)` returns a list of documents):

    wiki        106 English Wikipedia articles (~3 MB) from the XML excerpt in the gensim 4.4.0 wheel,
                markup stripped, each article starting with " = Title = " as in WikiText.
                The WikiText-2 stand-in: evaluation text.
    wiki-eval   the first 90% of the wiki articles  } disjoint halves (split_for_calibration), for
    wiki-calib  the last 10% of the wiki articles   } "calibrate on wiki, evaluate on other wiki"
    lee         300 Australian news articles from the same wheel. The Pile-val stand-in: calibration.
    austen      six Jane Austen novels (Debian r-cran-janeaustenr), one document per novel
    mobydick    Moby Dick (Debian r-cran-tokenizers), one document
    PATH        .txt (paragraphs separated by blank lines; a file without blank lines: one per line),
                .jsonl (one JSON object with a "text" field per line), .json (a list of strings or of
                objects with "text"); any other existing file is read as .txt
    [hf:]NAME[:CONFIG][@SPLIT]
                a Hugging Face dataset through `datasets` (split defaults to "train", column "text"),
                e.g. "wikitext:wikitext-2-raw-v1@test". Rows are kept as they are (empty rows too), so
                that "\\n\\n".join(rows) is the usual WikiText-2 perplexity text.

Evaluation protocol (eval_windows; see /work/shared/assets.md): join the documents with "\\n\\n",
tokenize the whole text once without special tokens, cut non-overlapping windows of `seqlen` tokens
(the ragged tail is dropped), and prepend BOS to each window when the tokenizer adds BOS by default
(Gemma); that position is context only and is not scored. Perplexity = exp(mean NLL over scored
tokens). Quick mode keeps the first 64 windows.

Calibration (calibration_rows): 128 rows of 512 tokens cut at seeded uniform offsets from the
concatenated (EOS-joined) documents of the calibration source, by default `lee`.

Parsed built-in text and the token ids of evaluation text are cached under $SALIENCE_CACHE or
~/.cache/salience (subfolders text/ and tokens/); files are written to a temporary name and renamed,
so that a reader never sees a partial file.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import re
import struct
import tempfile
import warnings
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A text source is missing, malformed, empty, or needs a package that is not installed."""


# Bump when the parsing of a built-in source changes, so that stale caches are not read.
_TEXT_VERSION = 1
_WIKI_MEMBER = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_MEMBER = "test/test_data/lee_background.cor"
_R_DATA = {  # source -> (Debian package, R package, objects in the package's data)
    "austen": ("r-cran-janeaustenr", "janeaustenr",
               ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                "persuasion"]),
    "mobydick": ("r-cran-tokenizers", "tokenizers", ["mobydick"]),
}
BUILTIN_SOURCES = ("wiki", "wiki-eval", "wiki-calib", "lee", *_R_DATA)
_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def cache_dir() -> Path:
    """$SALIENCE_CACHE, else ~/.cache/salience."""
    return Path(os.environ.get("SALIENCE_CACHE") or Path.home() / ".cache" / "salience").expanduser()


def load_text(source: str) -> list[str]:
    """Return the documents of `source` (a built-in name, a file path, or a dataset name; see the
    module docstring). Raises DataError for a missing file, malformed or empty text, a missing
    optional package, or a dataset that cannot be fetched."""
    if source in BUILTIN_SOURCES:
        docs = _load_builtin(source)
    elif source.startswith("hf:"):
        docs = _load_hf(source[3:])
    elif Path(source).expanduser().exists():
        docs = _read_file(Path(source).expanduser())
    elif _looks_like_path(source):
        raise DataError(f"file not found: {source}")
    else:
        docs = _load_hf(source)
    if not any(d.strip() for d in docs):
        raise DataError(f"text source {source!r} contains no text")
    return docs


def split_for_calibration(docs: list[str], fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Split documents into (eval_docs, calib_docs): the last `fraction` of the documents (at least
    one) go to calibration, the rest to evaluation. Deterministic and disjoint, so a model calibrated
    on `wiki-calib` can be evaluated on `wiki-eval` without having seen its text. (The plain `wiki`
    source is the full text; use it only when calibrating on something else, e.g. `lee`.)"""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents to split, got {len(docs)}")
    n_calib = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
    return docs[:-n_calib], docs[-n_calib:]


# ---------------------------------------------------------------------------------------------
# Token ids


def calibration_rows(tokenizer, docs: list[str], n_rows: int = 128, seqlen: int = 512,
                     seed: int = 0) -> torch.Tensor:
    """[n_rows, seqlen] int64 token ids: windows of the concatenated documents (each tokenized
    without special tokens, joined by EOS, or by "\\n\\n" when the tokenizer has no EOS) starting at
    offsets drawn uniformly with torch.Generator().manual_seed(seed). Windows may overlap when the
    text is short; a warning is given below 4 * seqlen tokens."""
    encoded = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    sep = [eos] if eos is not None else _encode(tokenizer, "\n\n")
    ids: list[int] = []
    for i, doc_ids in enumerate(encoded):
        if i:
            ids.extend(sep)
        ids.extend(doc_ids)
    total = len(ids)
    if total < seqlen:
        raise DataError(f"calibration text has {total} tokens, fewer than seqlen={seqlen}")
    if total < 4 * seqlen:
        warnings.warn(f"calibration text has only {total} tokens for seqlen={seqlen}: "
                      f"the {n_rows} rows overlap heavily", stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (n_rows,), generator=gen)
    return torch.tensor(ids, dtype=torch.long)[starts[:, None] + torch.arange(seqlen)]


def eval_windows(tokenizer, docs: list[str], seqlen: int = 512, max_windows: int | None = None,
                 *, source: str = "text", cache: bool = True) -> tuple[torch.Tensor, int]:
    """Perplexity windows by the protocol in the module docstring: ([n, L] int64, n_prefix).
    L = seqlen + 1 with n_prefix = 1 (a BOS that is not scored) when the tokenizer adds BOS by
    default, else L = seqlen and n_prefix = 0. `max_windows` keeps the first windows (quick: 64).
    Token ids of the joined text are cached (`source` only names the cache file)."""
    text = "\n\n".join(docs)
    ids = _cached_ids(tokenizer, text, source) if cache else _encode(tokenizer, text)
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise DataError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}")
    windows = torch.as_tensor(np.asarray(ids[: n * seqlen], dtype=np.int64)).view(n, seqlen)
    bos = tokenizer.bos_token_id
    probe = _encode(tokenizer, "a", special=True)
    if bos is not None and probe and probe[0] == bos:
        return torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1), 1
    return windows, 0


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    # verbose=False: whole-text encodes exceed model_max_length on purpose; no warning wanted.
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def _cached_ids(tokenizer, text: str, source: str) -> np.ndarray:
    # The key names the tokenizer (path, class, size) and fingerprints it with a probe encoding,
    # so that two in-memory tokenizers without a path do not share an entry.
    probe = _encode(tokenizer, "The quick brown fox, 1984: naïve café!\n\n  x")
    key = json.dumps([source, tokenizer.name_or_path, type(tokenizer).__name__, len(tokenizer), probe,
                      hashlib.sha256(text.encode()).hexdigest()])
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", source)[:40]
    path = cache_dir() / "tokens" / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    if path.exists():
        try:
            ids = np.load(path, allow_pickle=False)
            if ids.ndim == 1:
                return ids
        except (OSError, ValueError):
            pass  # unreadable cache entry: recompute and overwrite it
    ids = np.asarray(_encode(tokenizer, text), dtype=np.int64)
    _atomic_write(path, lambda f: np.save(f, ids), binary=True)
    return ids


# ---------------------------------------------------------------------------------------------
# Files and datasets


def _looks_like_path(source: str) -> bool:
    # "owner/name" is a Hugging Face dataset id, so a single inner "/" is not enough to mean a path.
    return (source.lower().endswith(_FILE_SUFFIXES) or source.startswith(("/", ".", "~"))
            or source.count("/") > 1 or (os.sep != "/" and os.sep in source))


def _read_file(path: Path) -> list[str]:
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f'{path}, line {lineno}: expected an object with a string "text" field')
            docs.append(obj["text"])
    elif suffix == ".json":
        try:
            items = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(items, list):
            raise DataError(f'{path}: expected a list of strings or of objects with "text"')
        docs = []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                item = item.get("text")
            if not isinstance(item, str):
                raise DataError(f'{path}: item {i} is neither a string nor an object with string "text"')
            docs.append(item)
    else:
        # Blank lines separate documents; a file with none has one document per line (e.g. lee).
        if re.search(r"\n[ \t]*\n", text.strip()):
            docs = [d.strip() for d in re.split(r"\n[ \t]*\n", text)]
        else:
            docs = [line.strip() for line in text.splitlines()]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path} contains no text")
    return docs


def _load_hf(spec: str) -> list[str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    split = split or "train"
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{spec!r} is not a built-in source ({', '.join(BUILTIN_SOURCES)}) or an "
                        "existing file; to load it as a Hugging Face dataset: pip install datasets")
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 -- network, hub and config errors all mean "not available"
        raise DataError(f"could not fetch Hugging Face dataset {name!r} (config={config or None}, "
                        f"split={split!r}); offline, or a wrong name? (not a local file either) "
                        f"{type(e).__name__}: {e}") from None
    if "text" not in ds.column_names:
        raise DataError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"])


# ---------------------------------------------------------------------------------------------
# Built-in sources


def _load_builtin(source: str) -> list[str]:
    if source in ("wiki-eval", "wiki-calib"):
        eval_docs, calib_docs = split_for_calibration(_load_builtin("wiki"))
        return calib_docs if source == "wiki-calib" else eval_docs
    path = cache_dir() / "text" / f"{source}.v{_TEXT_VERSION}.json"
    if path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # unreadable cache entry: parse again and overwrite it
    if source == "wiki":
        docs = parse_wiki_dump(_gensim_file(_WIKI_MEMBER))
    elif source == "lee":
        docs = _read_file(_gensim_file(_LEE_MEMBER))
    else:
        docs = _load_r_text(source)
    _atomic_write(path, lambda f: json.dump(docs, f, ensure_ascii=False))
    return docs


def _atomic_write(path: Path, write, binary: bool = False) -> None:
    """Write via a temporary file in the same folder and os.replace it into place. A cache that
    cannot be written (read-only home) only costs speed, so it warns instead of failing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        warnings.warn(f"cannot write cache file {path}: {e}", stacklevel=3)
        return
    try:
        with open(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _gensim_file(member: str) -> Path:
    # find_spec of a top-level package locates it without importing it (gensim imports scipy etc.).
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the wiki and lee texts ship in the gensim wheel: "
                        "pip install --no-deps gensim==4.4.0")
    path = Path(spec.submodule_search_locations[0]) / member
    if not path.exists():
        raise DataError(f"{path} is missing; this gensim is not 4.4.0? pip install --no-deps gensim==4.4.0")
    return path


# Wikipedia ----------------------------------------------------------------------------------

_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score", "graph",
              "hiero", "chem", "ce", "templatedata", "inputbox", "categorytree", "mapframe"}
_DROP_LINK_PREFIXES = {"file", "image", "media", "category"}
# Trailing sections that are lists of citations and links once templates are gone.
_DROP_SECTIONS = {"references", "external links", "see also", "notes", "further reading",
                  "bibliography", "sources", "footnotes", "citations", "notes and references"}


def parse_wiki_dump(path: str | os.PathLike) -> list[str]:
    """Articles of a MediaWiki XML export (.xml.bz2) as clean text, one document per article.

    Keeps pages in namespace 0 that are not redirects; streams the XML (iterparse) so that large
    dumps need little memory. Each document is " = Title = " followed by the article text (see
    wikitext_to_text)."""
    docs = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rpartition("}")[2] != "page":
                continue
            fields = {child.tag.rpartition("}")[2]: child for child in elem}
            revision = {c.tag.rpartition("}")[2]: c for c in fields.get("revision", [])}
            title, ns = fields["title"].text or "", fields["ns"].text
            text = revision["text"].text if "text" in revision else None
            if ns == "0" and "redirect" not in fields and text:
                body = wikitext_to_text(text)
                if body:
                    docs.append(f" = {title} = \n{body}\n")
            elem.clear()  # free the page: the dump is streamed
    return docs


def wikitext_to_text(wikitext: str) -> str:
    """Strip wiki markup: drop templates, comments, <ref>s, tables, file/image/category and
    interlanguage links and the trailing reference/link sections; keep link texts and the text of
    formatting tags; headings become WikiText-style lines (" = = Heading = = "). Runs of blank lines
    collapse to one."""
    try:
        import mwparserfromhell
    except ImportError:
        raise DataError("parsing Wikipedia markup needs mwparserfromhell: "
                        "pip install mwparserfromhell") from None
    # skip_style_tags: an unbalanced '' (italic) otherwise makes the parser give up on whole
    # paragraphs and leave their refs and links as plain text; the quote runs are removed below.
    code = mwparserfromhell.parse(wikitext, skip_style_tags=True)
    text = _render(code, mwparserfromhell.nodes, top=True)
    text = re.sub(r"'{2,}|__[A-Z]+__", "", text)  # bold/italic quotes, magic words (__NOTOC__)
    lines = [line.strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _render(code, nodes, top: bool = False) -> str:
    out = []
    skip_level = 0  # > 0 while inside a dropped section of that heading level
    for node in code.nodes:
        if isinstance(node, nodes.Heading):
            title = _render(node.title, nodes).strip()
            if skip_level and node.level > skip_level:
                continue
            skip_level = node.level if top and title.lower() in _DROP_SECTIONS else 0
            if not skip_level:
                marks = "= " * node.level
                out.append(f" {marks}{title}{marks[::-1]} ")
        elif skip_level or isinstance(node, (nodes.Template, nodes.Comment, nodes.Argument)):
            continue
        elif isinstance(node, nodes.Text):
            out.append(node.value)
        elif isinstance(node, nodes.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, nodes.Tag):
            if str(node.tag).lower() == "br":
                out.append("\n")
            elif node.contents is not None and str(node.tag).lower() not in _DROP_TAGS:
                out.append(_render(node.contents, nodes))
        elif isinstance(node, nodes.Wikilink):
            target = str(node.title).strip()
            prefix = target.partition(":")[0].strip().lower() if ":" in target else ""
            interlanguage = node.text is None and re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", prefix)
            if prefix not in _DROP_LINK_PREFIXES and not interlanguage:
                out.append(_render(node.text if node.text is not None else node.title, nodes).lstrip(":"))
        elif isinstance(node, nodes.ExternalLink) and node.title is not None:
            out.append(_render(node.title, nodes))
    return "".join(out)


# R data packages (austen, mobydick) ------------------------------------------------------------


def _load_r_text(source: str) -> list[str]:
    deb, pkg, names = _R_DATA[source]
    env = ":".join(os.environ.get(var, "") for var in ("R_LIBS", "R_LIBS_USER", "R_LIBS_SITE"))
    roots = [*env.split(":"), "/usr/lib/R/site-library", "/usr/local/lib/R/site-library",
             "/usr/lib/R/library"]
    found = [Path(r, pkg, "data") for r in roots if r and Path(r, pkg, "data", "Rdata.rdx").exists()]
    data = found[0] if found else None
    if data is None:
        raise DataError(f"the {source!r} text is the R package {pkg}: apt-get install {deb} (or apt-get "
                        f"download {deb}, dpkg-deb -x it to DIR and set R_LIBS=DIR/usr/lib/R/site-library)")
    objects = _read_r_lazyload(data / "Rdata")
    docs = []
    for name in names:
        text = "\n".join(line or "" for line in objects[name]).lstrip("\ufeff")
        # Keep only the book of a Project Gutenberg file (mobydick), not the licence around it.
        start = re.search(r"^\*\*\* ?START OF.*$", text, re.MULTILINE)
        end = re.search(r"^\*\*\* ?END OF", text, re.MULTILINE)
        text = text[start.end() if start else 0: end.start() if end else None]
        # The texts are hard-wrapped at ~70 columns: rejoin each paragraph into one line.
        paragraphs = re.split(r"\n\s*\n", text)
        docs.append("\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip()))
    return docs


def _read_r_lazyload(stem: Path) -> dict:
    """Objects of an R lazy-load database (stem.rdx index + stem.rdb blobs), without R. The index is a
    gzip'd serialized list(variables = list(name = c(offset, length)), ..., compressed = ...); each
    blob is a 4-byte length, then (compressed 2/3) a type byte, then a compressed serialization."""
    index = _r_unserialize(gzip.decompress(stem.with_suffix(".rdx").read_bytes()))
    fields = dict(zip(index.attrs["names"], index))
    compressed = fields["compressed"][0]
    rdb = stem.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in zip(fields["variables"].attrs["names"], fields["variables"]):
        blob = rdb[offset + 4: offset + length]
        kind = b"Z"
        if compressed in (2, 3):
            kind, blob = blob[:1], blob[1:]
        raw = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
               b"0": bytes}[kind](blob)
        objects[name] = _r_unserialize(raw)
    return objects


class _RVector(list):
    """An R vector (a Python list) with its attributes (names, class, ...)."""

    attrs: dict


def _r_unserialize(buf: bytes):
    """Read R's XDR serialization format for the types that data vectors use (vectors, lists,
    pairlists, symbols); anything else (closures, environments, ALTREP) raises DataError."""
    if buf[:2] != b"X\n":
        raise DataError("unsupported R serialization (only XDR 'X' format is read)")
    pos = 2
    refs = []

    def ints(n, fmt="i"):
        nonlocal pos
        vals = struct.unpack_from(f">{n}{fmt}", buf, pos)
        pos += n * struct.calcsize(fmt)
        return list(vals)

    def length():
        n = ints(1)[0]
        return n if n != -1 else (ints(1)[0] << 32) + ints(1)[0]

    def item():
        nonlocal pos
        flags = ints(1)[0]
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 242, 241):  # NULL and special environments
            return None
        if kind == 255:  # reference to an earlier symbol
            return refs[(flags >> 8 or ints(1)[0]) - 1]
        if kind == 1:  # symbol: its name (a CHARSXP)
            refs.append(item())
            return refs[-1]
        if kind in (2, 6):  # pairlist / call: [(tag, value), ...]
            attrs = item() if has_attr else None
            tag = item() if has_tag else None
            pairs = [(tag, item())]
            rest = item()
            out = _RVector(pairs + (rest or []))
            out.attrs = dict(attrs or [])
            return out
        if kind == 9:  # CHARSXP; encoding flags: bit 2 latin1, bit 3 utf-8
            n = ints(1)[0]
            if n == -1:
                return None  # NA_character_
            raw = buf[pos: pos + n]
            pos += n
            return raw.decode("latin-1" if flags & (1 << 14) else "utf-8", errors="replace")
        if kind in (10, 13):  # logical, integer
            vals = ints(length())
        elif kind == 14:  # double
            vals = ints(length(), "d")
        elif kind in (16, 19, 20):  # character, list, expression
            vals = [item() for _ in range(length())]
        else:
            raise DataError(f"unsupported R object type {kind} in serialized data")
        out = _RVector(vals)
        out.attrs = dict(item() if has_attr else [])
        return out

    version = ints(3)[0]
    if version == 3:
        n = ints(1)[0]
        pos += n  # skip the native encoding name
    return item()
