"""A short run of benchmarks/fuzz.py's targets (the long one: `python benchmarks/fuzz.py`, 100k+ inputs):
mutated checkpoints through the engine's reader and builder, load_quantized and the lazy quantizer, and
request bodies through the server's parser. Every input gives a result or the error we mean to raise."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("fuzz", Path(__file__).parents[1] / "benchmarks" / "fuzz.py")
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return fuzz.CheckpointFuzz(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def fp(tmp_path_factory):
    return fuzz.CheckpointFuzz(tmp_path_factory.mktemp("fuzz-fp"), "fp")


def _no_crashes(c: "fuzz.Crashes"):
    assert not c.seen, "\n".join(f"{v['type']} at {v['where']}: {v['message']} <- {v['sample']}"
                                 for v in c.seen.values())


def test_seed_checkpoint_reads(ck):
    assert fuzz.check_checkpoint_reader(ck.seed)
    ck.run_build(ck.raw)  # the unmutated shard builds and runs


@pytest.mark.parametrize("target, n", [("header", 300), ("build", 300), ("hf", 60)])
def test_fuzz_checkpoint_reader(ck, target, n):
    c = fuzz.Crashes()
    fn = {"header": ck.run_header, "build": ck.run_build, "hf": ck.run_hf}[target]
    strategy = ck.byte_mutation() if target == "header" else ck.header_mutation() | ck.byte_mutation()
    done, _ = fuzz.fuzz(target, fn, strategy, n, c)
    assert done == n
    _no_crashes(c)


def test_fuzz_lazy_quantize(fp):
    from salience.data import DataError
    from salience.quant import GroupSizeError

    c = fuzz.Crashes()
    fuzz.fuzz("lazy", fp.run_lazy, fp.header_mutation() | fp.byte_mutation(), 100, c,
              allowed=fuzz.ALLOWED + (DataError, GroupSizeError))
    _no_crashes(c)


def test_fuzz_request_parser():
    c = fuzz.Crashes()
    rf = fuzz.RequestFuzz()
    fuzz.fuzz("request", rf.run, rf.strategy(), 400, c, allowed=())
    _no_crashes(c)
    assert c.outcomes["request"].get("ok", 0) > 20  # the strategy reaches past the validation too
