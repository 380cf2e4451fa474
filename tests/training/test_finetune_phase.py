"""metapl.training.loop's last phase (finetuning the final student) against torch.optim by hand, and
metapl.training.finetune_only, which runs that phase on a saved student."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from faulty_run import CLASSES, FEATURES, tiny_config, tiny_data

from metapl.models import build_model
from metapl.training.loop import _batch_indices, _step_generator, finetune_only


def _student(dropout: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model("mlp", CLASSES, in_features=FEATURES, hidden=(8,), dropout=dropout)


@pytest.mark.parametrize("augment", ["weak", "strong"])
def test_finetune_only_is_sgd_on_labeled_batches_with_dropout_off(tmp_path, augment):
    """Nesterov SGD with weight decay and label smoothing, on the labeled stream of seed + 2,
    augmented as asked, in training mode with every dropout layer at p = 0 (the port's
    finetuning); the model passed in is left untouched and the result saved like train's."""
    cfg = tiny_config(
        finetune_steps=3,
        finetune_lr=0.2,
        finetune_weight_decay=0.1,
        finetune_label_smoothing=0.15,
        finetune_augment=augment,
    )
    data, student = tiny_data(), _student()
    before = copy.deepcopy(student.state_dict())
    results = finetune_only(student, data, cfg, tmp_path, networks={"student": student})
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())

    hand = _student(dropout=0.0)  # the same weights, no dropout
    opt = torch.optim.SGD(hand.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.1)
    augment_fn = data.strong if augment == "strong" else data.weak
    for k in range(3):
        idx = _batch_indices(len(data.labeled_x), cfg.finetune_batch, k, cfg.seed + 2)
        x = augment_fn(data.labeled_x[idx], _step_generator(torch.device("cpu"), cfg.seed + 2, k))
        loss = F.cross_entropy(hand(x), data.labeled_y[idx], label_smoothing=0.15)
        opt.zero_grad()
        loss.backward()
        opt.step()
    saved = torch.load(tmp_path / "final.pt", weights_only=False)
    for k, v in hand.state_dict().items():
        torch.testing.assert_close(saved["final"][k], v, rtol=1e-5, atol=1e-6)
    assert saved["student"].keys() == before.keys()
    assert json.loads((tmp_path / "results.json").read_text()) == pytest.approx(results)
    names = {"val/student_ema", "val/student_finetuned", "test/student_finetuned"}
    assert names == results.keys()  # before finetuning, after; no teacher here
