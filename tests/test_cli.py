"""The command line end to end on a tiny model saved as a Hugging Face folder, and its clear errors."""

import json

import pytest
import torch
import transformers

from salience.cli import main

from tiny import tiny_model, tiny_tokenizer

TEXT = "\n\n".join(f"story {i}: the quick brown fox jumps over the lazy dog near the river bank." * 4
                   for i in range(60))


@pytest.fixture()
def folder(tmp_path):
    m = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    m.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def text(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("cmd", [[], ["quantize"], ["eval"], ["generate"], ["demo"], ["discover"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: salience" in capsys.readouterr().out


def test_quantize_eval_generate(folder, text, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(folder), "--out", str(out), "--group-size", "32", "--calib",
                 str(text), "--calib-rows", "8", "--seqlen", "32", "--eval", "--data", str(text), "--windows", "4",
                 "--prompt", "the quick", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "full precision" in printed and "RTN w4 g32" in printed and "AWQ w4 g32" in printed
    assert str(out.resolve()) in printed and "4-bit greedy:" in printed
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert main(["eval", str(out), "--data", str(text), "--windows", "4", "--seqlen", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "the fox", "--max-new-tokens", "4", "--temperature", "0.8",
                 "--top-p", "0.9"]) == 0
    # refuses to overwrite without --overwrite
    assert main(["quantize", "--model", str(folder), "--out", str(out), "--group-size", "32", "--calib",
                 str(text), "--calib-rows", "4", "--seqlen", "32"]) == 2
    assert "exists" in capsys.readouterr().err


def _err(args, capsys):
    assert main(args) == 2
    return capsys.readouterr().err


def test_missing_model(tmp_path, capsys):
    assert "model not found" in _err(["eval", str(tmp_path / "nope") + "/"], capsys)


def test_wrong_format(tmp_path, capsys):
    p = tmp_path / "weights.txt"
    p.write_text("hello")
    assert "must be a .gguf" in _err(["eval", str(p)], capsys)
    g = tmp_path / "fake.gguf"
    g.write_bytes(b"NOPE" + b"\0" * 64)
    assert "not a GGUF" in _err(["eval", str(g)], capsys)


def test_pickle_refused(folder, capsys):
    m = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(m.state_dict(), folder / "pytorch_model.bin")
    assert "--allow-pickle" in _err(["eval", str(folder)], capsys)


def test_unsupported_architecture(tmp_path, capsys):
    cfg = transformers.BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, is_decoder=True)
    path = tmp_path / "bert"
    transformers.BertLMHeadModel(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    err = _err(["quantize", "--model", str(path), "--out", str(tmp_path / "o"), "--method", "rtn"], capsys)
    assert "'bert'" in err and "llama" in err and "not supported" in err


def test_group_size_that_does_not_divide(folder, tmp_path, capsys):
    err = _err(["quantize", "--model", str(folder), "--out", str(tmp_path / "o"), "--method", "rtn"], capsys)
    assert "group size 128 does not divide the input dim 64 of model.layers.0.self_attn.q_proj" in err
    assert "32" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("value, where", [(float("nan"), "post_attention_layernorm.weight"),
                                          (3e38, "mlp.gate_proj")])
def test_nonfinite_names_the_tensor_or_layer(folder, text, tmp_path, capsys, value, where):
    """A NaN weight is refused at load, naming the tensor and file; a finite weight whose activations
    overflow is caught by the quantizer, naming the block and layer."""
    m = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        m.model.layers[1].post_attention_layernorm.weight[:] = value
    m.save_pretrained(folder)
    err = _err(["quantize", "--model", str(folder), "--out", str(tmp_path / "o"), "--group-size", "32",
                "--calib", str(text), "--calib-rows", "4", "--seqlen", "32"], capsys)
    assert where in err and "NaN" in err
    if value == 3e38:
        assert "block 1" in err
    else:
        assert "model.safetensors" in err
    assert not (tmp_path / "o").exists()  # o.partial may stay: the resume state of the run


def test_missing_calibration_file(folder, tmp_path, capsys):
    err = _err(["quantize", "--model", str(folder), "--out", str(tmp_path / "o"), "--group-size", "32",
                "--calib", str(tmp_path / "missing.txt")], capsys)
    assert "not found" in err


def test_quantize_tuned_rounding(folder, text, tmp_path):
    """--rounding tune with its step and row counts reaches the search config the report records."""
    out = tmp_path / "t"
    assert main(["quantize", "--model", str(folder), "--out", str(out), "--group-size", "32", "--calib",
                 str(text), "--calib-rows", "4", "--seqlen", "32", "--rounding", "tune", "--tune-steps", "3",
                 "--tune-rows", "2"]) == 0
    rep = json.loads((out / "salience_report.json").read_text())
    assert rep["search"]["rounding"] == "tune" and rep["search"]["tune_steps"] == 3
    assert rep["search"]["propagate"] is True  # tuning's default: against the full-precision model's output
    assert rep["search"]["tune_rows"] == 2
    assert all(b["tune"]["steps"] == 3 and b["tune"]["rows"] == 2 for b in rep["blocks"])


def test_propagate_default_follows_the_rounding():
    from salience.cli import _search_config, build_parser
    p = build_parser()
    base = ["quantize", "--model", "m"]
    assert _search_config(p.parse_args(base)).propagate is False
    assert _search_config(p.parse_args(base + ["--rounding", "tune"])).propagate is True
    assert _search_config(p.parse_args(base + ["--rounding", "tune", "--no-propagate"])).propagate is False
    assert _search_config(p.parse_args(base + ["--propagate"])).propagate is True
    from salience.awq import SearchConfig
    assert _search_config(p.parse_args(base)).search_damp == SearchConfig().search_damp
    assert _search_config(p.parse_args(base + ["--search-damp", "0.25"])).search_damp == 0.25
