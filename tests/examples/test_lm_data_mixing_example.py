"""examples/lm_data_mixing.py (learned data mixing for a byte-level GPT): the sources are what
they claim, the target and test files are apart from the training files, the example's mixing
meta-gradient equals a hand-written float64 autograd unroll (no metapl in the reference), and a
smoke run moves the weight of random bytes down and writes its outputs."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import one_thread  # noqa: F401  (fixture: single-threaded module)
from support import ROOT, load_script
from torch.func import functional_call

_PATH = ROOT / "examples" / "lm_data_mixing.py"
F64 = torch.float64


@pytest.fixture(scope="module")
def lm():
    yield load_script(_PATH, "lm_data_mixing_example")
    sys.modules.pop("lm_data_mixing_example", None)


@pytest.fixture(scope="module")
def smoke(lm):
    return lm.PRESETS["smoke"].config


@pytest.fixture(scope="module")
def corpus(lm, smoke):
    return lm.load_corpus(smoke)


def _bytes(t):
    return bytes(t.tolist())


def test_splits_are_disjoint_and_read_as_is(lm, corpus):
    train, target, test = (set(corpus.files[s]) for s in ("train", "target", "test"))
    assert train and target and test
    assert not train & target and not train & test and not target & test
    stdlib = lm.Path(lm.sysconfig.get_paths()["stdlib"])
    for split, stream in (("target", corpus.target), ("test", corpus.test)):
        assert all(lm.split_of(name) == split for name in corpus.files[split])
        expected = b"".join((stdlib / name).read_bytes() for name in corpus.files[split])
        assert _bytes(stream) == expected
    code = b"".join((stdlib / name).read_bytes() for name in corpus.files["train"])
    assert _bytes(corpus.sources["code"]) == code


def test_corrupted_sources_are_corrupted(lm, smoke, corpus):
    code, sources = corpus.sources["code"], corpus.sources
    # shuffled: the code's bytes, in another order
    shuffled = sources["shuffled"]
    assert torch.equal(shuffled.sort().values, code.sort().values)
    assert (shuffled == code).float().mean() < 0.2
    # random: every byte value, none far from its expected count
    counts = torch.bincount(sources["random"].long(), minlength=256).double()
    expected = len(sources["random"]) / 256
    assert counts.min() > 0.5 * expected and counts.max() < 1.5 * expected
    assert (sources["random"] == code).float().mean() < 0.02
    # repeated: every line of the code `repeat` times in a row
    first = _bytes(code).splitlines(keepends=True)[0]
    assert _bytes(sources["repeated"]).startswith(first * smoke.repeat)
    assert len(sources["repeated"]) == smoke.repeat * len(code)


def test_docstrings_of_module_class_and_function(lm):
    source = b'"""module"""\nclass A:\n    """a class"""\n    def f(self):\n        """f."""\n'
    assert lm.docstrings(source) == b"module\n\na class\n\nf.\n\n"


def test_windows_are_slices(lm):
    data = torch.arange(100, dtype=torch.uint8)
    w = lm.windows(data, 5, 10, torch.Generator().manual_seed(0))
    assert w.shape == (5, 10) and w.dtype == torch.int64
    assert torch.equal(w - w[:, :1], torch.arange(10).expand(5, 10))


def _sqrt(v):
    """sqrt with derivative 0 at exactly 0 (bytes absent from a batch get no gradient)."""
    return torch.where(v > 0, torch.sqrt(torch.where(v > 0, v, 1.0)), 0.0)


def _adam(p, g, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam's update, written out."""
    t = state["step"] + 1
    ms = {k: b1 * state["exp_avg"][k] + (1 - b1) * g[k] for k in p}
    vs = {k: b2 * state["exp_avg_sq"][k] + (1 - b2) * g[k] ** 2 for k in p}
    new = {k: p[k] - lr * (ms[k] / (1 - b1**t)) / (_sqrt(vs[k] / (1 - b2**t)) + eps) for k in p}
    return new, {"step": t, "exp_avg": ms, "exp_avg_sq": vs}


