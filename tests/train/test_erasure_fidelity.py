"""ConceptErasure against its papers, on the tiny digits teacher (v-prediction): ESD's on-policy x_t (a partial DDIM run
of the model being fine-tuned, hand-run here), the frozen bank kept as the earlier variant (exactly today's draws),
ANT's early/late stages (arXiv 2504.12782: targets, draws, alpha weights), the eps-space loss of a v network converted
by hand, two simulated processes equal to one, and the bank's progress bar."""
from __future__ import annotations

import pytest
import torch

from guidance.guided import GuidedDenoiser
from guidance.guiders import CFG
from guidance.samplers import sample_until
from losses.erasure import ant_early_target, esd_target, preservation_target
from train.methods.erasure import ConceptErasure
from train.methods.trajectories import TrajectoryBank

torch.set_num_threads(1)
STEPS = torch.zeros(1, dtype=torch.long)  # an ErasureSteps batch
TINY = dict(batch_size=3, trajectory_steps=4, val_samples=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def perturbed(module: ConceptErasure, seed: int = 0, scale: float = 0.05) -> ConceptErasure:
    """The student moved away from the frozen model (as after some training), the same for the same seed."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.student.net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def recorded_trajectories(module: ConceptErasure, monkeypatch) -> list[tuple]:
    """Each (noise, cond, stop) the module's on-policy sampler is called with."""
    calls, real = [], module.student_trajectory

    def spy(noise, cond, stop):
        calls.append((noise.clone(), cond, stop))
        return real(noise, cond, stop)

    monkeypatch.setattr(module, "student_trajectory", spy)
    return calls


@torch.no_grad()
def hand_ddim(den, noise, cond, null, w: float, steps: int, stop: int) -> torch.Tensor:
    """`stop` DDIM steps (Song et al. 2021, Eq. 12, eta = 0) of `den` under CFG D_u + w (D_c - D_u), written out."""
    sched = den.schedule
    times = sched.sampling_times(steps).float()
    a, s = sched.alpha_sigma(times[:1])
    x = noise * (a**2 + s**2).sqrt()
    for i in range(stop):
        t = times[i].expand(len(x))
        x0_c, x0_u = den(x, t, cond).x0, den(x, t, null).x0
        x0 = x0_u + w * (x0_c - x0_u)
        a, s = (v.reshape(-1, 1, 1, 1) for v in sched.alpha_sigma(t))
        eps = (x - a * x0) / s
        a_n, s_n = (v.reshape(-1, 1, 1, 1) for v in sched.alpha_sigma(times[i + 1].expand(len(x))))
        x = a_n * x0 + s_n * eps
    return x


def test_on_policy_x_t_is_a_partial_ddim_run_of_the_student(tiny_teacher_ckpt, monkeypatch):
    """ESD (arXiv 2303.07345, sec. 4; train-esd): x_t is the model being fine-tuned, sampled with CFG at
    trajectory_scale from fresh noise for `stop` of `trajectory_steps` DDIM steps, stop uniform in 0..steps-1, one
    per step for every term, each term's trajectories at its own condition; targets are read at that grid time."""
    m = perturbed(ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3, 7], trajectory_scale=2.5, **TINY))
    assert (m.x_t_source, m.space) == ("student", "eps")
    calls = recorded_trajectories(m, monkeypatch)
    times = m.student.schedule.sampling_times(4).float()
    stops = []
    for seed in range(40):
        groups = m._groups(STEPS, gen(seed))
        noise, cond, stop = calls[-1]
        stops.append(stop)
        assert [g.term for g in groups] == ["erase", "anchor", "uncond"] and len(calls) == seed + 1
        x_t, t = torch.cat([g.x_t for g in groups]), torch.cat([g.t for g in groups])
        assert torch.equal(t, times[stop].expand(9))
        assert torch.equal(cond, torch.cat([g.cond for g in groups]))  # each term at its own condition
        assert (groups[2].cond == -1).all() and not set(groups[1].cond.tolist()) & {3, 7}
        if seed < 6:
            want = hand_ddim(m.student, noise, cond, m.conditioner.null(cond), 2.5, 4, stop)
            torch.testing.assert_close(x_t, want, rtol=1e-5, atol=1e-5)
            if stop > 0:  # the student's trajectory, not the frozen model's
                frozen = hand_ddim(m.frozen, noise, cond, m.conditioner.null(cond), 2.5, 4, stop)
                assert (x_t - frozen).abs().max() > 1e-3
    assert set(stops) == {0, 1, 2, 3}  # every grid step, never the clean end
    erase = groups[0]
    torch.testing.assert_close(m._target(erase), esd_target(m.frozen, erase.x_t, erase.t, erase.cond, 1.0, "eps"),
                               rtol=0, atol=0)


