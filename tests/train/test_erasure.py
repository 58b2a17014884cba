"""ConceptErasure end to end on the tiny teacher: a CLI fit, reload through load_method (and its one-line error once the
teacher file it left out is gone), generation, what each term regresses, LoRA + SalUn training, data batches, config validation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from data.digits import digits_tensors
from losses.erasure import ant_target, esd_target, preservation_target, toward_target
from models.param_select import adapters_disabled
from train.runtime.checkpoint import CheckpointError, load_method
from train.cli import main
from train.evaluation.requests import evaluate_checkpoint
from data.steps import ErasureSteps
from train.methods.erasure import ConceptErasure

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "digits"
ERASE_CONFIGS = ("erase_one.yaml", "erase_two.yaml", "erase_toward.yaml")
TINY = dict(batch_size=4, trajectory_steps=3, bank_size=4, val_steps=3, val_samples=3)
STEPS = torch.zeros(1, dtype=torch.long)  # an ErasureSteps batch


@pytest.fixture(scope="module")
def erased_ckpt(tiny_teacher_ckpt, tmp_path_factory) -> Path:
    """ESD-x erasure of class 3, four steps through `python -m train fit`."""
    root = tmp_path_factory.mktemp("erase")
    config = {
        "seed_everything": 0,
        "model": {"class_path": "train.methods.erasure.ConceptErasure",
                  "init_args": {"model": str(tiny_teacher_ckpt), "concepts": [3], "lr": 0.05, **TINY}},
        "data": {"class_path": "data.steps.ErasureSteps", "init_args": {"steps_per_epoch": 3}},
        "trainer": {"max_steps": 4, "accelerator": "cpu", "check_val_every_n_epoch": None, "val_check_interval": 2,
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False, "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": 0}}]},
    }
    path = root / "erase.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--trainer.default_root_dir", str(root)])
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def test_fit_reload_and_generate_change_only_the_erased_class_row(erased_ckpt, tiny_teacher_ckpt):
    m = load_method(erased_ckpt, expect="erasure")
    assert m.sampling_denoiser() is m.student and m.hparams["model"] == str(tiny_teacher_ckpt)
    teacher = load_method(tiny_teacher_ckpt, expect="teacher").sampling_denoiser().net.state_dict()
    frozen, student = m.frozen.net.state_dict(), m.student.net.state_dict()
    assert all(torch.equal(frozen[k], teacher[k]) for k in teacher)  # the frozen copy is the teacher
    changed = [k for k in student if not torch.equal(student[k], frozen[k])]
    assert changed == ["unet.class_embedding.weight"]  # ESD-x
    rows = (student[changed[0]] - frozen[changed[0]]).abs().sum(1)
    assert rows[3] > 0 and (rows[torch.arange(11) != 3] == 0).all()
    images, nfe = m.generate(torch.tensor([3, 3, 5, -1]), scale=2.0, steps=3)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all() and nfe == 6
    row = evaluate_checkpoint(m, [2.0], steps=2, num_per_class=2)[0]  # what `python -m train evaluate` runs
    assert row["num_samples"] == 20 and 0 <= row["accuracy"] <= 1


def test_erased_checkpoint_needs_the_teacher_file_it_left_out(erased_ckpt, tmp_path):
    """The checkpoint holds a fingerprint of the frozen teacher, not its weights: with the file gone, loading is one
    line naming it (a self-contained checkpoint loads without it: tests/train/test_frozen_checkpoints.py)."""
    ckpt = torch.load(erased_ckpt, map_location="cpu", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("frozen.")]
    ckpt["guidedistill"]["config"]["model"] = str(tmp_path / "moved.ckpt")
    moved = tmp_path / "erased.ckpt"
    torch.save(ckpt, moved)
    with pytest.raises(CheckpointError, match=r"^[^\n]*'frozen.net' was left out .*moved.ckpt', which does not exist; "
                                              r"restore the original model"):
        load_method(moved)
    with pytest.raises(ValueError, match="does not exist"):
        ConceptErasure(model=str(tmp_path / "moved.ckpt"), concepts=[3])


def test_each_term_regresses_its_target(tiny_teacher_ckpt):
    # the frozen bank's x_t (t from the training distribution): the eta identity below is tested at moderate noise,
    # where eps_c and eps_u differ well above float rounding (on-policy x_t: tests/train/test_erasure_fidelity.py)
    m = ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3, 7], eta=1.0, loss_space="eps",
                       x_t_source="frozen_bank", **TINY)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    groups = m._groups(STEPS, gen())
    assert [g.term for g in groups] == ["erase", "anchor", "uncond"]
    erase_c, anchor_c, uncond_c = (torch.tensor(g.requests) for g in groups)
    assert len(set(erase_c.tolist())) == 1 and erase_c[0] in (3, 7)  # concept_sampling="one"
    assert not set(anchor_c.tolist()) & {3, 7} and (uncond_c == -1).all()
    erase = groups[0]
    x, t, c = erase.x_t, erase.t, erase.cond
    assert torch.equal(c, erase_c)  # a class model's condition is the class ids
    torch.testing.assert_close(m._target(erase), esd_target(m.frozen, x, t, c, 1.0, "eps"), rtol=0, atol=0)
    terms = m.losses(STEPS, gen())
    assert terms["anchor"] == 0 and terms["uncond"] == 0 and terms["erase"] > 0  # student starts as the frozen model
    m.eta = 0.0  # student = frozen: the erase loss is (1 + eta)^2 ||eps_c - eps_u||^2 at the same x_t
    torch.testing.assert_close(terms["erase"], 4 * m.losses(STEPS, gen())["erase"], rtol=1e-5, atol=0)
    m.t_window = 0.5
    torch.testing.assert_close(m._target(erase), ant_target(m.frozen, x, t, c, 0.0, 0.5, "eps"))
    toward = ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3, 7], targets=[5, 1], toward_scale=1.0,
                            loss_space="eps", **TINY)
    want = toward_target(toward.frozen, x, t, torch.where(c == 3, 5, 1), 1.0, "eps")
    torch.testing.assert_close(toward.erase_target(x, t, erase.requests), want, rtol=0, atol=0)
    anchor = groups[1]
    torch.testing.assert_close(m._target(anchor), preservation_target(m.frozen, anchor.x_t, anchor.t, anchor.cond, "eps"))
    m.concept_sampling = "all"
    assert set(m._groups(torch.zeros(1), torch.Generator().manual_seed(3))[0].requests) == {3, 7}


def test_data_batches_take_x_t_from_real_images_of_each_term(tiny_teacher_ckpt):
    m = ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3], anchors=[0, 1], concept_sampling="all", **TINY)
    images, labels = digits_tensors("validation")
    groups = {g.term: g for g in m._groups((images[:60], labels[:60]), torch.Generator().manual_seed(0))}
    erase = torch.tensor(groups["erase"].requests)
    assert (erase == 3).all() and len(erase) == int((labels[:60] == 3).sum())
    assert set(groups["anchor"].requests) == {0, 1} and (groups["uncond"].cond == -1).all()
    assert len(groups["uncond"].cond) == 60
    assert set(m.losses((images[:60], labels[:60]))) == {"erase", "anchor", "uncond"}


def test_lora_with_saliency_trains_only_salient_adapter_weights_and_round_trips(tiny_teacher_ckpt):
    args = dict(model=str(tiny_teacher_ckpt), concepts=[3], params="lora", lora_rank=1, saliency_top_k=0.2,
                saliency_batches=2, lr=0.05, ema_decay=0.5, **TINY)
    torch.manual_seed(0)
    m = ConceptErasure(**args)
    assert m.trainable_names and all(".lora_" in n for n in m.trainable_names)
    m.on_train_start()  # SalUn mask from the erasure loss, hooks attached
    assert m.saliency.fraction() == pytest.approx(0.2, abs=1 / m.num_trainable)
    before = {k: v.clone() for k, v in m.student.net.state_dict().items()}
    opt = m.configure_optimizers()["optimizer"]
    for _ in range(2):
        opt.zero_grad()
        sum(m.losses(STEPS).values()).backward()
        opt.step()
        m.on_train_batch_end(None, STEPS, 0)
    after = m.student.net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".lora_" in k for k in changed)
    masks = dict(zip(m.trainable_names, m.saliency.masks()))
    for k in changed:  # only masked entries moved
        assert ((after[k] != before[k]) & ~masks[k]).sum() == 0
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([3, 4])
    with torch.no_grad(), adapters_disabled(m.student.net):
        torch.testing.assert_close(m.student(x, t, c).x0, m.frozen(x, t, c).x0, rtol=0, atol=0)
    m2 = ConceptErasure(**args)
    m2.load_state_dict(m.state_dict())  # LoRA keys and the saliency buffers rebuild from the same arguments
    with torch.no_grad():
        torch.testing.assert_close(m2.sampling_denoiser()(x, t, c).x0, m.sampling_denoiser()(x, t, c).x0)
    assert bool(m2.saliency.fitted)


@pytest.mark.parametrize("bad, match", [
    (dict(concepts=[]), "distinct classes"), (dict(concepts=[3, 3]), "distinct classes"),
    (dict(concepts=[10]), "distinct classes"), (dict(targets=[3]), "must not include"),
    (dict(targets=[1, 2]), "one class"), (dict(anchors=[3]), "not erased"), (dict(params="esd"), "params"),
    (dict(saliency_top_k=0.1, weight_decay=0.01), "weight_decay"), (dict(t_window=1.5), "t_window"),
    (dict(eta=-1.0), "eta"), (dict(concept_sampling="some"), "concept_sampling"),
    (dict(loss_space="edm"), "loss_space"),
])
def test_impossible_settings_are_refused_with_a_message(tiny_teacher_ckpt, bad, match):
    args = {"model": str(tiny_teacher_ckpt), "concepts": [3], **bad}
    with pytest.raises(ValueError, match=match):
        ConceptErasure(**args)


@pytest.mark.parametrize("name", ERASE_CONFIGS)
def test_erase_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as e:  # --print_config validates every field without building anything
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] == "train.methods.erasure.ConceptErasure"
    assert cfg["model"]["init_args"]["model"].endswith(".ckpt")
    assert cfg["data"]["class_path"] == "data.steps.ErasureSteps" and ErasureSteps(3).steps_per_epoch == 3


def test_the_erased_rate_is_logged_by_sample_metrics_and_the_erasure_row_by_evaluation(tiny_teacher_ckpt, monkeypatch):
    from train.evaluation.callbacks import SampleMetrics
    from train.evaluation.digits_text import erased_digits
    from train.evaluation.erasure import erased_rate, erasure_metrics

    m = ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3, 7], **TINY)
    assert m.erased_requests() == [3, 7] and erased_digits(m) == [3, 7]
    logged = {}
    monkeypatch.setattr(m, "log", lambda key, value, **kw: logged.__setitem__(key, value))
    SampleMetrics()._log_erased_rate(m)  # what the validation end runs after the sample metrics
    want = erased_rate(m, [3, 7], TINY["val_samples"], m.val_scale, TINY["val_steps"])
    assert logged == {"val/erased_rate": want} and 0 <= want <= 1
    m.val_samples, logged = 0, {}
    SampleMetrics()._log_erased_rate(m)
    assert logged == {}
    row = erasure_metrics(m, steps=2, num_per_class=2, uncond_samples=4, probe_scales=(3.0,))
    assert set(row) == {"w", "erased_rate", "other_acc", "other_fd", "uncond_rate", "erased_rate_at"}
    assert all(0 <= row[k] <= 1 for k in ("erased_rate", "other_acc", "uncond_rate")) and row["other_fd"] >= 0
    assert set(row["erased_rate_at"]) == {3.0}


@pytest.mark.parametrize("old", ["train.erasure.ConceptErasure"])
def test_a_checkpoint_of_an_earlier_class_path_loads(erased_ckpt, tmp_path, old):
    ckpt = torch.load(erased_ckpt, map_location="cpu", weights_only=True)
    ckpt["guidedistill"]["config"]["_class_path"] = old
    torch.save(ckpt, tmp_path / "old.ckpt")
    a, b = load_method(erased_ckpt), load_method(tmp_path / "old.ckpt")
    assert type(b) is ConceptErasure and b.erased_requests() == [3]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


TEXT_ERASURE_ARGS = {"model", "concepts", "eta", "params", "anchor_weight", "uncond_weight", "batch_size",
                     "trajectory_steps", "trajectory_scale", "bank_size", "loss_space", "lora_rank", "lora_alpha", "lr",
                     "weight_decay", "warmup_steps", "ema_decay", "val_scale", "val_steps", "val_samples",
                     "model_config", "nonfinite", "max_skips"}  # TextConceptErasure's arguments


@pytest.mark.parametrize("old", ["train.methods.text_erasure.TextConceptErasure", "train.text_erasure.TextConceptErasure"])
def test_a_checkpoint_whose_config_names_text_concept_erasure_loads(t2i_workspace, tmp_path, old):
    """Text erasure runs recorded TextConceptErasure and its arguments: they load as ConceptErasure, with the
    arguments a config left out taking TextConceptErasure's defaults, not ConceptErasure's."""
    path = t2i_workspace.fitted("erase", "sd15")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    config = ckpt["guidedistill"]["config"]
    given = {k: v for k, v in config.items() if k in TEXT_ERASURE_ARGS}
    for name, args in [("all", given), ("defaults", {k: v for k, v in given.items()
                                                     if k not in ("uncond_weight", "trajectory_scale", "val_samples")})]:
        ckpt["guidedistill"]["config"] = {"_class_path": old, **args}
        torch.save(ckpt, tmp_path / f"{name}.ckpt")
    new, full, defaults = load_method(path), load_method(tmp_path / "all.ckpt"), load_method(tmp_path / "defaults.ckpt")
    assert type(full) is ConceptErasure and full.erased_requests() == ["a cat", "the cat", "a red car"]
    assert full.spec.anchors == ("the dog",) and full.spec.alternatives == (None, "a car")
    assert {k: full.hparams[k] for k in given if k != "model_config"} == {k: v for k, v in given.items()
                                                                          if k != "model_config"}
    assert (defaults.hparams["uncond_weight"], defaults.hparams["trajectory_scale"], defaults.hparams["val_samples"]) \
        == (0.0, 3.0, 0)
    for module in (full, defaults):
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in new.state_dict().items())
