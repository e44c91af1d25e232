"""`sds-bench --device cpu`: the ONNX export DeepSparse runs, the JSON it writes, its one-line errors.

onnxruntime (in the `test` extra) checks the exported graphs and stands in for DeepSparse, which CI does not
install (its sparsezoo needs numpy < 2); the real DeepSparse runs in the last test wherever it is installed."""
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from conftest import model_cfg

from sds_cli.bench import cpu as cpubench
from sds_cli.bench.cli import main
from sds_cli.bench.cpu import Subject, densified, export, masked
from sds_cli.models import load_model
from sds_cli.sparsity import Pattern, is_two_four

ATOL = 1e-4  # fp32 logits of a 2-layer model: graph vs eager differ by about 2e-7
FIELDS = {"prefill_32_ms", "prefill_8_ms", "decode_ms", "decode_tokens_per_s"}
SPEEDUPS = {"prefill_32_speedup", "prefill_8_speedup", "prefill_speedup", "decode_speedup"}
FAST = ["--device", "cpu", "--prefill", "32", "8", "--repeats", "2", "--threads", "1"]


def tiny(family: str, pattern: str = "0.5") -> Subject:
    lm = load_model(model_cfg(f"tiny-{family}"), "float32").model
    lm.set_attn_implementation("eager")
    return masked(Subject(f"tiny-{family}", lm, True), Pattern.parse(pattern))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pruned (50%) and a dense tiny Llama, saved as `sds-run ... save.final=true` saves them."""
    root = tmp_path_factory.mktemp("models")
    pruned = tiny("llama")
    pruned.module.save_pretrained(root / "pruned")
    load_model(model_cfg("tiny-llama"), "float32").model.save_pretrained(root / "dense")
    return root


class OrtEngine:
    """DeepSparse's ``Engine(path, batch_size, num_cores).run(inputs, val_inp)`` on onnxruntime."""

    def __init__(self, path, batch_size, num_cores):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path)
        self.names = [i.name for i in self.session.get_inputs()]
        assert batch_size == 1 and num_cores == 1

    def run(self, inputs, val_inp):
        return self.session.run(None, dict(zip(self.names, inputs)))


def run_graph(path, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})


def bench(capsys, *argv):
    """(exit code, stderr) of `sds-bench` in this process."""
    code = 0
    try:
        main([*map(str, argv)])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_exported_graphs_give_pytorchs_logits(tmp_path, family):
    model = tiny(family, "2:4")
    module, inputs = model.graph(32, None)
    with torch.no_grad():
        expected = module(*inputs)
    (logits,) = run_graph(export(module, inputs, tmp_path / "prefill.onnx"), inputs)
    assert logits.shape == (1, 1, model.module.config.vocab_size)  # the last position only, as generate asks
    np.testing.assert_allclose(logits, expected.numpy(), atol=ATOL)
    assert not model.module.training  # exporting must not switch dropout on

    module, inputs = model.graph(1, 16)
    prefill, tokens = model.graph(17, None)  # the same 17 random tokens: 16 cached and the decoded one
    with torch.no_grad():
        expected, whole = module(*inputs), prefill(*tokens)
    outputs = run_graph(export(module, inputs, tmp_path / "decode.onnx"), inputs)
    assert len(outputs) == 1 + 2 * model.module.config.num_hidden_layers
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want.numpy(), atol=ATOL)
    # the cached step is the last position of a plain forward over the same 17 tokens
    np.testing.assert_allclose(outputs[0][:, -1], whole[:, -1].numpy(), atol=ATOL)


def test_masks_and_dense_twin():
    model = tiny("llama", "2:4")
    assert model.zeros() == 0.5 and all(is_two_four(lin.weight) for lin in model.linears())
    twin = densified(model)
    assert twin.zeros() == 0
    for lin, dense in zip(model.linears(), twin.linears()):
        kept = lin.weight != 0
        assert torch.equal(dense.weight[kept], lin.weight[kept]) and dense.weight[~kept].abs().max() < 0.01
    assert tiny("llama", "0.25").zeros() == 0.25