def test_the_frozen_bank_option_draws_exactly_as_before(tiny_teacher_ckpt):
    """x_t_source: frozen_bank: the frozen model's cached trajectories jumped to t from the training distribution,
    draw for draw what the module drew before on-policy sampling was the default (independent of the student)."""
    m = perturbed(ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3], x_t_source="frozen_bank",
                                 trajectory_scale=2.0, bank_size=5, **TINY))
    bank = TrajectoryBank(GuidedDenoiser(m.frozen, CFG()), m.conditioner, m.sample_shape(), 4, 2.0, 5)
    g = gen(0)
    torch.randint(0, 1, (1,), generator=g)  # the step's erased request ("one")
    anchors = [m.spec.anchors[i] for i in torch.randint(0, 9, (3,), generator=g).tolist()]
    want = [bank.draw(reqs, m.device, g) for reqs in ([3] * 3, anchors, [-1] * 3)]
    groups = m._groups(STEPS, gen(0))
    assert [g.requests for g in groups] == [[3] * 3, anchors, [-1] * 3]
    for group, (x_t, t) in zip(groups, want):
        assert torch.equal(group.x_t, x_t) and torch.equal(group.t, t)


def test_the_bank_state_at_a_grid_step_is_the_frozen_models_partial_trajectory(tiny_teacher_ckpt, capsys):
    """TrajectoryBank.draw_at(stop) = sample_until of the frozen model for the stored trajectory's noise; a build
    shows a progress bar when asked (issue 18: minutes with no output)."""
    m = ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3], **TINY)
    guided = GuidedDenoiser(m.frozen, CFG())
    bank = TrajectoryBank(guided, m.conditioner, m.sample_shape(), 4, 2.0, 1, progress=True)
    bank.build_missing([3, -1], m.device)
    assert "erasure trajectory bank (2 request(s) x 1)" in capsys.readouterr().err
    from train.methods.trajectories import trajectory_seed

    noise = torch.randn(1, *m.sample_shape(), generator=gen(trajectory_seed(m.conditioner.key(3), 0)))
    for stop in range(4):
        x_t, t = bank.draw_at([3, 3], stop, m.device)
        want, t_want = sample_until(guided, noise, m.encode([3]), 2.0, 4, stop)
        torch.testing.assert_close(x_t, want.expand(2, -1, -1, -1), rtol=1e-5, atol=1e-5)
        assert torch.equal(t, t_want.expand(2))


