"""Tests of salience.data: text sources, the wiki parser, calibration rows and eval windows.

Tokenizers are trained here on a few sentences (no download). Tests of the real gensim texts run
only where gensim is installed (CI installs it)."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import struct
import sys
import zlib

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from salience import data
from salience.data import DataError

HAS_GENSIM = importlib.util.find_spec("gensim") is not None
needs_gensim = pytest.mark.skipif(not HAS_GENSIM, reason="needs: pip install --no-deps gensim==4.4.0")

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 8,
    "Hello world, this is the second document about foxes and dogs. " * 8,
    "A third one: numbers 12345 and punctuation!? " * 8,
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))


def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer)
    return tok


@pytest.fixture(scope="module")
def tok_plain():
    """EOS, and a BOS token that is not added by default (like SmolLM2)."""
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(), bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tok_bos():
    """Adds BOS by default (like Gemma)."""
    tok = _bpe()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tok_no_special():
    return PreTrainedTokenizerFast(tokenizer_object=_bpe())


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- Wikipedia parser ---------------------------------------------------------------------------

ARTICLE = """{{Infobox thing|name=Infobox Value}}
'''Real Article''' is about [[Plain Link]] and [[Target page|piped text]].<ref>Secret citation</ref>
More text<ref name="x" /> with an [http://example.com external title] and a&nbsp;space.<!-- hidden -->
[[File:Picture.jpg|thumb|Picture caption]]

== History ==
Old ''times'' {{cite web|url=http://x|title=Cite Title}}.


{| class="wikitable"
| cell one || cell two
|}
Tail sentence.

== References ==
{{reflist}}
* Some reference list entry

[[Category:Test category]]
"""


def _page(title, ns, text, redirect=False):
    red = f'<redirect title="{text}" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id>"
            f'<text xml:space="preserve">{text}</text></revision></page>')


def test_parse_wiki_dump_synthetic(tmp_path):
    from xml.sax.saxutils import escape

    pages = [_page("Redirected", 0, "Real Article", redirect=True),
             _page("Talk:Real Article", 1, "talk page text"),
             _page("Real Article", 0, escape(ARTICLE))]
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
           "<siteinfo><sitename>Wikipedia</sitename></siteinfo>" + "".join(pages) + "</mediawiki>")
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))

    docs = data.parse_wiki_dump(path)
    assert len(docs) == 1
    doc = docs[0]
    assert doc.startswith(" = Real Article = \n")
    assert "Real Article is about Plain Link and piped text." in doc
    assert "external title" in doc and "a\xa0space" in doc
    assert "= = History = =" in doc and "Old times ." in doc and "Tail sentence." in doc
    for gone in ("{{", "}}", "[[", "<ref", "Secret citation", "Infobox", "Cite Title", "cell one",
                 "Picture", "thumb", "Category", "hidden", "''", "References", "reference list"):
        assert gone not in doc, gone
    assert "\n\n\n" not in doc


def test_wikitext_missing_parser_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "mwparserfromhell":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match="pip install mwparserfromhell"):
        data.wikitext_to_text("x")


# --- Files --------------------------------------------------------------------------------------


def test_txt_paragraphs_and_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("First doc\nstill first.\n\n\n  \nSecond doc.\n\n")
    assert data.load_text(str(p)) == ["First doc\nstill first.", "Second doc."]
    p.write_text("line one\nline two\n\nline three\n".replace("\n\n", "\n"))
    assert data.load_text(str(p)) == ["line one", "line two", "line three"]


def test_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert data.load_text(str(p)) == ["one", "two"]
    p.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 3"):
        data.load_text(str(p))
    p.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(DataError, match='line 2.*"text"'):
        data.load_text(str(p))


def test_json(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(["one", {"text": "two"}]))
    assert data.load_text(str(p)) == ["one", "two"]
    p.write_text(json.dumps(["one", {"body": "two"}]))
    with pytest.raises(DataError, match="item 1"):
        data.load_text(str(p))
    p.write_text(json.dumps({"text": "not a list"}))
    with pytest.raises(DataError, match="list"):
        data.load_text(str(p))


def test_missing_and_empty_files(tmp_path):
    for missing in (str(tmp_path / "nope.txt"), "nope.jsonl", "./nope", "some/deep/path"):
        with pytest.raises(DataError, match="file not found"):
            data.load_text(missing)
    for name, content in (("e.txt", ""), ("w.txt", "  \n\n \n"), ("e.json", "[]"), ("e.jsonl", "\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match="no text"):
            data.load_text(str(tmp_path / name))


def _hide_module(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_dataset_name_without_datasets_package(monkeypatch):
    _hide_module(monkeypatch, "datasets")
    for name in ("wikitext:wikitext-2-raw-v1@test", "owner/name", "hf:wikitext"):
        with pytest.raises(DataError, match="pip install datasets"):
            data.load_text(name)


class _FakeDatasets:
    """Stands in for the `datasets` package: records the call, returns rows or fails offline."""

    def __init__(self, fail=False):
        self.fail, self.calls = fail, []

    def load_dataset(self, name, config, split):
        self.calls.append((name, config, split))
        if self.fail:
            raise ConnectionError("Couldn't reach 'https://huggingface.co' (offline)")
        return _FakeSplit()


class _FakeSplit:
    column_names = ("text",)

    def __getitem__(self, column):
        return ["", " = Title = ", "", "Some text."]


def test_dataset_names(monkeypatch):
    fake = _FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda n, *a: object())
    assert data.load_text("wikitext:wikitext-2-raw-v1@test") == ["", " = Title = ", "", "Some text."]
    data.load_text("hf:owner/name")
    assert fake.calls == [("wikitext", "wikitext-2-raw-v1", "test"), ("owner/name", None, "train")]
    fake.fail = True
    with pytest.raises(DataError, match="could not fetch .*offline") as err:
        data.load_text("owner/name@validation")
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no deep traceback


def test_missing_gensim_is_clear(monkeypatch):
    _hide_module(monkeypatch, "gensim")
    with pytest.raises(DataError, match=r"pip install --no-deps gensim==4\.4\.0"):
        data.load_text("lee")


def test_split_for_calibration():
    docs = [f"doc {i}" for i in range(25)]
    ev, cal = data.split_for_calibration(docs)
    assert ev + cal == docs and len(cal) == 2 and not set(ev) & set(cal)
    assert data.split_for_calibration(docs) == (ev, cal)
    assert data.split_for_calibration(["a", "b"]) == (["a"], ["b"])
    with pytest.raises(DataError):
        data.split_for_calibration(["a"])


# --- Token ids ----------------------------------------------------------------------------------


def test_calibration_rows(tok_plain):
    rows = data.calibration_rows(tok_plain, DOCS, n_rows=8, seqlen=16, seed=0)
    assert rows.shape == (8, 16) and rows.dtype == torch.long
    assert torch.equal(rows, data.calibration_rows(tok_plain, DOCS, n_rows=8, seqlen=16, seed=0))
    assert not torch.equal(rows, data.calibration_rows(tok_plain, DOCS, n_rows=8, seqlen=16, seed=1))
    assert 0 <= rows.min() and rows.max() < len(tok_plain)
    # Every row is a contiguous piece of the EOS-joined text.
    joined = _ids(tok_plain, DOCS[0]) + [tok_plain.eos_token_id] + _ids(tok_plain, DOCS[1]) + \
        [tok_plain.eos_token_id] + _ids(tok_plain, DOCS[2])
    pieces = {tuple(joined[i:i + 16]) for i in range(len(joined) - 15)}
    assert all(tuple(r.tolist()) in pieces for r in rows)


def test_calibration_rows_join_and_short_text(tok_plain, tok_no_special):
    a, b = _ids(tok_plain, "hello world"), _ids(tok_plain, "lazy dog")
    with pytest.warns(UserWarning, match="overlap"):
        row = data.calibration_rows(tok_plain, ["hello world", "lazy dog"], n_rows=2,
                                    seqlen=len(a) + len(b) + 1)
    assert row[0].tolist() == a + [tok_plain.eos_token_id] + b
    # Without EOS the documents are joined by the tokens of "\n\n".
    sep = _ids(tok_no_special, "\n\n")
    with pytest.warns(UserWarning):
        row = data.calibration_rows(tok_no_special, ["hello world", "lazy dog"], n_rows=1,
                                    seqlen=len(a) + len(b) + len(sep))
    assert row[0].tolist() == a + sep + b
    with pytest.raises(DataError, match=f"{len(a)} tokens"):
        data.calibration_rows(tok_plain, ["hello world"], n_rows=1, seqlen=len(a) + 1)


def test_eval_windows_no_bos(tok_plain, tmp_path):
    ids = _ids(tok_plain, "\n\n".join(DOCS))
    windows, n_prefix = data.eval_windows(tok_plain, DOCS, seqlen=16)
    assert n_prefix == 0 and windows.dtype == torch.long
    assert windows.shape == (len(ids) // 16, 16)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    quick, _ = data.eval_windows(tok_plain, DOCS, seqlen=16, max_windows=3)
    assert torch.equal(quick, windows[:3])
    with pytest.raises(DataError, match=f"{len(ids)} tokens"):
        data.eval_windows(tok_plain, DOCS, seqlen=len(ids) + 1)


def test_eval_windows_bos(tok_plain, tok_bos):
    assert tok_bos("a").input_ids[0] == tok_bos.bos_token_id
    plain, _ = data.eval_windows(tok_plain, DOCS, seqlen=16)
    windows, n_prefix = data.eval_windows(tok_bos, DOCS, seqlen=16)
    assert n_prefix == 1 and windows.shape == (plain.shape[0], 17)
    assert (windows[:, 0] == tok_bos.bos_token_id).all()
    assert torch.equal(windows[:, 1:], plain)  # BOS is prepended, never inside the text


def test_eval_windows_token_cache(tok_plain, tmp_path, monkeypatch):
    windows, _ = data.eval_windows(tok_plain, DOCS, seqlen=16, source="toy")
    files = list((tmp_path / "cache" / "tokens").glob("toy-*.npy"))
    assert len(files) == 1
    calls = []
    real_encode = data._encode
    monkeypatch.setattr(data, "_encode", lambda tok, text, special=False: calls.append(text) or
                        real_encode(tok, text, special))
    again, _ = data.eval_windows(tok_plain, DOCS, seqlen=16, source="toy")
    assert torch.equal(again, windows)
    assert "\n\n".join(DOCS) not in calls  # the whole text was not tokenized again
    files[0].write_bytes(b"garbage")  # a corrupt entry is recomputed
    again, _ = data.eval_windows(tok_plain, DOCS, seqlen=16, source="toy")
    assert torch.equal(again, windows)


# --- R lazy-load data (austen, mobydick) ----------------------------------------------------------


def _i(*vals):
    return struct.pack(f">{len(vals)}i", *vals)


def _chars(s):
    return _i(0x40009, len(s.encode())) + s.encode()


def _strs(vals, attrs=b""):
    body = b"".join(_chars(v) if v is not None else _i(9, -1) for v in vals)
    return _i(16 | (0x200 if attrs else 0), len(vals)) + body + attrs


def _names(vals, first):
    symbol = _i(1) + _chars("names") if first else _i(0x1FF)  # a symbol, later a reference to it
    return _i(0x402) + symbol + _strs(vals) + _i(254)


def _serialize(body):
    return b"X\n" + _i(3, 0x40201, 0x30500, 5) + b"UTF-8" + body


def test_r_lazyload_reader(tmp_path, monkeypatch):
    lines = ["\ufeffTitle", "", "line one", "line", None, "two", "", "", "*** END OF it", "licence"]
    book = _serialize(_strs(lines))
    blob = struct.pack(">i", len(book)) + zlib.compress(book)
    variables = _i(19 | 0x200, 1) + _i(13, 2, 0, len(blob)) + _names(["book"], first=True)
    index = _i(19 | 0x200, 3) + variables + _i(19, 0) + _i(10, 1, 1) + \
        _names(["variables", "references", "compressed"], first=False)
    folder = tmp_path / "lib" / "rpkg" / "data"
    folder.mkdir(parents=True)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    (folder / "Rdata.rdb").write_bytes(blob)

    assert data._read_r_lazyload(folder / "Rdata") == {"book": lines}
    monkeypatch.setitem(data._R_DATA, "austen", ("r-cran-rpkg", "rpkg", ["book"]))
    monkeypatch.setenv("R_LIBS", str(tmp_path / "lib"))
    assert data.load_text("austen") == ["Title\n\nline one line\n\ntwo"]
    monkeypatch.setenv("R_LIBS", str(tmp_path / "elsewhere"))
    monkeypatch.setitem(data._R_DATA, "mobydick", ("r-cran-nopkg", "nopkg", ["x"]))
    with pytest.raises(DataError, match="apt-get install r-cran-nopkg"):
        data.load_text("mobydick")


# --- The real texts (gensim wheel) ----------------------------------------------------------------


@needs_gensim
def test_lee_and_its_cache(tmp_path):
    docs = data.load_text("lee")
    assert len(docs) == 300 and all(d.strip() for d in docs)
    cached = list((tmp_path / "cache" / "text").glob("lee*.json"))
    assert len(cached) == 1
    cached[0].write_text(json.dumps(["from the cache"]))  # proves the second call reads the file
    assert data.load_text("lee") == ["from the cache"]


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SALIENCE_CACHE", str(tmp_path_factory.mktemp("wiki_cache")))
        yield {name: data.load_text(name) for name in ("wiki", "wiki-eval", "wiki-calib")}


@needs_gensim
def test_wiki(wiki):
    docs = wiki["wiki"]
    assert 80 <= len(docs) <= 130
    text = "\n\n".join(docs)
    assert len(text.encode()) > 2_000_000
    for markup in ("{{", "[[", "<ref", "{|"):
        assert markup not in text
    assert all(d.startswith(" = ") for d in docs)
    assert wiki["wiki-eval"] + wiki["wiki-calib"] == docs
    assert 0 < len(wiki["wiki-calib"]) < len(docs) // 5
