"""Each preference loss against values worked out by hand, and the stage's term checks."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from vlmtrain.config import PreferenceConfig, TrainableConfig
from vlmtrain.objectives.preference import (
    RunningRewardMean,
    check_terms,
    preference_loss,
)

# Two pairs. Pair 0: policy-minus-reference log-prob +1 on the chosen completion and -1 on
# the rejected one, so h = 2 and, with beta = 0.5, beta * h = 1. Pair 1 is pair 0 swapped
# (h = -2).
PC = torch.tensor([-5.0, -7.0])
PR = torch.tensor([-7.0, -5.0])
RC = torch.tensor([-6.0, -6.0])
RR = torch.tensor([-6.0, -6.0])
BETA = 0.5
# -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e).
NLS_1, NLS_M1 = 0.31326168751822286, 1.3132616875182228


def loss(kind, **options):
    return preference_loss(kind, PC, PR, RC, RR, beta=BETA, **options)


def test_sigmoid_is_dpo_and_rewards_are_beta_times_log_ratios():
    losses, chosen, rejected = loss("sigmoid")
    assert losses.tolist() == pytest.approx([NLS_1, NLS_M1])
    assert chosen.tolist() == [0.5, -0.5] and rejected.tolist() == [-0.5, 0.5]
    assert not chosen.requires_grad


def test_conservative_and_robust_with_label_smoothing():
    conservative = loss("conservative", label_smoothing=0.1)[0]
    # 0.9 * 0.31326 + 0.1 * 1.31326
    assert conservative[0].item() == pytest.approx(0.4132616875182229)
    assert loss("sigmoid", label_smoothing=0.1)[0].tolist() == pytest.approx(conservative.tolist())
    robust = loss("robust", label_smoothing=0.1)[0]
    # (0.9 * 0.31326 - 0.1 * 1.31326) / 0.8
    assert robust[0].item() == pytest.approx(0.1882616875182229)
    assert loss("robust", label_smoothing=0.0)[0].tolist() == pytest.approx([NLS_1, NLS_M1])
    with pytest.raises(ValueError, match="label_smoothing"):
        loss("conservative")


def test_ipo_hinge_and_bco_pair():
    # IPO: (h - 1 / (2 beta))^2 = (2 - 1)^2 and (-2 - 1)^2.
    assert loss("ipo")[0].tolist() == pytest.approx([1.0, 9.0])
    # Hinge: relu(1 - beta h) = relu(0), relu(2).
    assert loss("hinge")[0].tolist() == pytest.approx([0.0, 2.0])
    # BCO pair with d = 0.2: -log sig(0.5 - 0.2) - log sig(-(-0.5 - 0.2)).
    assert loss("bco_pair", reward_mean=0.2)[0][0].item() == pytest.approx(0.9575412933539849)
    with pytest.raises(TypeError, match="reward_mean"):
        loss("bco_pair")
    with pytest.raises(TypeError, match="label_smoothing"):
        loss("ipo", label_smoothing=0.1)


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    preference_loss("sigmoid", pc, pr, RC, RR, beta=BETA)[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_running_reward_mean_state():
    d = RunningRewardMean()
    assert d.mean == 0.0
    d.update(3.0, 4)
    d.update(1.0, 4)
    restored = RunningRewardMean()
    restored.load_state_dict(d.state_dict())
    assert restored.mean == d.mean == 0.5


def pref(**kw):
    return OmegaConf.merge(OmegaConf.structured(PreferenceConfig), kw)


def test_mpo_terms_pass_and_bad_combinations_name_the_keys():
    terms = check_terms(
        pref(terms={"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}), False, TrainableConfig()
    )
    assert terms.pair_terms == ["sigmoid", "bco_pair"] and terms.weights["sft"] == 1.0
    assert (
        terms.logps_of("sigmoid") == "sum"
        and check_terms(pref(terms={"ipo": 1}), False, TrainableConfig()).logps_of("ipo") == "mean"
    )
    bad = [
        (dict(terms={"ipo": 1.0}, logps="sum"), "stage.preference.logps=sum with ipo"),
        (dict(reference="none"), "stage.preference.reference=none"),
        (dict(terms={"dpo": 1.0}), "stage.preference.terms names"),
        (dict(terms={"conservative": 1.0}), "stage.preference.label_smoothing"),
        (dict(reference="disabled_adapter"), "stage.lora.enabled"),
    ]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            check_terms(pref(**kw), False, TrainableConfig())
    with pytest.raises(ValueError, match=r"stage\.trainable\.projector"):
        check_terms(pref(reference="disabled_adapter"), True, TrainableConfig())