def test_ant_draws_one_early_and_one_late_stage_with_their_targets_and_weights(tiny_teacher_ckpt, monkeypatch):
    """ANT (arXiv 2504.12782; authors' code: before_step, alpha_1, alpha_2): per step an early group after 0..k-1
    grid steps and a late group after k..steps-1 from one start noise; early target e_0 + eta (e_p - e_0), late
    target ESD's; the null condition read at both; total L_late + a2 U_late + a1 (L_early + a2 U_early) + anchors."""
    m = perturbed(ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3], eta=1.5, ant_steps=2, early_weight=2.0,
                                 **{**TINY, "trajectory_steps": 5}))
    assert m.uncond_weight == 0.5  # ANT's alpha_2 when not given
    calls = recorded_trajectories(m, monkeypatch)
    times = m.student.schedule.sampling_times(5).float()
    early, late = set(), set()
    for seed in range(30):
        groups = {g.term: g for g in m._groups(STEPS, gen(seed))}
        assert list(groups) == ["erase", "erase_early", "anchor", "uncond", "uncond_early"]
        (n_e, _, k_e), (n_l, _, k_l) = calls[-3], calls[-2]  # then the anchors' own trajectory
        assert torch.equal(n_e, n_l) and 0 <= k_e < 2 <= k_l < 5  # one start noise, the two stages
        early.add(k_e), late.add(k_l)
        assert torch.equal(groups["erase_early"].t, times[k_e].expand(3)) and torch.equal(groups["erase"].t,
                                                                                            times[k_l].expand(3))
        for stage, null in (("erase", "uncond"), ("erase_early", "uncond_early")):
            assert torch.equal(groups[null].x_t, groups[stage].x_t) and (groups[null].cond == -1).all()
    assert early == {0, 1} and late == {2, 3, 4}
    e, l_ = groups["erase_early"], groups["erase"]
    torch.testing.assert_close(m._target(e), ant_early_target(m.frozen, e.x_t, e.t, e.cond, 1.5, "eps"), rtol=0, atol=0)
    e_p = preservation_target(m.frozen, e.x_t, e.t, e.cond, "eps")
    e_0 = preservation_target(m.frozen, e.x_t, e.t, m.conditioner.null(e.cond), "eps")
    torch.testing.assert_close(m._target(e), e_0 + 1.5 * (e_p - e_0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m._target(l_), esd_target(m.frozen, l_.x_t, l_.t, l_.cond, 1.5, "eps"), rtol=0, atol=0)
    torch.manual_seed(5)
    terms = m.losses(STEPS)
    logged = {}
    monkeypatch.setattr(m, "log", lambda k, v, **kw: logged.__setitem__(k, v))
    torch.manual_seed(5)
    loss = m.training_step(STEPS, 0)
    want = terms["erase"] + 2.0 * terms["erase_early"] + terms["anchor"] + 0.5 * (terms["uncond"]
                                                                                  + 2.0 * terms["uncond_early"])
    torch.testing.assert_close(loss, want)
    assert set(logged) == {f"train/{k}" for k in terms} | {"train/loss"}


def test_the_eps_space_loss_of_a_v_network_is_the_hand_converted_error(tiny_teacher_ckpt):
    """ESD regresses in eps space (Eq. 6); the tiny teacher predicts v, so eps = sigma x_t + alpha v (VP) for both
    the student and the frozen branches; the v-space loss (loss_space: null, the earlier default) is the same error
    divided by alpha^2 at each t (Salimans & Ho 2022: v = (eps - sigma x_t) / alpha at fixed x_t)."""
    args = dict(model=str(tiny_teacher_ckpt), concepts=[3], eta=1.0, **TINY)
    m, m_v = perturbed(ConceptErasure(**args)), perturbed(ConceptErasure(**args, loss_space=None))
    assert m.frozen.parameterization == "v" and (m.space, m_v.space) == ("eps", "v")
    for seed in range(3):
        erase = m._groups(STEPS, gen(seed))[0]
        x, t, c = erase.x_t, erase.t, erase.cond
        a, s = (v.reshape(-1, 1, 1, 1) for v in m.student.schedule.alpha_sigma(t))
        with torch.no_grad():
            v_student = m.student(x, t, c).read("v")
            v_c, v_u = m.frozen(x, t, c).read("v"), m.frozen(x, t, m.conditioner.null(c)).read("v")
        e_student, e_c, e_u = (s * x + a * v for v in (v_student, v_c, v_u))
        want = ((e_student - (e_u - 1.0 * (e_c - e_u))) ** 2).mean()
        got, got_v = m.losses(STEPS, gen(seed))["erase"], m_v.losses(STEPS, gen(seed))["erase"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got, got_v * a.flatten()[0] ** 2, rtol=1e-4, atol=1e-7)  # one t per step


@pytest.mark.parametrize("source", ["student", "frozen_bank"])
@pytest.mark.parametrize("ant", [None, 2])
def test_two_simulated_processes_draw_what_one_draws(tiny_teacher_ckpt, monkeypatch, source, ant):
    """Every draw goes through per_sample: processes 0 and 1 of 2 (batch 2 each) get rows 0::2 and 1::2 of one
    process's batch of 4, for every term's requests, t and x_t (on-policy, bank, ANT stages)."""
    args = dict(model=str(tiny_teacher_ckpt), concepts=[3, 7], concept_sampling="all", x_t_source=source,
                ant_steps=ant, bank_size=3, trajectory_steps=4, val_samples=0)
    one = perturbed(ConceptErasure(**args, batch_size=4))
    whole = one._groups(STEPS, gen(11))
    for rank in range(2):
        part = perturbed(ConceptErasure(**args, batch_size=2))
        monkeypatch.setattr(part, "per_sample", lambda draw, n, r=rank: draw(n * 2)[r::2])
        for w, p in zip(whole, part._groups(STEPS, gen(11)), strict=True):
            assert w.term == p.term and w.requests[rank::2] == p.requests
            torch.testing.assert_close(p.t, w.t[rank::2], rtol=0, atol=0)
            torch.testing.assert_close(p.x_t, w.x_t[rank::2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(x_t_source="teacher"), "x_t_source"), (dict(bank_refresh=2), "frozen_bank"),
    (dict(ant_steps=4, trajectory_steps=4), "ant_steps"), (dict(ant_steps=0), "ant_steps"),
    (dict(ant_steps=2, t_window=0.8), "not both"), (dict(trajectory_steps=0), "trajectory_steps"),
    (dict(early_weight=-1.0), "early_weight"), (dict(trajectory_scale=float("nan")), "trajectory_scale"),
])
def test_impossible_sampling_settings_are_refused(tiny_teacher_ckpt, bad, match):
    with pytest.raises(ValueError, match=match):
        ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3], **bad)


def test_ant_stages_refuse_data_batches(tiny_teacher_ckpt):
    from data.digits import digits_tensors

    images, labels = digits_tensors("validation")
    m = ConceptErasure(model=str(tiny_teacher_ckpt), concepts=[3], ant_steps=2, **TINY)
    with pytest.raises(ValueError, match="t_window"):
        m.losses((images[:8], labels[:8]))