def _reference(net, student, state, logits, batches, target, lr):
    """d target_loss / d logits through K hand-written Adam steps (create_graph) from
    ``state``, step k on the mixture of batches[k]."""
    m = logits.detach().clone().requires_grad_(True)
    p = {k: v.clone().requires_grad_(True) for k, v in student.items()}

    def loss(params, tokens):
        logits_ = functional_call(net, params, (tokens,))[:, :-1]
        ce = F.cross_entropy(logits_.reshape(-1, 256), tokens[:, 1:].reshape(-1), reduction="none")
        return ce.view(len(tokens), -1).mean(1)

    for batch in batches:
        mixture = (torch.softmax(m, 0) * loss(p, batch).view(5, -1).mean(1)).sum()
        grads = torch.autograd.grad(mixture, list(p.values()), create_graph=True)
        p, state = _adam(p, dict(zip(p, grads, strict=True)), state, lr)
    return torch.autograd.grad(loss(p, target).mean(), m)[0]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("curvature", ["reverse", "forward"])
def test_meta_gradient_matches_autograd_unroll(lm, smoke, corpus, steps, curvature):
    cfg = dataclasses.replace(smoke, per_source=2, context=12, target_batch=3)
    net, student = lm.make_student(cfg, 0)
    net, student = net.double(), {k: v.double() for k, v in student.items()}
    opt = lm.optim.adam(cfg.lr)
    gen = torch.Generator().manual_seed(1)
    # a state one real step in (Adam's first step from zero moments is nearly flat in g)
    batches = torch.stack([lm.mixture_batch(corpus, cfg, gen) for _ in range(steps + 1)])
    grads = torch.func.grad(
        lambda p: lm.mixture_loss(net, p, lm.fixed_weights("uniform"), batches[0])
    )
    student, state = opt.step(student, grads(student), opt.init(student))
    logits = torch.tensor([0.3, -0.2, 0.1, 0.0, -0.4], dtype=F64)
    target = lm.windows(corpus.target, cfg.target_batch, cfg.context, gen)

    res = lm.lookahead(net, student, state, logits, opt, batches[1:], target, curvature)
    ref_state = {"step": int(state["step"]), **{k: state[k] for k in ("exp_avg", "exp_avg_sq")}}
    expected = _reference(net, student, ref_state, logits, batches[1:], target, cfg.lr)
    assert expected.abs().max() > 1e-6  # a real signal, not two zeros
    torch.testing.assert_close(res.meta_grads["logits"], expected, rtol=1e-8, atol=1e-12)


def test_main_smoke(lm, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--preset", "smoke", "--json", "--output-dir", str(out)]
    summary = lm.main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["rows"]) == list(lm.ROWS) == list(summary["rows"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"].keys() == printed["rows"].keys()
    random = lm.SOURCES.index("random")
    learned = printed["rows"]["learned"]["weights"][0]  # [iters + 1][S] of the one seed
    assert learned[0] == pytest.approx([0.2] * 5)
    assert learned[-1][random] < 0.1 and learned[-1][random] == min(learned[-1])
    assert printed["rows"]["oracle"]["final_weights"] == pytest.approx([0.5, 0.5, 0, 0, 0])
    rows = printed["rows"]
    paired = rows["learned"]["runs"][0] - rows["uniform"]["runs"][0]
    assert rows["learned"]["minus_uniform"] == pytest.approx([paired])
    for row in printed["rows"].values():
        assert 0 < row["mean"] < 5.6 and len(row["runs"]) == 1  # below ln 256 = 5.55 + noise
    assert all(printed["memory"][c]["peak_mib"] > 0 for c in ("reverse", "forward"))
    assert Path(printed["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--iters", "0"], "iters must be >= 1"),
        (["--width", "30"], "width (30) must be a multiple of heads (4)"),
        (["--curvature", "sideways"], "invalid choice"),
        (["--seeds"], "--seeds and --rows must not be empty"),
        (["--preset", "smoke", "--context", "8000"], "are shorter than the context (8000)"),
    ],
)
def test_bad_arguments(lm, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lm.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_shows_defaults(lm, capsys):
    with pytest.raises(SystemExit):
        lm.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: 300)" in text and "--lookahead" in text and "--curvature" in text
    with pytest.raises(SystemExit):
        lm.main(["--preset", "smoke", "--help"])
    assert "(default: 20)" in capsys.readouterr().out  # the preset's iterations