def test_deepsparse_json_has_every_figure(tmp_path, saved, capsys, monkeypatch):
    monkeypatch.setattr(cpubench, "deepsparse_engine", lambda: OrtEngine)
    monkeypatch.setattr(cpubench, "versions", lambda backend: {"torch": torch.__version__})
    code, err = bench(capsys, saved / "pruned", *FAST, "--out", tmp_path / "bench.json")
    assert code == 0, err
    body = json.loads((tmp_path / "bench.json").read_text())
    assert body["backend"] == "deepsparse" and body["sparsity"] == 0.5 and body["threads"] == 1
    assert body["prefill_tokens"] == [32, 8] and body["decode_context"] == 8
    assert body["dense_reference"].startswith("the pruned weights with their zeros filled")
    assert set(body["backends"]) == {"deepsparse", "torch"} and set(body["backends"]["torch"]) == {"dense"}
    dense, pruned = body["backends"]["deepsparse"]["dense"], body["backends"]["deepsparse"]["pruned"]
    assert set(dense) == set(pruned) == set(body["backends"]["torch"]["dense"]) == FIELDS
    assert SPEEDUPS <= set(body) and set(body["vs_torch"]) == SPEEDUPS
    assert body["prefill_speedup"] == body["prefill_32_speedup"] == dense["prefill_32_ms"] / pruned["prefill_32_ms"]
    assert body["decode_speedup"] == pytest.approx(pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"])
    assert dense["decode_tokens_per_s"] == pytest.approx(1e3 / dense["decode_ms"])
    rounds = body["rounds_ms"]["deepsparse"]["pruned"]["prefill_32"]
    assert len(rounds) == 2 and pruned["prefill_32_ms"] == pytest.approx(sum(rounds) / 2)  # median of two
    assert body["cpu"]["model"] and body["cpu"]["cores"] >= 1 and isinstance(body["cpu"]["flags"]["avx512f"], bool)
    assert len(body["load_average"]["start"]) == len(body["load_average"]["end"]) == 3
    assert "speedup" in err and "decode (tokens/s)" in err


def test_torch_backend_times_two_models(tmp_path, saved, capsys):
    """A model without zeros and a --dense reference: the structured-pruning comparison, PyTorch only."""
    code, err = bench(capsys, saved / "dense", *FAST, "--dense", saved / "pruned", "--out", tmp_path / "b.json")
    assert code == 0, err
    body = json.loads((tmp_path / "b.json").read_text())
    assert body["backend"] == "torch" and body["dense_reference"] == str(saved / "pruned")
    assert set(body["backends"]) == {"torch"} and set(body["backends"]["torch"]) == {"dense", "pruned"}
    assert SPEEDUPS <= set(body) and "vs_torch" not in body and body["sparsity"] == 0


def test_missing_deepsparse_says_how_to_get_it(saved, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepsparse", None)  # as if not installed, installed or not
    code, err = bench(capsys, saved / "pruned", *FAST)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: DeepSparse is not installed: pip install -e .[cpu-bench]")


def test_dense_model_passed_as_sparse(saved, capsys):
    code, err = bench(capsys, saved / "dense", *FAST)
    assert code == 2 and "is dense: 0.00% of its decoder-linear weights are zero" in err and "--backend torch" in err


def test_prefill_longer_than_the_model_takes(saved, capsys):
    code, err = bench(capsys, saved / "pruned", *FAST[:2], "--prefill", "512")
    assert code == 2 and "a 512-token prefill needs more than the 256 positions" in err
    code, err = bench(capsys, saved / "pruned", *FAST[:2], "--prefill", "256")
    assert code == 2 and "decode after a 256-token context needs more than the 256 positions" in err


@pytest.mark.parametrize(("argv", "message"), [(["--repeats", "0"], "at least one timed round"),
                                             (["--out", "/nonexistent/b.json"], "/nonexistent does not exist"),
                                             (["--sparsity", "3:2"], "N:M needs 0 < N < M")])
def test_bad_options_fail_before_any_work(capsys, argv, message):
    code, err = bench(capsys, "llama-2-7b-mlp", *FAST, *argv)
    assert code == 2 and message in err


def test_cpu_options_are_refused_on_cuda(capsys):
    code, err = bench(capsys, "llama-2-7b", "--sparsity", "0.5")
    assert code == 2 and "--sparsity: for --device cpu only" in err


@pytest.mark.skipif(importlib.util.find_spec("deepsparse") is None, reason="DeepSparse is not installed (cpu-bench)")
def test_deepsparse_runs_the_graph(tmp_path, saved, capsys):
    model = tiny("llama")
    module, inputs = model.graph(32, None)
    engine = cpubench.deepsparse_engine()
    run = cpubench.deepsparse_runner(engine, module, inputs, tmp_path / "g.onnx", threads=1)
    with torch.no_grad():
        np.testing.assert_allclose(run()[0], module(*inputs).numpy(), atol=ATOL)
    code, err = bench(capsys, saved / "pruned", *FAST, "--out", tmp_path / "bench.json")
    assert code == 0, err
    body = json.loads((tmp_path / "bench.json").read_text())
    assert body["versions"]["deepsparse"] == "1.8.0" and set(body["vs_torch"]) == SPEEDUPS
